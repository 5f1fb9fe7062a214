"""The held-out suite: the tasks the gate measures every version on, and nothing else sees.

A suite is one or more named sets (per environment, difficulty or task file). Each set is
fixed for the life of a deployment (an environment, a difficulty, a count and a seed; a task
set; or a task file), so every version is measured on the same tasks. The gate evaluates the
suite; every path that writes tasks (the feeder's sources, ``flywheel tasks seed``) checks
them against the :func:`guard` of the same settings (:mod:`services.envs.guard`: by task id
and by normalized prompt), so no held-out task is generated on or trained on, whatever form
its id takes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from schemas import Task
from services.envs.base import get
from services.envs.declared import load_task_file
from services.envs.guard import Guard, distinct
from services.envs.tasksets import TaskSetSpec, load

log = logging.getLogger(__name__)

POOLED = "suite"
"""Name under which a decision carries the whole suite's pooled figures (``suite/wins``,
``suite/losses``, ``suite/p``): the gate writes them, the trainer's rollback reads them."""


def overall(metrics: dict[str, float]) -> int | None:
    """Tasks won minus tasks lost against the reference over the suite's sets (what the
    pooled test counts), from a decision's metrics; None when it carries no paired
    comparison."""
    sets = {k.rpartition("/")[0] for k in metrics if k.endswith("/wins")} - {POOLED}
    if not sets:
        return None
    return int(sum(metrics[f"{s}/wins"] - metrics.get(f"{s}/losses", 0.0) for s in sets))


class HeldOut(BaseModel):
    """One named set of the suite."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="held_out", pattern=r"^[A-Za-z0-9_.-]+$", description="Its "
                      "metrics are reported as ``<name>/pass_rate``, ``<name>/mean_score``.")
    tolerance: float | None = Field(default=None, ge=0, description="Allowed drop of this "
                                    "set's metrics; none: the gate's ``tolerance``.")
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
        """The set's tasks, each once: a repeated task (same id, or same prompt up to case and
        white space) would count as two independent pairs in the gate's sign test. Repeats are
        dropped, the first kept, with a warning naming them: an environment's ``count`` draws
        may repeat (the default suite's 100 hold 95 distinct tasks), as may a file. The draws
        stay those of the seed, so what was held out before is held out still, and nothing
        else (the seed model's data, drawn around the suite, does not change)."""
        if self.taskset is not None:
            given = load(self.taskset)
        elif self.tasks_file is not None:
            given = load_task_file(self.tasks_file)
        else:
            given = get(self.env).tasks(self.count, rng=random.Random(self.seed),
                                        difficulty=self.difficulty)
        out, repeats = distinct(given)
        if repeats:
            log.warning("held-out set %r: %d of its %d tasks repeat others and are left out: "
                        "%s%s", self.name, len(repeats), len(given), ", ".join(repeats[:10]),
                        " ..." if len(repeats) > 10 else "")
        return out

    def digest(self, tasks: list[Task]) -> str:
        """What identifies the set's content: its tasks' ids, prompts, observations and
        verifiers, in order. The gate pairs a candidate's outcomes with a reference's only on
        the same digest; a set that changed is a new set, evaluated for the reference first."""
        h = hashlib.sha256()
        for t in tasks:
            h.update(json.dumps([t.task_id, t.prompt, t.observation,
                                 t.verifier.model_dump(mode="json") if t.verifier else None],
                                sort_keys=True, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()


def suite(value: Any) -> list[HeldOut]:
    """A suite from settings: one set (a mapping or a ``HeldOut``), or a list of them, with
    distinct names."""
    if value is None:
        return [HeldOut()]
    items = value if isinstance(value, list) else [value]
    sets = [v if isinstance(v, HeldOut) else HeldOut(**v) for v in items]
    if not sets:
        raise ValueError("held_out: a suite needs at least one set")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"held_out: set names must differ, got {names}")
    return sets


def suite_tasks(sets: list[HeldOut]) -> list[Task]:
    """Every task of every set (what the feeder keeps off ``tasks``)."""
    return [t for s in sets for t in s.tasks()]


Suite = Annotated[list[HeldOut], BeforeValidator(suite)]
"""A settings field holding a suite: accepts one set or a list."""


def guard(sets: list[HeldOut] | None) -> Guard:
    """The guard of a suite's tasks (``None``: nothing held out)."""
    return Guard(suite_tasks(sets) if sets else [])


def headline(sets: list[HeldOut], name: str | None = None) -> HeldOut:
    """The set reported as plain ``pass_rate``: the one named, or the first."""
    for s in sets:
        if name is None or s.name == name:
            return s
    raise ValueError(f"headline {name!r} is not a held-out set: {[s.name for s in sets]}")


def gate_headline(gate: dict[str, Any]) -> HeldOut:
    """The headline set of a profile's ``gate`` section."""
    return headline(suite(gate.get("held_out")), gate.get("headline"))


def gate_dtype(gate: dict[str, Any]) -> Any:
    """The dtype a profile's ``gate`` evaluates in (``GateSettings.dtype``): every other
    evaluation of that suite (the bootstrap's, the bench's) uses it too."""
    return gate.get("dtype", "auto")


def gate_guard(gate: dict[str, Any]) -> Guard:
    """The guard of a profile's ``gate`` suite: what no training data may hold."""
    return guard(suite(gate.get("held_out")))
