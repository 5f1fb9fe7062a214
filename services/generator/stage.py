"""The generator's stage: tasks in, trajectories out, with the weights promoted last."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas import SamplingParams, Task
from services import envs
from services.common.stage import Output
from services.generator.metrics import (
    ENGINE_BATCH,
    GENERATION_SECONDS,
    TOKENS,
    TRAJECTORIES,
    TRAJECTORY_TOKENS,
)
from services.generator.reload import Reloader
from services.models.engines import Engine
from services.models.episodes import run_episodes


class GeneratorStage:
    """Runs ``samples`` episodes per task; swaps in a newly promoted checkpoint first."""

    input_type = Task

    def __init__(self, engine: Engine, tokenizer: Any, reloader: Reloader, output_topic: str,
                 *, samples: int, sampling: SamplingParams, max_turns: int) -> None:
        self.engine, self.tokenizer, self.reloader = engine, tokenizer, reloader
        self.output_topic, self.samples = output_topic, samples
        self.sampling, self.max_turns = sampling, max_turns

    def admit(self, task: Task) -> None:
        """A task of no registered environment cannot make an episode: refused before the
        batch is generated, so it costs no generation."""
        if task.env not in envs.names():
            raise ValueError(f"unknown environment {task.env!r}")

    def process(self, batch: Sequence[Task]) -> list[Output]:
        self.reloader.apply_pending()  # between batches: nothing is in flight
        trajectories = run_episodes(
            self.engine, self.tokenizer, batch, samples=self.samples, sampling=self.sampling,
            model=self.reloader.serving, max_turns=self.max_turns,
        )
        ENGINE_BATCH.observe(len(batch) * self.samples)
        GENERATION_SECONDS.observe(sum(t.timings.generation_seconds for t in trajectories))
        TRAJECTORIES.inc(len(trajectories))
        for t in trajectories:
            tokens = sum(len(turn.token_ids or []) for turn in t.turns
                         if turn.role == "assistant")
            TOKENS.inc(tokens)
            TRAJECTORY_TOKENS.observe(tokens)
        return [Output(self.output_topic, t) for t in trajectories]
