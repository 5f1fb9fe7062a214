"""The feeder's settings (``FLYWHEEL_*``): where tasks come from and how many wait."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from services.common.config import ServiceSettings
from services.envs.heldout import HeldOut, Suite, suite
from services.envs.tasksets import TaskSetSpec
from services.feeder.level_curriculum import CurriculumSettings
from services.feeder.task_curriculum import TaskCurriculumSettings


class FeederSettings(ServiceSettings):
    service: str = "feeder"
    env: str = Field(default="arithmetic", description="Environment the tasks come from, "
                     "when there are no task sets.")
    tasksets: list[TaskSetSpec] = Field(default_factory=list, description="The user's task "
                                        "files; when set, tasks come from them, not env.")
    held_out: Suite | None = Field(default=None, description="The gate's held-out suite "
                                   "(the same settings): none of its tasks is published.")
    difficulty: float | None = Field(default=None, description="None: the environment's mix.")
    target_backlog: int = Field(default=512, ge=1, description="Tasks kept waiting.")
    interval_seconds: float = Field(default=1.0, gt=0, le=300)
    generator_group: str | None = Field(
        default=None, description="Consumer group whose progress defines the backlog; "
        "defaults to the generators' group '<prefix>generator'.",
    )
    seed: int | None = Field(default=None, description="Task RNG seed, for reproducible runs.")
    curriculum: CurriculumSettings = Field(default_factory=CurriculumSettings,
                                           description="Difficulty levels (environments).")
    task_curriculum: TaskCurriculumSettings = Field(
        default_factory=TaskCurriculumSettings, description="Per task (task sets).")

    @model_validator(mode="after")
    def _distinct_sets(self) -> FeederSettings:
        names = [s.name for s in self.tasksets]
        if len(set(names)) != len(names):
            raise ValueError("tasksets: names must be distinct")
        return self


def held_out_sets(gate: dict[str, Any] | None = None) -> list[HeldOut]:
    """The gate's held-out suite for a tool that writes tasks or training data (``tasks
    seed``, ``replay --into-live``): a profile's ``gate`` section, as ``flywheel up`` gives it
    to the feeder; else the feeder's (``FLYWHEEL_HELD_OUT``); else the gate's default suite."""
    if gate is not None:
        sets = FeederSettings(held_out=gate.get("held_out", {})).held_out
    else:
        sets = FeederSettings().held_out
    return sets or suite(None)
