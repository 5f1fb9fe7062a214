"""Following the ``checkpoints`` topic: what generators reload from and the filter measures
staleness against."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from confluent_kafka import Message as KafkaMessage
from pydantic import ValidationError

from schemas import CheckpointEvent
from services.common.config import KafkaSettings
from services.common.follower import TopicFollower
from services.common.metrics import CHECKPOINT_EVENTS_REFUSED
from services.common.signing import Unsigned, Verifier

log = logging.getLogger(__name__)


class Listener(Protocol):
    def offer(self, event: CheckpointEvent) -> None:
        """Called from the follower's thread for every valid event, in topic order."""


class LatestPromoted:
    """The newest promoted version per model: the filter's reference for staleness."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def offer(self, event: CheckpointEvent) -> None:
        if event.status != "promoted":
            return
        with self._lock:
            if event.version > self._versions.get(event.model, -1):
                self._versions[event.model] = event.version

    def get(self, model: str) -> int | None:
        with self._lock:
            return self._versions.get(model)


class CheckpointFollower(TopicFollower):
    """Reads the whole ``checkpoints`` topic and keeps following it, offering every valid
    event to ``listener`` (see :class:`~services.common.follower.TopicFollower`): candidates,
    and the decisions ``verifier`` finds signed by the gate. ``on_invalid`` hears the reason
    of each event dropped (``invalid_event``, ``unsigned``)."""

    def __init__(self, kafka: KafkaSettings, topic: str, listener: Listener, *,
                 verifier: Verifier,
                 on_invalid: Callable[[str], None] | None = None) -> None:
        super().__init__(kafka, topic, self._offer, name="checkpoint-follower")
        self.listener, self.verifier, self.on_invalid = listener, verifier, on_invalid

    def _offer(self, msg: KafkaMessage) -> None:
        try:
            event = CheckpointEvent.from_bytes(msg.value() or b"")
        except ValidationError as exc:
            self._drop("invalid_event")
            log.error("invalid checkpoint event at %s[%s]@%s: %s", msg.topic(), msg.partition(),
                      msg.offset(), exc.errors(include_url=False)[:3])
            return
        try:
            self.verifier.check(event)
        except Unsigned as exc:
            self._drop("unsigned")
            log.error("dropped a decision at %s[%s]@%s: %s", msg.topic(), msg.partition(),
                      msg.offset(), exc)
            return
        self.listener.offer(event)

    def _drop(self, reason: str) -> None:
        CHECKPOINT_EVENTS_REFUSED.labels(reason).inc()
        if self.on_invalid is not None:
            self.on_invalid(reason)
