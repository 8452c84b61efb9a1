"""Fixtures that run wrenn's envd and point the official `e2b` Python SDK at it.

Two envd processes are started, each once per session and only when a test needs it:

* ``envd``        - no access token: the SDK talks to it in debug mode (``E2B_DEBUG=true``,
                    ``E2B_SANDBOX_URL=http://127.0.0.1:<port>``), as E2B's own envd tests do.
* ``secure_envd`` - ``POST /init`` has set an access token, so every RPC needs
                    ``X-Access-Token`` and ``/files`` needs the token or a URL signature.
                    A separate process, because the token applies to the whole envd.

The binary is ``$WRENN_ENVD_BIN`` (default ``<repo>/target/x86_64-unknown-linux-gnu/release/envd``),
run as ``envd --port <free port> $WRENN_ENVD_ARGS``. It must run as root (it switches users).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, List

import httpx
import pytest

from e2b import AsyncSandbox, Sandbox

# tests/prerequisites.py, shared with the platform suite.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import REQUEST_TIMEOUT, TEST_USER, make_secure_sandbox, missing_prerequisite

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ENVD_BIN = REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "envd"



def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG = 1: envd gets SIGKILL if pytest dies without running fixture teardown.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class EnvdProcess:
    """One running envd binary."""

    def __init__(self, name: str):
        self.name = name
        binary = Path(os.environ.get("WRENN_ENVD_BIN") or DEFAULT_ENVD_BIN)
        if not binary.is_file():
            pytest.fail(
                f"envd binary not found at {binary}. Build it "
                "(cargo build --release --target x86_64-unknown-linux-gnu -p wrenn-envd) "
                "or set WRENN_ENVD_BIN.",
                pytrace=False,
            )
        if os.geteuid() != 0:
            pytest.fail("the SDK suite must run as root: envd switches users", pytrace=False)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix=f"envd-{name}-", suffix=".log", delete=False)
        self.log_path = self._log.name
        args = [str(binary), "--port", str(self.port), *shlex.split(os.environ.get("WRENN_ENVD_ARGS", ""))]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self._wait_healthy(args)

    def output(self, tail: int = 60) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError as e:
            return f"<cannot read envd log: {e}>"
        return "\n".join(lines[-tail:])

    def _wait_healthy(self, args: List[str]) -> None:
        deadline = time.monotonic() + 10
        last = "no attempt"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                pytest.fail(
                    f"envd ({' '.join(args)}) exited early with code {code}. Its output:\n{self.output()}",
                    pytrace=False,
                )
            try:
                r = httpx.get(f"{self.url}/health", timeout=1)
                if r.status_code == 204:
                    return
                last = f"GET /health -> {r.status_code} {r.text!r}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.05)
        output = self.output()
        self.stop()
        pytest.fail(
            f"envd did not answer GET /health with 204 within 10 s (last: {last}). Its output:\n{output}",
            pytrace=False,
        )

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            pytest.fail(f"envd '{self.name}' died (exit code {code}). Its output:\n{self.output()}", pytrace=False)

    def stop(self) -> None:
        """Stop envd. Its log is kept (and its path printed) only if envd had died by itself."""
        died = self.proc.poll() is not None
        if not died:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        if died:
            print(f"envd '{self.name}' log kept at {self.log_path}")
        else:
            Path(self.log_path).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def envd() -> Iterator[EnvdProcess]:
    """The token-less envd, with the SDK's debug-mode environment pointing at it."""
    proc = EnvdProcess("debug")
    saved = {k: os.environ.get(k) for k in ("E2B_DEBUG", "E2B_SANDBOX_URL")}
    os.environ["E2B_DEBUG"] = "true"
    os.environ["E2B_SANDBOX_URL"] = proc.url
    try:
        yield proc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        code = proc.proc.poll()
        if code is not None:
            print(f"envd 'debug' had died with code {code}; output:\n{proc.output()}")
        proc.stop()


@pytest.fixture(scope="session")
def secure_envd() -> Iterator[EnvdProcess]:
    """A second envd whose access token was set by `POST /init`. Yields it with `.token` set."""
    proc = EnvdProcess("secure")
    token = secrets.token_hex(32)
    r = httpx.post(f"{proc.url}/init", json={"accessToken": token}, timeout=10)
    if r.status_code != 204:
        output = proc.output()
        proc.stop()
        pytest.fail(
            f"POST /init with a first access token -> {r.status_code} {r.text!r}, expected 204. envd output:\n{output}",
            pytrace=False,
        )
    proc.token = token  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def sandbox(envd: EnvdProcess) -> Iterator[Sandbox]:
    """`Sandbox.create()` in debug mode: no REST API call, envd version 99.99.99, no token."""
    sbx = Sandbox.create(request_timeout=REQUEST_TIMEOUT)
    assert sbx.sandbox_id == "debug_sandbox_id"
    assert sbx.envd_api_url == envd.url
    yield sbx
    envd.check_alive()


@pytest.fixture
async def async_sandbox(envd: EnvdProcess) -> AsyncSandbox:
    sbx = await AsyncSandbox.create(request_timeout=REQUEST_TIMEOUT)
    assert sbx.envd_api_url == envd.url
    yield sbx
    envd.check_alive()


@pytest.fixture
def secure_sandbox(secure_envd: EnvdProcess) -> Iterator[Sandbox]:
    sbx = make_secure_sandbox(secure_envd.url, secure_envd.token)  # type: ignore[attr-defined]
    yield sbx
    secure_envd.check_alive()


def _user_exists(name: str) -> bool:
    return subprocess.run(["id", name], capture_output=True).returncode == 0


@pytest.fixture
def test_user() -> str:
    """The unprivileged user `user` (home /home/user; uid 1000 in E2B templates) the CI setup creates."""
    if not _user_exists(TEST_USER):
        missing_prerequisite(
            "the tests as the test user",
            f"`id {TEST_USER}` failed: create the test user (useradd -m {TEST_USER}; scripts/setup.sh does)",
        )
    return TEST_USER


@pytest.fixture
def default_user() -> str:
    """Who envd runs a call that names no user as while no `/init` named a default: `user` where
    that account exists (as in E2B's templates), else root."""
    return TEST_USER if _user_exists(TEST_USER) else "root"


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, world-writable directory for one test, made and removed through the SDK
    of whichever sandbox the test uses."""
    sbx = None
    for name in ("sandbox", "secure_sandbox"):
        if name in request.fixturenames:
            sbx = request.getfixturevalue(name)
            break
    if sbx is None:
        sbx = request.getfixturevalue("sandbox")
    path = f"/tmp/wrenn-sdk-test-{uuid.uuid4().hex[:12]}"
    assert sbx.files.make_dir(path) is True
    sbx.commands.run(f"chmod 0777 {path}")
    yield path
    try:
        sbx.files.remove(path)
    except Exception:
        pass
