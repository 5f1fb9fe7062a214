"""The services of the flywheel, in flow order, written once: ``flywheel up`` and its profile,
the ``flywheel run`` commands, replay, the topic configuration (every logical topic is one a
service reads or writes) and the deployment tests read them from here.

A service's modules are imported only when asked for (``settings_class``, ``run``): some pull
in torch. This module imports nothing of the flywheel, so anything may import it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Service:
    name: str
    summary: str
    """One line for ``flywheel run NAME --help``."""
    settings: str
    """``module:Class`` of its settings."""
    entry: str
    """``module:function`` that serves it: ``run(settings, ...) -> exit code``."""
    reads: tuple[str, ...] = ()
    """Every logical topic it consumes or follows."""
    writes: tuple[str, ...] = ()
    """Every logical topic it produces to: outputs, state changelogs, dead letters."""
    watches_groups: tuple[str, ...] = ()
    """Other services' consumer groups whose committed offsets it reads (the feeder: the
    generators' progress is its backlog)."""
    consumes_in_group: bool = True
    """A member of its own consumer group (``<prefix><name>``); the feeder only follows."""
    policy_field: str | None = None
    """The setting naming its YAML policy or config file, if it has one."""
    policy_option: str = "policy"
    """The ``flywheel run`` option that sets ``policy_field``."""
    stream_input: str | None = None
    """A replayable stream stage: the topic it processes (it can be re-run over history)."""
    follows_checkpoints: bool = False
    """Its ``run`` takes ``checkpoints_topic`` (a replay points it at the live one)."""

    def settings_class(self) -> Any:
        module, name = self.settings.split(":")
        return getattr(importlib.import_module(module), name)

    def run(self, settings: Any, **kwargs: Any) -> int:
        module, name = self.entry.split(":")
        code: int = getattr(importlib.import_module(module), name)(settings, **kwargs)
        return code


SERVICES: dict[str, Service] = {s.name: s for s in (
    Service("feeder", "Keep the tasks topic topped up (FLYWHEEL_ENV, FLYWHEEL_TARGET_BACKLOG, "
            "...).", "services.feeder.settings:FeederSettings", "services.feeder.main:run",
            reads=("scored",), writes=("tasks",), watches_groups=("generator",),
            consumes_in_group=False),
    Service("generator", "Turn tasks into trajectories with the promoted model "
            "(FLYWHEEL_MODEL_PATH, ...).", "services.generator.main:GeneratorSettings",
            "services.generator.main:run", reads=("tasks", "checkpoints"),
            writes=("raw", "dlq")),
    Service("scorer", "Score raw trajectories: rewards and verdicts (raw -> scored).",
            "services.scorer.main:ScorerSettings", "services.scorer.main:run",
            reads=("raw",), writes=("scored", "dlq"), policy_field="config_file",
            policy_option="config", stream_input="raw"),
    Service("filter", "Accept or reject scored trajectories, with reasons (scored -> "
            "filtered | rejected).", "services.filter.main:FilterSettings",
            "services.filter.main:run", reads=("scored", "checkpoints"),
            writes=("filtered", "rejected", "filter.state", "dlq"),
            policy_field="policy_file", stream_input="scored", follows_checkpoints=True),
    Service("router", "Route accepted samples to CPT, SFT and RL (filtered -> accepted.*).",
            "services.router.main:RouterSettings", "services.router.main:run",
            reads=("filtered",),
            writes=("accepted.cpt", "accepted.sft", "accepted.rl", "router.state", "dlq"),
            policy_field="policy_file", stream_input="filtered"),
    Service("trainer", "Train candidates on the accepted streams (FLYWHEEL_BASE_MODEL_PATH, "
            "FLYWHEEL_QUOTAS, ...).", "services.trainer.settings:TrainerSettings",
            "services.trainer.main:run",
            reads=("accepted.cpt", "accepted.sft", "accepted.rl", "checkpoints"),
            writes=("checkpoints", "dlq")),
    Service("gate", "Evaluate candidates on held-out tasks; promote or reject "
            "(FLYWHEEL_BASE_MODEL_PATH, ...).", "services.gate.main:GateSettings",
            "services.gate.main:run", reads=("checkpoints",),
            writes=("checkpoints", "gate.state", "dlq")),
)}
"""Every service ``flywheel up`` runs, in flow order (the relay is a tool, not a service)."""

REPLAYABLE: tuple[str, ...] = tuple(name for name, s in SERVICES.items() if s.stream_input)
"""The stream stages a replay can chain, in flow order."""

TOOL_TOPICS: tuple[str, ...] = ("published.state",)
"""Topics of the tools rather than the services: what ``flywheel replay --into-live`` has
published (its deduplication state)."""

TOPICS: tuple[str, ...] = tuple(dict.fromkeys(
    [t for s in SERVICES.values() for t in (*s.writes, *s.reads)] + list(TOOL_TOPICS)))
"""Every logical topic, in flow order. A deployment prefixes all of them
(``KafkaSettings.topic_prefix``); ``deploy/topics.yaml`` must declare each."""
