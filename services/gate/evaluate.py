"""Held-out evaluation: the same environments and verifiers as the flywheel, greedy decoding.

The held-out set (``services.envs.heldout``) is fixed for the life of a deployment. Metrics:
``pass_rate`` (share of tasks whose episode the environment verifies as passed) and
``mean_score`` (the environment's score, for environments with partial credit).
"""

from __future__ import annotations

from pathlib import Path

from schemas import SamplingParams, Task
from services import envs
from services.envs.heldout import HeldOut


def evaluate(folder: Path, held_out: HeldOut, tasks: list[Task] | None = None
             ) -> dict[str, float]:
    """``pass_rate`` and ``mean_score`` of the checkpoint in ``folder`` on the held-out set."""
    from services.generator.engines import TransformersEngine
    from services.generator.episodes import Policy, run_episodes

    tasks = tasks if tasks is not None else held_out.tasks()
    engine = TransformersEngine(folder)
    try:
        trajectories = run_episodes(
            engine, engine.tokenizer, tasks, samples=1,
            sampling=SamplingParams(temperature=0.0, max_tokens=held_out.max_tokens),
            policy=Policy("eval", 0), max_turns=held_out.max_turns)
    finally:
        engine.close()
    passed = scores = 0.0
    for t in trajectories:
        verdict = envs.get(t.task.env).verify(t.task, t.turns)
        passed += 1.0 if verdict.passed else 0.0
        scores += verdict.score
    n = max(1, len(trajectories))
    return {"pass_rate": passed / n, "mean_score": scores / n}
