"""Where a batch's records go: its outputs, its dead letters and its state changes, handed to
one producer, and the topics they go to checked before the first record is."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import KafkaException, Producer

from services.common.batches import Encoded
from services.common.config import ServiceSettings
from services.common.dlq import DeadLetter
from services.common.errors import FatalRuntimeError
from services.common.produce import produce_when_room


class OutputWriter:
    def __init__(self, producer: Producer, settings: ServiceSettings, dlq_topic: str,
                 changelog_topic: str | None = None, *, known: set[str] | None = None) -> None:
        self.producer = producer
        self.settings = settings
        self.dlq_topic = dlq_topic
        self.changelog_topic = changelog_topic
        self.known: set[str] = set() if known is None else known
        """Topics checked to exist (added to as they are)."""

    def require(self, topic: str) -> None:
        """Fail fast on a topic that does not exist: librdkafka would only fail its records
        after a metadata timeout, and every transaction holding them would abort."""
        try:
            meta = self.producer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as exc:
            raise FatalRuntimeError(f"cannot look up topic {topic!r}: {exc.args[0]}") from exc
        if meta is None or meta.error is not None:
            why = meta.error if meta is not None else "no metadata"
            raise FatalRuntimeError(
                f"topic {topic!r} is not available ({why}); create the topics with "
                "`flywheel topics apply`"
            )
        self.known.add(topic)

    def require_changelog(self, input_topics: list[str]) -> None:
        """The changelog must exist and have a partition for every input partition: the state
        of input partition p is written to its partition p."""
        topic = self.changelog_topic
        assert topic is not None
        self.require(topic)
        meta = self.producer.list_topics(timeout=10).topics
        need = max((len(meta[t].partitions) for t in input_topics if t in meta), default=0)
        have = len(meta[topic].partitions)
        if have < need:
            raise FatalRuntimeError(
                f"state changelog {topic!r} has {have} partitions but the input has {need}; "
                "give it as many (deploy/topics.yaml) and `flywheel topics apply`")

    def produce(
        self, encoded: list[Encoded], dead: list[DeadLetter],
        state: Sequence[tuple[int, str, bytes | None]] = (),
    ) -> None:
        """Hand every output, dead letter and state change to the producer. The per-record
        hot path: no per-record headers (a topic's message type is fixed, see
        ``schemas.messages``)."""
        producer = self.producer
        produce = producer.produce
        if state:
            changelog = self.changelog_topic
            assert changelog is not None
            for partition, state_key, value in state:
                produce_when_room(producer, changelog, value, state_key, partition=partition)
        for topic, key, data in encoded:
            try:  # the hot path: one call, the helper only when the queue is full
                produce(topic, data, key)
            except BufferError:
                produce_when_room(producer, topic, data, key)
        produce_dead_letters(producer, self.settings, self.dlq_topic, dead)


def produce_dead_letters(producer: Producer, settings: ServiceSettings, topic: str,
                         dead: Sequence[DeadLetter]) -> None:
    """Each dead letter, with its headers, to ``topic`` (inside the caller's transaction)."""
    limit = settings.runtime.max_record_bytes
    for d in dead:
        headers = d.record_headers(settings.service, settings.instance_id)
        value = d.value
        if value is not None and len(value) > limit:
            # Too large to carry: the headers say where the original still is.
            headers.append(("flywheel-value-omitted", f"{len(value)} bytes".encode()))
            value = None
        produce_when_room(producer, topic, value, d.key, headers=headers)
