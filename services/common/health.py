"""Is the broker there, and how far behind is this member: the liveness and lag of a loop.

Client errors arrive through librdkafka's ``error_cb`` (:meth:`BrokerHealth.on_error`); every
``lag_interval_seconds`` the loop calls :meth:`BrokerHealth.check`, which probes the broker,
refreshes the consumer lag gauges, and gives up once no broker answered for
``broker_down_seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from services.common import metrics as m
from services.common.config import ServiceSettings
from services.common.errors import AccessDenied, BrokerUnreachable, FatalRuntimeError
from services.common.offsets import positions

log = logging.getLogger(__name__)


class BrokerHealth:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.connected = False
        self._down_since: float | None = None
        self.last_outage: float | None = None
        """When (monotonic) the broker was last seen unreachable."""
        self._next = 0.0
        self._fatal: KafkaError | None = None

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb`` (runs inside consume/poll, on the loop's thread)."""
        if err.fatal() or err.code() == KafkaError._AUTHENTICATION:
            # A refused handshake (a password rotated away) does not heal by retrying.
            self._fatal = err
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.connected = False
            self._down_since = self._down_since or time.monotonic()
            self.last_outage = time.monotonic()
            log.warning("all brokers down: %s", err)
        else:
            log.warning("kafka client error: %s", err)

    def raise_if_fatal(self) -> None:
        if self._fatal is None:
            return
        if self._fatal.code() == KafkaError._AUTHENTICATION:
            raise AccessDenied(f"the cluster refused this client's credentials: {self._fatal}"
                               " (FLYWHEEL_KAFKA__SASL_USERNAME, FLYWHEEL_KAFKA__SASL_PASSWORD)")
        raise FatalRuntimeError(f"fatal Kafka client error: {self._fatal}")

    def check(self, producer: Producer, consumer: Consumer, topic: str,
              owned: set[tuple[str, int]]) -> bool:
        """When due (then True): probe the broker with a metadata request for ``topic``, and
        refresh the lag gauges of the ``owned`` partitions.

        The probe goes through the producer: on the consumer's connection it would queue
        behind the fetch long-poll (``fetch.wait.max.ms``) and stall the loop.
        """
        now = time.monotonic()
        if now < self._next:
            return False
        s = self.settings
        self._next = now + s.runtime.lag_interval_seconds
        try:
            producer.list_topics(topic, timeout=2)
        except KafkaException as exc:
            self.connected = False
            self._down_since = self._down_since or now
            self.last_outage = now
            log.warning("broker probe failed: %s", exc.args[0])
        else:
            self.connected, self._down_since = True, None
            try:
                self._update_lag(consumer, owned)
            except KafkaException as exc:  # a metric is not worth stopping for
                log.warning("could not refresh consumer lag: %s", exc.args[0])
        if self._down_since and now - self._down_since > s.runtime.broker_down_seconds:
            raise BrokerUnreachable(
                f"no broker reachable for {now - self._down_since:.0f} s "
                f"({s.kafka.bootstrap_servers})"
            )
        return True

    def _update_lag(self, consumer: Consumer, owned: set[tuple[str, int]]) -> None:
        """Lag = end of partition - position, from the watermarks the last fetch response
        carried (``cached=True``). An uncached query costs ~0.5 s per partition under
        read_committed in librdkafka, which would stall the loop."""
        if not owned:
            return
        at = positions(consumer, [TopicPartition(t, p) for t, p in sorted(owned)], timeout=2)
        svc = self.settings.service
        for (topic, partition), pos in at.items():
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                       cached=True)
            if high < 0:
                continue  # no fetch response for this partition yet
            if pos < 0:
                pos = low if low >= 0 else 0
            m.CONSUMER_LAG.labels(svc, topic, str(partition)).set(max(0, high - pos))

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        """Partitions no longer owned: their lag is someone else's to report."""
        for topic, partition in partitions:
            with contextlib.suppress(KeyError):  # no lag reported for it yet
                m.CONSUMER_LAG.remove(self.settings.service, topic, str(partition))
