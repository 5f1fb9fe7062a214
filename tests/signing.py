"""The gate's keys in tests: one pair per test session (per pytest worker), made by the
``gate_keys`` fixture (``tests/conftest.py``) and named in ``FLYWHEEL_DECISIONS__*`` as
`flywheel up` names them to its services, so every service a test starts, in its process or
a child, trusts it. Tests that plant a decision sign it with :func:`sign`."""

from __future__ import annotations

import os
from pathlib import Path

from schemas import CheckpointEvent
from services.common.signing import Signer, Verifier

KEYS = ("FLYWHEEL_DECISIONS__PUBLIC_KEY", "FLYWHEEL_DECISIONS__SIGNING_KEY")


def signer() -> Signer:
    return Signer.load(Path(os.environ[KEYS[1]]))


def sign(event: CheckpointEvent) -> CheckpointEvent:
    """``event`` as the gate would write it."""
    return signer().sign(event)


def verifier() -> Verifier:
    return Verifier.load(Path(os.environ[KEYS[0]]))


def service_env() -> dict[str, str]:
    """This process's environment without its ``FLYWHEEL_*`` settings but the gate's keys:
    a child service's base, to which a test adds its own settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") or k in KEYS}
