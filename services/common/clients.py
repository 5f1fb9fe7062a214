"""The Kafka clients of a consumer group member that writes: one consumer, one producer.

Every service that consumes and produces (the stream runtime, the trainer) builds them here,
so the settings the delivery guarantees rest on are written once. The user's
``kafka.client_properties`` may override the tuning defaults, never those settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka import Message as KafkaMessage
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from services.common.config import ServiceSettings
from services.common.errors import AccessDenied, FatalRuntimeError

log = logging.getLogger(__name__)

CONSUMER_TUNING: dict[str, Any] = {
    # librdkafka pauses fetching a partition for fetch.queue.backoff.ms (default 1000 ms) once
    # its prefetch queue is over the thresholds below: a consumer working through a backlog
    # then idles for a second at a time (bench runtime: 50k -> 140k records/s at-least-once).
    "fetch.queue.backoff.ms": 20,
    # 16 MiB of prefetch per consumer is a full batch (batch_max_bytes) ahead; the default
    # 64 MiB only costs memory.
    "queued.max.messages.kbytes": 16384,
}
PRODUCER_TUNING: dict[str, Any] = {"linger.ms": 5}

ErrorCallback = Callable[[KafkaError], None]


def consumer_config(
    s: ServiceSettings, *, transactional: bool, error_cb: ErrorCallback | None = None,
    max_poll_interval_ms: int | None = None,
) -> dict[str, Any]:
    """A ``read_committed`` member of ``s.group_id`` that never stores an offset by itself.

    ``transactional``: offsets are committed only through the producer's transactions.
    Otherwise (at-least-once) the owner stores them once their outputs are delivered, and the
    consumer auto-commits what was stored.
    """
    common = s.kafka.client_config() | ({"error_cb": error_cb} if error_cb else {})
    conf = CONSUMER_TUNING | common | {
        "group.id": s.group_id,
        "client.id": f"{s.transactional_id}.consumer",
        "isolation.level": "read_committed",
        "auto.offset.reset": s.runtime.auto_offset_reset,
        "enable.auto.offset.store": False,
        "enable.auto.commit": not transactional,
        "auto.commit.interval.ms": 1000,
        "session.timeout.ms": s.runtime.session_timeout_ms,
        "max.poll.interval.ms": max_poll_interval_ms or s.runtime.max_poll_interval_ms,
    }
    if s.runtime.shared_bounds:
        # Replay workers join one after the other at start; a member learns of the
        # rebalance at its next heartbeat (every 3 s by default), working alone till then.
        conf["heartbeat.interval.ms"] = 200
    if s.runtime.static_membership:
        conf["group.instance.id"] = s.instance_id
    return conf


def producer_config(
    s: ServiceSettings, *, transactional_id: str | None,
    error_cb: ErrorCallback | None = None,
    on_failed_delivery: Callable[[KafkaError | None, KafkaMessage], None] | None = None,
) -> dict[str, Any]:
    """An idempotent producer, transactional when ``transactional_id`` is given.

    With ``on_failed_delivery``, only failures are reported: a transaction's commit, or an
    at-least-once flush, confirms the successes all at once.
    """
    common = s.kafka.client_config() | ({"error_cb": error_cb} if error_cb else {})
    conf = PRODUCER_TUNING | common | {
        "client.id": f"{s.transactional_id}.producer",
        # Room for the largest record the runtime lets through, plus framing.
        "message.max.bytes": s.runtime.max_record_bytes + 2**16,
        "enable.idempotence": True,
    }
    if on_failed_delivery is not None:
        conf |= {"delivery.report.only.error": True, "on_delivery": on_failed_delivery}
    if transactional_id is not None:
        conf |= {"transactional.id": transactional_id,
                 "transaction.timeout.ms": s.runtime.transaction_timeout_ms}
    return conf


def transactional_producer(conf: dict[str, Any], timeout_seconds: float) -> Producer:
    """A producer with its transactions initialised: a previous incarnation with the same
    ``transactional.id`` is fenced, and the transaction it left open aborted. An error the
    client calls retriable (``NOT_COORDINATOR`` from a broker that has just started, a
    coordinator moving) is retried until ``timeout_seconds`` have passed, as librdkafka
    allows: once a fresh broker failed a gate's start this way."""
    producer = Producer(conf)
    retrying = Retrying(
        retry=retry_if_exception(lambda e: isinstance(e, KafkaException)
                                 and e.args[0].retriable()),
        stop=stop_after_delay(timeout_seconds), wait=wait_exponential(0.1, max=2.0),
        reraise=True,
        before_sleep=lambda r: log.info("init_transactions: %s; retrying",
                                        r.outcome.exception() if r.outcome else None))
    try:
        retrying(producer.init_transactions, timeout_seconds)
    except KafkaException as exc:
        if exc.args[0].code() in (KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                                  KafkaError.CLUSTER_AUTHORIZATION_FAILED):
            raise AccessDenied(f"init_transactions refused: {exc.args[0]} (this principal "
                               f"may not use transactional id {conf['transactional.id']!r}: "
                               "`flywheel acls apply`)") from exc
        raise FatalRuntimeError(f"init_transactions failed: {exc.args[0]}") from exc
    return producer
