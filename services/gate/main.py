"""``flywheel run gate``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.config import RuntimeSettings, ServiceSettings
from services.common.service import serve
from services.common.state import StateStore
from services.envs.heldout import HeldOut
from services.gate.evaluate import evaluate
from services.gate.stage import GateStage


class GateRuntimeSettings(RuntimeSettings):
    # One candidate per transaction, and evaluating one may take minutes on a real model.
    batch_max_records: int = Field(default=1, ge=1, le=100_000)
    transaction_timeout_ms: int = Field(default=900_000, ge=1_000, le=900_000)
    max_poll_interval_ms: int = Field(default=1_800_000, ge=10_000)


class GateSettings(ServiceSettings):
    service: str = "gate"
    model_name: str = Field(default="policy")
    base_model_path: Path = Field(description="The base model: the reference before any "
                                  "promotion.")
    base_version: int = Field(default=0, ge=0)
    checkpoint_root: Path = Field(default=Path(".flywheel/checkpoints"),
                                  description="Candidates are loaded only from inside it.")
    held_out: HeldOut = Field(default_factory=HeldOut)
    tracked: list[str] = Field(default_factory=lambda: ["pass_rate"], min_length=1)
    tolerance: float = Field(default=0.02, ge=0, description="Allowed drop per metric.")
    min_improvement: float = Field(default=0.0, ge=0, description="Over the base model.")
    runtime: GateRuntimeSettings = Field(default_factory=GateRuntimeSettings)


def build_stage(settings: GateSettings) -> GateStage:
    tasks = settings.held_out.tasks()
    return GateStage(
        state=StateStore(settings.topic("gate.state")), output_topic=settings.topic("checkpoints"),
        root=settings.checkpoint_root,
        evaluate=lambda folder: evaluate(folder, settings.held_out, tasks),
        base={settings.model_name: (settings.base_version, settings.base_model_path)},
        tracked=settings.tracked, tolerance=settings.tolerance,
        min_improvement=settings.min_improvement, service=settings.service)


def run(settings: GateSettings) -> int:
    return serve(settings, build_stage(settings), [settings.topic("checkpoints")])
