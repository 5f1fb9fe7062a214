"""Running episodes: every sample of every task in a batch, advanced in lockstep.

Each turn, the prompts of all unfinished episodes go to the engine in one call (vLLM batches
them continuously); each completion becomes an assistant turn carrying its token ids and
sampler log-probs; the environment answers or ends the episode. Single-turn tasks finish after
one round, multi-turn episodes go on until their environment says done or ``max_turns``.

Determinism: a trajectory's id, its group id and its sampling seeds derive from the task
record's ``event_id``, the sample index and the policy version. Generating the same batch again
(an aborted transaction, a restart) gives the same trajectories with the same ids, so
downstream stages drop any repeat by id.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas import SamplingParams, Task, Timings, Trajectory, Turn
from services import envs
from services.models.engines import Completion, Engine, render

NAMESPACE = uuid.UUID("8b0e0f5e-2f6c-4f4e-9a55-3c1f7d2a9e41")
"""Fixed namespace for the uuid5 ids of groups and trajectories."""


@dataclass(frozen=True)
class ModelVersion:
    """The weights a generator serves (the RL policy): model name and promoted version."""

    model: str
    version: int


@dataclass
class _Episode:
    task: Task
    env: envs.Environment
    sample_index: int
    turns: list[Turn]
    seed: int
    prompt_ids: list[int] | None = None
    last: Completion | None = None
    assistant_turns: int = 0
    generation_seconds: float = 0.0
    env_seconds: float = 0.0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def group_id(task: Task, model: ModelVersion) -> str:
    return str(uuid.uuid5(NAMESPACE, f"group:{task.event_id}:{model.model}:{model.version}"))


def trajectory_id(task: Task, sample_index: int, model: ModelVersion) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"traj:{task.event_id}:{sample_index}:{model.model}:"
                                 f"{model.version}")


def run_episodes(
    engine: Engine, tokenizer: Any, tasks: Sequence[Task], *, samples: int,
    sampling: SamplingParams, model: ModelVersion, max_turns: int = 8,
) -> list[Trajectory]:
    """``samples`` trajectories per task, in task order then sample order."""
    environments: dict[str, envs.Environment] = {}
    episodes = []
    for task in tasks:
        env = environments.get(task.env) or environments.setdefault(task.env, envs.get(task.env))
        for i in range(samples):
            seed = zlib.crc32(f"{task.event_id}:{i}:{model.version}".encode())
            episodes.append(_Episode(task, env, i, env.initial_turns(task), seed))
    active = episodes
    while active:
        prompts = [render(tokenizer, ep.turns) for ep in active]
        # Seeds differ per turn, so a repeated observation does not repeat the same sample.
        seeds = [(ep.seed + 7919 * ep.assistant_turns) % 2**31 for ep in active]
        started = time.perf_counter()
        completions = engine.generate(prompts, sampling, seeds)
        share = (time.perf_counter() - started) / len(active)
        still = []
        for ep, prompt, completion in zip(active, prompts, completions, strict=True):
            ep.generation_seconds += share
            if ep.prompt_ids is None:
                ep.prompt_ids = prompt
            ep.last = completion
            ep.assistant_turns += 1
            ep.turns.append(Turn(role="assistant", content=completion.text,
                                 token_ids=completion.token_ids, logprobs=completion.logprobs))
            env_started = time.perf_counter()
            step = ep.env.step(ep.task, ep.turns)
            ep.env_seconds += time.perf_counter() - env_started
            if not step.done and step.reply is not None and ep.assistant_turns < max_turns:
                ep.turns.append(step.reply)
                still.append(ep)
        active = still
    return [_trajectory(ep, samples, sampling, model) for ep in episodes]


def _trajectory(ep: _Episode, samples: int, sampling: SamplingParams, model: ModelVersion
                ) -> Trajectory:
    assert ep.last is not None
    now = datetime.now(UTC)
    return Trajectory(
        event_id=trajectory_id(ep.task, ep.sample_index, model),
        task=ep.task,
        group_id=group_id(ep.task, model),
        sample_index=ep.sample_index,
        group_size=samples,
        turns=ep.turns,
        completion=ep.last.text,
        prompt_token_ids=ep.prompt_ids,
        completion_token_ids=ep.last.token_ids,
        completion_logprobs=ep.last.logprobs,
        finish_reason=ep.last.finish_reason,
        policy_version=model.version,
        model=model.model,
        sampling=sampling.model_copy(update={"n": samples, "seed": ep.seed}),
        timings=Timings(
            started_at=ep.started_at, finished_at=now,
            queue_seconds=max(0.0, (ep.started_at - ep.task.created_at).total_seconds()),
            generation_seconds=ep.generation_seconds, env_seconds=ep.env_seconds,
        ),
    )
