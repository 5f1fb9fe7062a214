"""Fixtures. Integration tests share one real Kafka broker per session.

The broker comes from ``FLYWHEEL_TEST_BOOTSTRAP`` if set (an existing cluster), otherwise it is
started from the jars ``flywheel kafka install`` put in the cache (installed here if missing),
in a temporary folder on a free port, and stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common import broker as local_kafka
from tests.kafka import Broker


@pytest.fixture(scope="session")
def kafka() -> Iterator[Broker]:
    existing = os.environ.get("FLYWHEEL_TEST_BOOTSTRAP")
    if existing:
        yield Broker(existing)
        return
    with local_kafka.temporary() as broker:
        yield Broker(broker.bootstrap)


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
