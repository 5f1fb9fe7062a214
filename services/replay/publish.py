"""``--into-live``: a finished replay's routed samples into the live ``accepted.*`` topics,
for the trainer.

A bounded, exactly-once stage per training stage reads ``<prefix>replay.<name>.accepted.<stage>``
and writes each sample to ``<prefix>accepted.<stage>``, stamped with the replay's name
(``RoutedSample.replay``; the trainer counts it in a candidate's provenance, so lineage and
``flywheel quarantine`` show where the data came from) and a new event id derived from the
replayed one. Its state (changelog ``<prefix>published.state``, shared by every replay)
remembers each trajectory published per (training stage, router policy hash): a sample all of
whose trajectories were published under the same stage and policy is skipped, so publishing
the same history twice, under this replay's name or another's, adds nothing the second time.
One replay publishes at a time. A sample of a task the gate holds out (any of its
trajectories', by id or prompt: :class:`~services.envs.guard.Guard`) is left out and counted:
history may predate the suite, or another suite, and the held-out tasks must never be trained on.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from schemas import RoutedSample
from services.common.config import ServiceSettings
from services.common.stage import Output
from services.common.state import PartitionState, StateStore
from services.envs.guard import Guard

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("5d0c1c52-2f7e-4b0a-9a64-3f1b7e2c9d11")
STATE = "published.state"


class PublishSettings(ServiceSettings):
    service: str = "publish"


class PublishStage:
    input_type = RoutedSample
    tick_seconds = 3600.0

    def __init__(self, name: str, live_prefix: str, state: StateStore, held_out: Guard) -> None:
        self.name = name
        self.live_prefix = live_prefix
        self.state = state
        self.guard = held_out
        self.published = 0
        self.skipped = 0
        self.held_out = 0

    def process_partition(self, state: PartitionState, batch: Sequence[RoutedSample]
                          ) -> list[Output]:
        out: list[Output] = []
        for sample in batch:
            if any(self.guard.holds(s.trajectory.task) for s in sample.samples):
                self.held_out += 1
                log.info("left out a %s sample of held-out task %s", sample.stage,
                         sample.samples[0].trajectory.task.task_id)
                continue
            keys = [f"{sample.stage}/{sample.policy_hash}/{s.trajectory.event_id}"
                    for s in sample.samples]
            if all(k in state for k in keys):
                self.skipped += 1
                continue
            for k in keys:
                state.put(k, self.name)
            live = sample.model_copy(update={
                "event_id": uuid.uuid5(NAMESPACE, f"{sample.event_id}:{sample.stage}"),
                "replay": self.name, "producer": None})
            out.append(Output(f"{self.live_prefix}accepted.{sample.stage}", live))
            self.published += 1
        return out

    def tick(self, state: PartitionState, now: float) -> list[Output]:
        return []


def publish_settings(live: ServiceSettings, name: str, stage: str,
                     bounds: dict[str, dict[int, tuple[int, int]]]) -> PublishSettings:
    """Bounded over the replay's ``accepted.<stage>``; its group and transactional id under
    the replay's prefix; its outputs (and state) under the live one."""
    prefix = f"{live.kafka.topic_prefix}replay.{name}."
    settings: Any = PublishSettings(kafka=live.kafka, metrics=live.metrics,
                                    log_level=live.log_level)
    return settings.model_copy(update={
        "runtime": settings.runtime.model_copy(update={
            "bounds": bounds, "static_membership": False, "delivery": "exactly_once",
            "group_id": f"{prefix}publish.{stage}"}),
        "instance_id": f"replay-{name}-{stage}"})
