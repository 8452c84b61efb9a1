"""Starts `wrenn-allowlist server` (wrenn's control plane with the example extension of
examples/template-allowlist, no host) and points the real `e2b` SDK at it. No VM is needed:
the extension's refusal comes before placement."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

# tests/prerequisites.py, shared with the other suites.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from prerequisites import free_port  # noqa: E402


class Server:
    def __init__(self, binary: str):
        self.data = tempfile.mkdtemp(prefix="wrenn-allowlist-")
        self.api_port = free_port()
        self.lists_file = os.path.join(self.data, "template-allowlist.json")
        self.log = open(os.path.join(self.data, "server.log"), "wb")
        env = dict(os.environ, WRENN_ALLOWLIST_FILE=self.lists_file)
        env.pop("DATABASE_URL", None)
        self.process = subprocess.Popen(
            [
                binary, "server", "--data-dir", self.data,
                "--api-listen", f"127.0.0.1:{self.api_port}",
                "--proxy-listen", f"127.0.0.1:{free_port()}",
            ],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self.url = f"http://127.0.0.1:{self.api_port}"
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"wrenn-allowlist exited: {self.output()}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"wrenn-allowlist did not serve: {self.output()}")
                time.sleep(0.1)
        with open(os.path.join(self.data, "cp", "initial-api-key")) as f:
            self.key = f.read().strip()

    def output(self) -> str:
        with open(os.path.join(self.data, "server.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    binary = os.environ.get("WRENN_ALLOWLIST_BIN")
    if not binary:
        pytest.fail("WRENN_ALLOWLIST_BIN must name the built wrenn-allowlist binary")
    started = Server(binary)
    yield started
    code = started.process.poll()
    started.stop()
    assert code is None, f"the server died during the tests: {code}"
