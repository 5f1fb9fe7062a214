"""Hot reload: follow ``checkpoints``, verify promoted checkpoints, swap weights between batches.

The follower thread reads every checkpoint event; the reloader ignores all but ``promoted``
events of its model newer than what it serves, verifies them (``checkpoint.verify`` plus an
architecture check against the served model) away from the serving path, and keeps the newest
verified one pending. The serving loop calls ``apply_pending()`` between batches, so no request
is in flight during the swap and every trajectory carries the version that produced it.
A refused checkpoint is logged with its reason and counted; the current version keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from schemas import CheckpointEvent
from services.common.config import KafkaSettings
from services.common.errors import FatalRuntimeError
from services.generator.checkpoint import CheckpointRefused, verify
from services.generator.engines import Engine
from services.generator.episodes import Policy

log = logging.getLogger(__name__)

POLICY_VERSION = Gauge("flywheel_generator_policy_version", "Promoted version being served.")
RELOAD_SECONDS = Histogram(
    "flywheel_generator_reload_seconds", "Time to swap weights into the engine.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RELOAD_REFUSALS = Counter(
    "flywheel_generator_reload_refusals_total", "Checkpoints refused, by reason.", ["reason"]
)

ARCHITECTURE_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "intermediate_size")


class Reloader:
    """What the generator serves, and the next verified checkpoint waiting to be loaded."""

    def __init__(self, engine: Engine, root: Path, policy: Policy, served: Path) -> None:
        self.engine, self.root = engine, root
        self.policy = policy
        self.served = served
        self._architecture = _architecture(served)
        self._pending: tuple[int, Path] | None = None
        self._lock = threading.Lock()
        POLICY_VERSION.set(policy.version)

    def offer(self, event: CheckpointEvent) -> None:
        """Consider one checkpoint event; safe from any thread."""
        if event.status != "promoted" or event.model != self.policy.model:
            return
        with self._lock:
            newest = self._pending[0] if self._pending else self.policy.version
        if event.version <= newest:
            return
        try:
            folder = verify(event, self.root)
            if _architecture(folder) != self._architecture:
                raise CheckpointRefused("incompatible", "its config differs from the served "
                                                        "model's architecture")
        except CheckpointRefused as exc:
            RELOAD_REFUSALS.labels(exc.reason).inc()
            log.error("refused %s v%d (%s); still serving v%d", event.model, event.version, exc,
                      self.policy.version)
            return
        with self._lock:
            if self._pending is None or event.version > self._pending[0]:
                self._pending = (event.version, folder)

    def apply_pending(self) -> bool:
        """Load the newest verified checkpoint, if any; call only between batches."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        version, folder = pending
        started = time.perf_counter()
        try:
            self.engine.reload(folder)
        except Exception as exc:
            # A partial load must not keep serving: put the previous weights back.
            self.engine.reload(self.served)
            RELOAD_REFUSALS.labels("load_failed").inc()
            log.error("loading v%d failed (%s: %s); restored v%d", version, type(exc).__name__,
                      exc, self.policy.version)
            return False
        seconds = time.perf_counter() - started
        RELOAD_SECONDS.observe(seconds)
        self.policy, self.served = Policy(self.policy.model, version), folder
        POLICY_VERSION.set(version)
        log.info("now serving %s v%d (reload %.1f ms)", self.policy.model, version, 1e3 * seconds)
        return True


class CheckpointFollower:
    """Reads the whole ``checkpoints`` topic and keeps following it, offering every event."""

    def __init__(self, kafka: KafkaSettings, topic: str, reloader: Reloader) -> None:
        self.topic, self.reloader = topic, reloader
        self._consumer = Consumer(kafka.client_config() | {
            # Not a member of any real group: it reads everything, commits nothing.
            "group.id": f"checkpoint-follower-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "isolation.level": "read_committed",
        })
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise FatalRuntimeError(f"topic {topic!r} is not available; `flywheel topics apply`")
        self._partitions = sorted(meta.partitions)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                               for p in self._partitions])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="checkpoint-follower",
                                        daemon=True)

    def catch_up(self, timeout: float = 60.0) -> None:
        """Read up to the end of the topic as it is now (a late generator's first step)."""
        ends = {p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                        timeout=10, cached=False)[1]
                for p in self._partitions}
        deadline = time.monotonic() + timeout
        while True:
            positions = self._consumer.position([TopicPartition(self.topic, p)
                                                 for p in self._partitions])
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0
                   for tp in positions):
                return
            if time.monotonic() > deadline:
                raise FatalRuntimeError(f"could not read {self.topic} to its end in time")
            self._poll_once(0.5)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._consumer.close()

    def _follow(self) -> None:
        while not self._stop.is_set():
            self._poll_once(0.5)

    def _poll_once(self, timeout: float) -> None:
        msg = self._consumer.poll(timeout)
        if msg is None:
            return
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("checkpoint follower: %s", err)
            return
        try:
            event = CheckpointEvent.from_bytes(msg.value() or b"")
        except ValidationError as exc:
            RELOAD_REFUSALS.labels("invalid_event").inc()
            log.error("invalid checkpoint event at %s[%s]@%s: %s", msg.topic(), msg.partition(),
                      msg.offset(), exc.errors(include_url=False)[:3])
            return
        self.reloader.offer(event)


def _architecture(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointRefused("incompatible", f"unreadable config.json: {exc}") from exc
    return {k: config.get(k) for k in ARCHITECTURE_KEYS}
