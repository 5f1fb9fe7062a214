"""The services of the flywheel, in flow order, written once: ``flywheel up`` and its profile,
replay, the deployment tests and the CLI read them from here.

A service's modules are imported only when asked for (``settings_class``, ``run``): some pull
in torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Service:
    name: str
    settings: str
    """``module:Class`` of its settings."""
    entry: str
    """``module:function`` that serves it: ``run(settings, ...) -> exit code``."""
    policy_field: str | None = None
    """The setting naming its YAML policy or config file, if it has one."""
    reads: str | None = None
    """The topic a replayable stream stage reads (it can be re-run over history)."""
    writes: tuple[str, ...] = ()
    """What such a stage writes: outputs, state changelog, dead letters."""
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
    Service("feeder", "services.feeder.main:FeederSettings", "services.feeder.main:run"),
    Service("generator", "services.generator.main:GeneratorSettings",
            "services.generator.main:run"),
    Service("scorer", "services.scorer.main:ScorerSettings", "services.scorer.main:run",
            policy_field="config_file", reads="raw", writes=("scored", "dlq")),
    Service("filter", "services.filter.main:FilterSettings", "services.filter.main:run",
            policy_field="policy_file", reads="scored",
            writes=("filtered", "rejected", "filter.state", "dlq"), follows_checkpoints=True),
    Service("router", "services.router.main:RouterSettings", "services.router.main:run",
            policy_field="policy_file", reads="filtered",
            writes=("accepted.cpt", "accepted.sft", "accepted.rl", "router.state", "dlq")),
    Service("trainer", "services.trainer.settings:TrainerSettings", "services.trainer.main:run"),
    Service("gate", "services.gate.main:GateSettings", "services.gate.main:run"),
)}
"""Every service ``flywheel up`` runs, in flow order (the relay is a tool, not a service)."""

REPLAYABLE: tuple[str, ...] = tuple(name for name, s in SERVICES.items() if s.reads)
"""The stream stages a replay can chain, in flow order."""
