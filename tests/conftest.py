"""Fixtures. Integration tests share one real Kafka broker per session.

The broker comes from ``FLYWHEEL_TEST_BOOTSTRAP`` if set (an existing cluster), otherwise it is
started from the jars ``flywheel kafka install`` put in the cache (installed here if missing),
in a temporary folder on a free port, and stopped at the end of the session.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.cluster import local_broker as local_kafka
from services.common.signing import DecisionKeys, create_keys
from tests.kafka import Broker
from tests.signing import KEYS


@pytest.fixture(scope="session", autouse=True)
def gate_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DecisionKeys]:
    """The gate's key pair for the session, named in ``FLYWHEEL_DECISIONS__*`` (see
    ``tests/signing.py``)."""
    private, public = create_keys(tmp_path_factory.mktemp("gate-keys"))
    saved = {k: os.environ.get(k) for k in KEYS}
    os.environ[KEYS[0]], os.environ[KEYS[1]] = str(public), str(private)
    yield DecisionKeys(public_key=public, signing_key=private)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def kafka() -> Iterator[Broker]:
    existing = os.environ.get("FLYWHEEL_TEST_BOOTSTRAP")
    if existing:
        yield Broker(existing)
        return
    with local_kafka.temporary() as broker:
        yield Broker(broker.bootstrap)


@dataclass(frozen=True)
class SecureCluster:
    """A broker with SASL_PLAINTEXT (SCRAM-SHA-512) and ACLs enforced. ``broker``'s clients
    are its admin, the only super user; each service has a SCRAM user of its own name."""

    broker: Broker
    admin: tuple[str, str] = field(repr=False)
    passwords: dict[str, str] = field(repr=False)
    """Per service (a SCRAM user of that name): its password."""

    def kafka(self, user: str | None = None, **more: Any) -> dict[str, Any]:
        """KafkaSettings fields for ``user`` (default: the admin)."""
        name = user or self.admin[0]
        password = self.admin[1] if user is None else self.passwords[user]
        return {"bootstrap_servers": self.broker.bootstrap, "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": name,
                "sasl_password": password, **more}


@pytest.fixture(scope="session")
def secure_kafka() -> Iterator[SecureCluster]:
    """A second broker of the session, started on first use: SASL and ACLs, as production
    clusters are. Passwords are fresh per session."""
    from services import registry
    from services.cluster import access

    admin = ("admin", secrets.token_urlsafe(16))
    with local_kafka.temporary(sasl=admin) as started:
        broker = Broker(started.bootstrap, started.connection(admin[1]))
        passwords = {name: secrets.token_urlsafe(16) for name in registry.SERVICES}
        access.set_users(broker.admin(), passwords)
        yield SecureCluster(broker, admin, passwords)


@pytest.fixture
def uid() -> str:
    """A short unique suffix for topic and group names, so tests never share state."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _program(name: str, package: str | None = None) -> str:
    """A program the tests run beside the project; missing is a failure, never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (tests/tools.sh), or "
                    f"install the {package or name} package yourself", pytrace=False)
    return path


@pytest.fixture(scope="session")
def kcat() -> str:
    """kcat: an independent Kafka client, to check the broker with something not ours."""
    return _program("kcat")


@pytest.fixture(scope="session")
def prometheus() -> str:
    """A real Prometheus server binary."""
    return _program("prometheus")


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool, from the same Debian package as the server: rule unit tests, config checks."""
    return _program("promtool", "prometheus")
