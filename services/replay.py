"""Replay: re-run the scorer, the filter or the router over history under a new config or
policy, without touching the live flow.

``flywheel replay filter --name relaxed --policy new.yaml [--since 2026-11-01T00:00:00Z]``
reads the live input topic (``<prefix>scored``) from the beginning, or from the first record
at or after ``--since``, up to the end offsets it had at start, and stops by itself. It writes
under its own prefix, ``<prefix>replay.<name>.`` (``...filtered``, ``...rejected``, its own
state changelog and dead-letter topic), which it creates: the live router and trainer never
see replayed decisions, and an operator compares them, or points a trainer at them, at will.
It is a consumer group of its own (``<prefix>replay.<name>.<service>``) with exactly-once
delivery, so an interrupted replay resumes where it stopped when run again with the same name.

A replayed filter starts with an empty duplicate memory and measures staleness against the
latest promoted version of today: a policy for old history usually sets ``max_staleness:
null``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

from services.common import topics as topic_ops
from services.common.config import ServiceSettings

Service = Literal["scorer", "filter", "router"]

INPUTS: dict[str, str] = {"scorer": "raw", "filter": "scored", "router": "filtered"}
OUTPUTS: dict[str, tuple[str, ...]] = {
    "scorer": ("scored", "dlq"),
    "filter": ("filtered", "rejected", "filter.state", "dlq"),
    "router": ("accepted.cpt", "accepted.sft", "accepted.rl", "router.state", "dlq"),
}


S = TypeVar("S", bound=ServiceSettings)


def replay_settings(live: S, name: str, since: datetime | None) -> S:
    """``live`` with outputs, group and transactional id under the replay's prefix, bounded to
    the input's end at start."""
    prefix = f"{live.kafka.topic_prefix}replay.{name}."
    return live.model_copy(update={
        "kafka": live.kafka.model_copy(update={"topic_prefix": prefix}),
        "runtime": live.runtime.model_copy(update={
            "until_end": True, "start_at": since, "static_membership": False,
            "delivery": "exactly_once", "group_id": None}),
        "instance_id": f"replay-{name}",
    })


def create_topics(settings: ServiceSettings, service: str) -> None:
    wanted = {settings.topic(n) for n in OUTPUTS[service]}
    specs = [s for s in topic_ops.load(prefix=settings.kafka.topic_prefix) if s.name in wanted]
    topic_ops.apply(topic_ops.admin_client(settings.kafka), specs)


def replay(service: Service, name: str, file: Path | None, since: datetime | None) -> int:
    if service == "scorer":
        from services.scorer import main as scorer

        live_s = scorer.ScorerSettings.with_overrides(config_file=file)
        out_s = replay_settings(live_s, name, since)
        create_topics(out_s, service)
        return scorer.run(out_s, input_topic=live_s.topic(INPUTS[service]))
    if service == "filter":
        from services.filter import main as filter_main

        live_f = filter_main.FilterSettings.with_overrides(policy_file=file)
        out_f = replay_settings(live_f, name, since)
        create_topics(out_f, service)
        return filter_main.run(out_f, input_topic=live_f.topic(INPUTS[service]),
                               checkpoints_topic=live_f.topic("checkpoints"))
    from services.router import main as router

    live_r = router.RouterSettings.with_overrides(policy_file=file)
    out_r = replay_settings(live_r, name, since)
    create_topics(out_r, service)
    return router.run(out_r, input_topic=live_r.topic(INPUTS[service]))
