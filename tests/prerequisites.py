"""What the Python suites (tests/sdk, tests/platform, tests/extension) share: what they do when a
test's prerequisite is missing (the same as `wrenn_testkit::missing_prerequisite` in the Rust
tests), and `free_port` (as `wrenn_testkit::free_port`). Each suite's conftest puts this
directory on `sys.path`."""

import os
import socket

import pytest


def missing_prerequisite(what: str, reason: str) -> None:
    """Fails the running test when `WRENN_REQUIRE_PREREQUISITES=1` (scripts/test.sh, so CI, sets
    it), else skips it, saying what it needs."""
    message = f"{what}: {reason}"
    if os.environ.get("WRENN_REQUIRE_PREREQUISITES") == "1":
        pytest.fail(f"prerequisite missing for {message} (WRENN_REQUIRE_PREREQUISITES=1)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range (32768 and up), so that no
    outgoing connection made beside the test takes it before the server binds it."""
    import random
    for _ in range(1000):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000..32000")
