"""The held-out set: the tasks the gate measures every version on, and nothing else sees.

It is fixed for the life of a deployment (an environment, a difficulty, a count and a seed; a
task set; or a task file), so every version is measured on the same tasks. The gate evaluates
it; the feeder reads the same settings to keep these tasks off ``tasks`` (by task id, and by
prompt for task sets), so no held-out task is ever generated on or trained on.
"""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas import Task
from services.envs.base import get
from services.envs.reference import load_task_file
from services.envs.tasksets import TaskSetSpec, load


class HeldOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: str = "arithmetic"
    difficulty: float | None = Field(default=None, description="None: the env's default mix.")
    count: int = Field(default=100, ge=1)
    seed: int = 20261125
    taskset: TaskSetSpec | None = Field(default=None, description="A task set instead of env "
                                        "(for example the held-out file of `flywheel tasks "
                                        "split`).")
    tasks_file: Path | None = Field(default=None, description="JSONL tasks instead of env "
                                    "(the `flywheel tasks seed --file` format).")
    max_tokens: int = Field(default=16, ge=1)
    max_turns: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> HeldOut:
        if self.taskset is not None and self.tasks_file is not None:
            raise ValueError("held_out: set taskset or tasks_file, not both")
        return self

    def tasks(self) -> list[Task]:
        if self.taskset is not None:
            return load(self.taskset)
        if self.tasks_file is not None:
            return load_task_file(self.tasks_file)
        return get(self.env).tasks(self.count, rng=random.Random(self.seed),
                                   difficulty=self.difficulty)
