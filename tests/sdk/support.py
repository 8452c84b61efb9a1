"""Helpers shared by the SDK conformance tests."""

from __future__ import annotations

import re
import threading
import time
from typing import Callable, List, Optional

import pytest
from packaging.version import Version

from e2b import ConnectionConfig, Sandbox
from prerequisites import missing_prerequisite  # noqa: F401 (tests/prerequisites.py, on the path by conftest)

# The envd version the secure sandbox claims: every feature gate of the SDK is open from 0.6.4.
SECURE_ENVD_VERSION = Version("0.6.4")
# Bounds every plain request the SDK makes, so a hung envd fails a test instead of the run.
REQUEST_TIMEOUT = 20.0
TEST_USER = "user"


def make_secure_sandbox(url: str, token: Optional[str], sandbox_id: str = "securesandbox") -> Sandbox:
    """Build a Sandbox the way `Sandbox.connect` does after the REST API returned
    `envdAccessToken` (see `Sandbox._cls_connect_sandbox`), but without a REST API."""
    headers = {
        "E2b-Sandbox-Id": sandbox_id,
        "E2b-Sandbox-Port": str(ConnectionConfig.envd_port),
    }
    if token is not None:
        headers["X-Access-Token"] = token
    config = ConnectionConfig(
        extra_sandbox_headers=headers,
        debug=True,
        sandbox_url=url,
        request_timeout=REQUEST_TIMEOUT,
    )
    return Sandbox(
        sandbox_id=sandbox_id,
        sandbox_domain=None,
        envd_version=SECURE_ENVD_VERSION,
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=config,
    )


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.05, message=""):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds.
    `message` may be a callable, evaluated only on failure."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            pytest.fail(f"condition not met within {timeout} s: {text} (last value: {last!r})")
        time.sleep(interval)


_ESCAPES = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\\\)|\r")


def screen_lines(pty: bytes) -> List[str]:
    """Terminal output as lines, without escape sequences (colours, titles, bracketed paste)
    and carriage returns: a command's output line can then be told from the echo of what was
    typed (`echo $FOO` prints a line `bar`; the echo of `export FOO=bar` is not one)."""
    return _ESCAPES.sub(b"", pty).decode(errors="replace").split("\n")


class OutputCollector:
    """Drains a command or PTY handle (`handle.wait(...)`) in a background thread so the test
    can poll the output while it runs. After `join()`, `result` or `error` tells how it ended."""

    def __init__(self, handle):
        self.handle = handle
        self._lock = threading.Lock()
        self._pty = bytearray()
        self._stdout: List[str] = []
        self._stderr: List[str] = []
        self.result = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self.handle.wait(
                on_pty=self._on_pty, on_stdout=self._on_stdout, on_stderr=self._on_stderr
            )
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e

    def _on_pty(self, data: bytes) -> None:
        with self._lock:
            self._pty.extend(data)

    def _on_stdout(self, data: str) -> None:
        with self._lock:
            self._stdout.append(data)

    def _on_stderr(self, data: str) -> None:
        with self._lock:
            self._stderr.append(data)

    @property
    def pty(self) -> bytes:
        with self._lock:
            return bytes(self._pty)

    @property
    def stdout(self) -> str:
        with self._lock:
            return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._stderr)

    def wait_for_pty(self, needle: bytes, timeout: float = 10.0) -> bytes:
        wait_until(lambda: needle in self.pty or self.done, timeout=timeout, message=f"PTY output containing {needle!r}")
        out = self.pty
        assert needle in out, f"PTY ended ({self.error!r}) without {needle!r}; output: {out!r}"
        return out

    def wait_for_pty_line(self, line: str, timeout: float = 10.0) -> List[str]:
        """Wait for a line of terminal output that is exactly `line` (see `screen_lines`)."""
        wait_until(lambda: line in screen_lines(self.pty) or self.done, timeout=timeout,
                   message=lambda: f"a PTY output line {line!r}; output: {self.pty!r}")
        lines = screen_lines(self.pty)
        assert line in lines, f"PTY ended ({self.error!r}) without a line {line!r}; output: {self.pty!r}"
        return lines

    def wait_for_stdout(self, needle: str, timeout: float = 10.0) -> str:
        wait_until(lambda: needle in self.stdout or self.done, timeout=timeout, message=f"stdout containing {needle!r}")
        out = self.stdout
        assert needle in out, f"command ended ({self.error!r}) without {needle!r} on stdout; stdout: {out!r}"
        return out

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the handle did not finish within {timeout} s"
