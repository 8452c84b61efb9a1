"""Starts `wrenn up` (control plane, embedded host agent, QEMU guests) once for the session and
points the real `e2b` SDK at it through E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import sys
import urllib.request

import pytest

# tests/prerequisites.py, shared with the SDK suite.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from prerequisites import free_port, missing_prerequisite  # noqa: E402


# The running-sandbox limit of every team (test_quota_* fills a team of its own up to it).
QUOTA_RUNNING = 5


# Each run's own network slots (namespaces, addresses, host chains), so that two runs (the SQLite
# and the PostgreSQL one) can share the machine at once: scripts/test.sh gives each its own.
SLOT_PREFIX = os.environ.get("WRENN_PLATFORM_SLOT_PREFIX", "wup")
FIRST_SLOT = int(os.environ.get("WRENN_PLATFORM_FIRST_SLOT", "600"))


class Wrenn:
    def __init__(self, binary: str, slot_prefix: str = SLOT_PREFIX, first_slot: int = FIRST_SLOT,
                 slots: int = 32, internet: bool = False, extra_args=(),
                 own_store: bool = False):
        self.binary = binary
        # A store of its own (SQLite in its data directory) even when the session's instance
        # uses the PostgreSQL of DATABASE_URL: two control planes must not share one.
        self.own_store = own_store
        self.slot_prefix = slot_prefix
        self.first_slot = first_slot
        self.slots = slots
        self.internet = internet
        self.extra_args = list(extra_args)
        self.data = tempfile.mkdtemp(prefix="wrenn-up-")
        self.api_port = free_port()
        self.proxy_port = free_port()
        self.mmds_port = free_port()
        self.https_port = free_port()
        self.log = open(os.path.join(self.data, "wrenn-up.log"), "wb")
        try:
            self.start()
        except BaseException:
            self.stop()
            shutil.rmtree(self.data, ignore_errors=True)
            raise
        with open(os.path.join(self.data, "cp", "initial-api-key")) as f:
            self.key = f.read().strip()

    def start(self):
        self.process = subprocess.Popen(
            [
                self.binary, "up", "--data-dir", self.data,
                "--api-listen", f"127.0.0.1:{self.api_port}",
                "--proxy-listen", f"127.0.0.1:{self.proxy_port}",
                "--https-listen", f"127.0.0.1:{self.https_port}",
                "--mmds-port", str(self.mmds_port),
                *([] if self.internet else ["--no-internet"]),
                "--accel", "tcg", "--slot-prefix", self.slot_prefix,
                "--first-slot", str(self.first_slot), "--slots", str(self.slots),
                "--stop-sandboxes-on-exit",
                # Per team; the other tests never hold more than 4 running sandboxes at once.
                "--quota-running", str(QUOTA_RUNNING),
                # Samples and logs every second, so test_operations sees them soon.
                "--sample-interval", "1", "--telemetry-interval-ms", "1000",
                *self.extra_args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not (self.own_store and k == "DATABASE_URL")},
        )
        key_file = os.path.join(self.data, "cp", "initial-api-key")
        deadline = time.time() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"wrenn up exited: {self.tail()}")
            if os.path.exists(key_file) and self.healthy():
                break
            if time.time() > deadline:
                raise RuntimeError(f"wrenn up did not come up: {self.tail()}")
            time.sleep(0.5)

    def crash_and_restart(self):
        """SIGKILL, as a crash would: nothing is cleaned up. Then the same command again."""
        self.process.kill()
        self.process.wait()
        self.start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def domain(self) -> str:
        """What a user gives the SDKs as E2B_DOMAIN: the HTTPS front under wrenn.localhost."""
        return f"wrenn.localhost:{self.https_port}"

    @property
    def ca_bundle(self) -> str:
        """The system's trusted certificates plus wrenn's local authority (for SSL_CERT_FILE)."""
        return os.path.join(self.data, "tls", "ca-bundle.pem")

    @property
    def ca_cert(self) -> str:
        return os.path.join(self.data, "tls", "ca.pem")

    @property
    def sdk(self) -> dict:
        """The SDK's connection options for this instance (another than the session's)."""
        return {"api_url": self.api_url, "sandbox_url": self.proxy_url, "api_key": self.key}

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 204
        except OSError:
            return False

    def tail(self) -> str:
        self.log.flush()
        with open(os.path.join(self.data, "wrenn-up.log"), "rb") as f:
            return f.read()[-3000:].decode(errors="replace")

    def key_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`wrenn key ARGS --local` on this control plane's data directory (and its store)."""
        return subprocess.run(
            [self.binary, "key", *args, "--local", "--data-dir", self.data],
            capture_output=True, text=True, timeout=60, check=check,
        )

    def key_cli_json(self, *args: str):
        """`wrenn key ARGS --json`, its output parsed (None when it prints nothing)."""
        out = self.key_cli(*args, "--json").stdout
        return json.loads(out) if out.strip() else None

    def api_cli(self, *args: str, key: str, check: bool = True) -> subprocess.CompletedProcess:
        """`wrenn ARGS` over this control plane's API, as `key`."""
        env = dict(os.environ, WRENN_API_URL=self.api_url, WRENN_API_KEY=key)
        return subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=60, check=check,
            env=env,
        )

    def new_team_key(self, team: str) -> str:
        return self.key_cli_json("create", "--team", team)["key"]

    def stop(self):
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def wrenn():
    binary = os.environ.get("WRENN_BIN")
    if not binary:
        missing_prerequisite("the platform tests", "WRENN_BIN is not set (scripts/test.sh sets it)")
    instance = Wrenn(binary)
    os.environ["E2B_API_URL"] = instance.api_url
    os.environ["E2B_SANDBOX_URL"] = instance.proxy_url
    os.environ["E2B_API_KEY"] = instance.key
    os.environ.pop("E2B_DEBUG", None)
    try:
        yield instance
    finally:
        instance.stop()
        leftovers = subprocess.run(
            ["pgrep", "-f", f"qemu-system.*{instance.data}"], capture_output=True
        )
        # The data directory holds a template's disks (about 700 MiB): a run that kept it would
        # fill the disk after a few dozen sessions.
        shutil.rmtree(instance.data, ignore_errors=True)
    assert leftovers.stdout == b"", f"QEMU processes left: {leftovers.stdout!r}"
