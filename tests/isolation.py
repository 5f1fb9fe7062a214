"""Tests of the code sandbox need what isolates it (root, for the uid drop; namespaces;
seccomp). Missing, they fail with what is missing, unless the run waives it."""

from __future__ import annotations

import os

import pytest

WAIVER = "FLYWHEEL_TEST_UNISOLATED"
"""Set to 1 to run the sandbox's tests where it cannot isolate (not root): they then check
less, and say so as skips with the reason, instead of failing."""


def waived() -> bool:
    return os.environ.get(WAIVER) == "1"


def require(what: str, present: bool) -> None:
    """Fail where the isolation ``what`` is missing, unless the run waived it (then skip,
    with the reason in the summary): never a silent pass without it."""
    if present:
        return
    if waived():
        pytest.skip(f"{what}: waived by {WAIVER}=1")
    pytest.fail(f"{what}. The code sandbox's tests run as root (as `make test` in CI does); "
                f"set {WAIVER}=1 to run them without it", pytrace=False)
