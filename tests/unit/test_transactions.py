"""The guard around transactional calls: a call stuck past its own timeout (librdkafka #5456)
gives the producer up instead of holding the service forever. (The broker-outage recovery that
relies on it runs against a real broker in tests/faults.)"""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from services.common import transactions
from services.common.config import RuntimeSettings
from services.common.errors import FatalRuntimeError
from services.common.transactions import Transactions


@pytest.fixture
def txn(monkeypatch: pytest.MonkeyPatch) -> Transactions:
    monkeypatch.setattr(transactions, "WEDGED_AFTER_SECONDS", 0.3)
    monkeypatch.setattr(transactions, "WEDGED", [])
    # A producer that never connects: the calls under test are stand-ins for its methods.
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0})  # no broker: quiet
    return Transactions(producer, RuntimeSettings(), "test")


def test_a_call_stuck_past_its_timeout_wedges_the_producer(txn: Transactions) -> None:
    release = threading.Event()
    calls: list[float] = []

    def stuck(timeout: float) -> None:
        calls.append(timeout)
        release.wait(30)

    with pytest.raises(FatalRuntimeError, match="blocked"):
        txn.bounded(stuck, patience=5)
    assert txn.wedged and [txn.producer] == transactions.WEDGED
    assert len(calls) == 1 and calls[0] <= 1.0  # short slices
    with pytest.raises(FatalRuntimeError, match="wedged"):  # never called again
        txn.bounded(stuck)
    assert len(calls) == 1
    release.set()
    txn.close()  # the stuck helper is left alone, not joined


def test_retriable_errors_are_retried_until_patience_then_raised(txn: Transactions) -> None:
    calls: list[float] = []

    def busy(timeout: float) -> None:
        calls.append(timeout)
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "busy", retriable=True))

    with pytest.raises(KafkaException):
        txn.bounded(busy, patience=0.5)
    assert len(calls) > 1 and not txn.wedged

    done: list[float] = []
    txn.bounded(done.append)
    assert len(done) == 1
    txn.close()
