"""Held-out evaluation: the same environments and verifiers as the flywheel, greedy decoding.

The held-out suite (``services.envs.heldout``) is fixed for the life of a deployment. Per set:
``pass_rate`` (share of tasks whose episode the environment verifies as passed), ``mean_score``
(the environment's score, for environments with partial credit) and each task's outcome, which
the gate compares task by task with the promoted version's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import SamplingParams, Task
from services import envs
from services.envs.heldout import HeldOut
from services.models.engines import HFDtype


@dataclass
class SetResult:
    """One set's metrics and per-task outcomes (1: passed), in the set's task order."""

    metrics: dict[str, float]
    outcomes: list[int] = field(default_factory=list)


def evaluate(folder: Path, held_out: HeldOut, tasks: list[Task] | None = None, *,
             dtype: HFDtype = "float32") -> dict[str, float]:
    """``pass_rate`` and ``mean_score`` of the checkpoint in ``folder`` on one set."""
    return evaluate_suite(folder, [held_out], None if tasks is None else [tasks],
                          dtype=dtype)[held_out.name].metrics


def evaluate_suite(folder: Path, sets: list[HeldOut], tasks: list[list[Task]] | None = None,
                   *, dtype: HFDtype = "float32", interrupt: threading.Event | None = None
                   ) -> dict[str, SetResult]:
    """Every set of the suite, by name, with one load of the checkpoint (weights in
    ``dtype``). Once ``interrupt`` is set, raises Interrupted at the next token."""
    from services.models.engines import TransformersEngine

    engine = TransformersEngine(folder, dtype=dtype, interrupt=interrupt)
    try:
        return {s.name: _run(engine, s, tasks[i] if tasks is not None else s.tasks())
                for i, s in enumerate(sets)}
    finally:
        engine.close()


def _run(engine: Any, held_out: HeldOut, tasks: list[Task]) -> SetResult:
    from services.models.episodes import ModelVersion, run_episodes

    trajectories = run_episodes(
        engine, engine.tokenizer, tasks, samples=1,
        sampling=SamplingParams(temperature=0.0, max_tokens=held_out.max_tokens),
        model=ModelVersion("eval", 0), max_turns=held_out.max_turns)
    outcomes: list[int] = []
    scores = 0.0
    for t in trajectories:  # in task order, one each
        verdict = envs.get(t.task.env).verify(t.task, t.turns)
        outcomes.append(1 if verdict.passed else 0)
        scores += verdict.score
    n = max(1, len(tasks))
    return SetResult({"pass_rate": sum(outcomes) / n, "mean_score": scores / n}, outcomes)
