"""Kafka transactions: outputs and the consumed offsets become visible together or not at all.

The order, for every unit of work (a runtime batch, a trainer round):
``begin_transaction`` -> produce the outputs (and dead letters, and state changes) ->
``send_offsets_to_transaction`` (the next offset per input partition, with the consumer's
group metadata) -> ``commit_transaction``. The group metadata carries the member's
generation: a member that lost its partitions in a rebalance cannot commit offsets for them.

The ``transactional.id`` is stable per instance (per model, for the trainer): a restarted
instance calling ``init_transactions`` (:func:`~services.common.clients.transactional_producer`)
aborts its predecessor's open transaction and fences it.

A failure is either abortable (the transaction is aborted and the caller processes the work
again; after ``MAX_CONSECUTIVE_ABORTS`` in a row the cause is taken to be persistent) or not
(fatal: a fenced producer, or a call that timed out, which librdkafka keeps in progress and
which can only be resumed, not aborted; the broker aborts it after ``transaction.timeout.ms``,
or the restarted instance fences it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from services.common import metrics as m
from services.common.config import RuntimeSettings
from services.common.errors import FatalRuntimeError

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_ABORTS = 5
WEDGED_AFTER_SECONDS = 30.0
"""A transactional call still running this long after its own timeout is stuck."""
WEDGED: list[Producer] = []
"""Producers given up on while a call of theirs is stuck: kept referenced for the life of the
process, never destroyed (see :meth:`Transactions._guarded`)."""
COMMIT_PATIENCE_SECONDS = 60.0
"""How long the commit's calls (offsets, then commit) retry retriable errors. The work is done
by then; a commit that has not gone through in a minute with the broker back will not (its
group membership or producer epoch was lost in an outage), and waiting out a long
transaction timeout (the gate's) would only hold the service. The caller gives up, and a
new producer's init_transactions aborts what is left."""


class Transactions:
    """The transactional calls of one producer, each bounded and retried (see the module
    docstring for the order and the failure rules)."""

    def __init__(self, producer: Producer, runtime: RuntimeSettings, service: str,
                 stop: threading.Event | None = None) -> None:
        self.producer = producer
        self._runtime = runtime
        self._stop = stop
        self._aborts_in_a_row = 0
        self._wedged = False
        self._caller: ThreadPoolExecutor | None = None
        self._m_committed = m.TRANSACTIONS.labels(service, "committed")
        self._m_aborted = m.TRANSACTIONS.labels(service, "aborted")

    @property
    def wedged(self) -> bool:
        """A call of this producer is stuck past its timeout: the producer must not be
        called again (not even flushed or aborted); the service rebuilds its clients."""
        return self._wedged

    def begin(self) -> None:
        self.producer.begin_transaction()

    def commit(self, offsets: list[TopicPartition], consumer: Consumer) -> None:
        """``send_offsets_to_transaction`` (unless ``offsets`` is empty: work that consumed
        nothing) and ``commit_transaction``. Raises :class:`KafkaException`: hand it to
        :meth:`recover`."""
        producer = self.producer
        patience = COMMIT_PATIENCE_SECONDS
        if offsets:
            group = consumer.consumer_group_metadata()
            self.bounded(lambda t: producer.send_offsets_to_transaction(offsets, group, t),
                         patience)
        self.bounded(producer.commit_transaction, patience)
        self._aborts_in_a_row = 0
        self._m_committed.inc()

    def recover(self, exc: KafkaException) -> None:
        """After ``exc`` from a transactional call: abort the transaction, so the caller can
        process its work again; raise :class:`FatalRuntimeError` when it cannot be aborted, or
        when transactions keep aborting."""
        err: KafkaError = exc.args[0]
        if err.fatal() or not err.txn_requires_abort():
            if err.retriable():
                raise FatalRuntimeError(
                    f"transaction did not complete in time: {err}; it will be aborted by the "
                    "broker or by this instance's successor"
                ) from exc
            raise FatalRuntimeError(f"transaction failed: {err}") from exc
        self._aborts_in_a_row += 1
        if self._aborts_in_a_row > MAX_CONSECUTIVE_ABORTS:
            raise FatalRuntimeError(
                f"{self._aborts_in_a_row} transactions aborted in a row, last: {err}"
            ) from exc
        log.warning("transaction aborted, its work will be processed again: %s", err)
        self.abort()

    def abort(self) -> None:
        """``abort_transaction`` within the bounds of :meth:`bounded`; fatal if it fails."""
        try:
            self.bounded(self.producer.abort_transaction)
        except KafkaException as exc:
            raise FatalRuntimeError(f"abort_transaction failed: {exc.args[0]}") from exc
        self._m_aborted.inc()

    def bounded(self, call: Callable[[float], Any], patience: float | None = None) -> None:
        """Run a transactional call in short slices, retrying timeouts and retriable errors,
        until ``transaction_timeout_ms`` (or ``patience`` seconds, if shorter), or
        ``shutdown_timeout_seconds`` once ``stop`` (if given) is set.

        Short slices keep SIGTERM responsive: Python runs signal handlers only between calls.
        """
        rt = self._runtime
        deadline = time.monotonic() + min(rt.transaction_timeout_ms / 1000,
                                          patience if patience is not None else float("inf"))
        stop_deadline: float | None = None
        while True:
            if stop_deadline is None and self._stop is not None and self._stop.is_set():
                stop_deadline = time.monotonic() + rt.shutdown_timeout_seconds
                deadline = min(deadline, stop_deadline)
            left = deadline - time.monotonic()
            try:
                self._guarded(call, max(0.1, min(1.0, left)))
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if not err.retriable() or time.monotonic() >= deadline:
                    raise
                log.debug("transactional call retrying: %s", err)
                time.sleep(0.05)  # some retriable errors return at once

    def close(self) -> None:
        """Let the helper thread go (unless it is stuck in a wedged call)."""
        if self._caller is not None and not self._wedged:
            self._caller.shutdown(wait=True)
        self._caller = None

    def _guarded(self, call: Callable[[float], Any], timeout: float) -> None:
        """``call(timeout)`` on a helper thread, waited for ``timeout + WEDGED_AFTER_SECONDS``.

        librdkafka's ``send_offsets_to_transaction`` can block far past its timeout after a
        broker outage (librdkafka #5456, #5511: a coordinator request that is never retried).
        A call stuck that long marks the producer wedged and raises: the caller gives up on
        this producer, which is kept alive, unused (destroying it could block as well), and
        the service rebuilds its clients."""
        if self._wedged:
            raise FatalRuntimeError("the transactional producer is wedged")
        if self._caller is None:
            self._caller = ThreadPoolExecutor(1, thread_name_prefix="txn-call")
        future = self._caller.submit(call, timeout)
        try:
            future.result(timeout + WEDGED_AFTER_SECONDS)
        except FutureTimeout:
            self._wedged = True
            WEDGED.append(self.producer)
            raise FatalRuntimeError(
                f"a transactional call is blocked {WEDGED_AFTER_SECONDS:.0f} s past its "
                f"{timeout:.1f} s timeout (librdkafka #5456); giving this producer up"
            ) from None
