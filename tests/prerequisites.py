"""What the Python suites (tests/sdk, tests/platform) do when a test's prerequisite is missing:
the same as `wrenn_testkit::missing_prerequisite` in the Rust tests. Each suite's conftest puts
this directory on `sys.path`."""

import os

import pytest


def missing_prerequisite(what: str, reason: str) -> None:
    """Fails the running test when `WRENN_REQUIRE_PREREQUISITES=1` (scripts/test.sh, so CI, sets
    it), else skips it, saying what it needs."""
    message = f"{what}: {reason}"
    if os.environ.get("WRENN_REQUIRE_PREREQUISITES") == "1":
        pytest.fail(f"prerequisite missing for {message} (WRENN_REQUIRE_PREREQUISITES=1)", pytrace=False)
    pytest.skip(message)
