"""Episodes on a real tiny model (transformers backend): groups, multi-turn steps, determinism."""

from __future__ import annotations

import random

import pytest
import torch  # noqa: F401  (the model extras: missing is a failure, never a skip)

from schemas import SamplingParams, Trajectory
from services import envs
from services.models.engines import TransformersEngine
from services.models.episodes import ModelVersion, run_episodes
from services.models.tiny import tiny_model

pytestmark = pytest.mark.model

SAMPLING = SamplingParams(temperature=1.0, max_tokens=6)
MODEL = ModelVersion(model="tiny", version=3)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    return TransformersEngine(tiny_model(tmp_path_factory.mktemp("m") / "v0"))


def test_groups_of_samples_per_task_are_schema_valid_and_repeatable(
    engine: TransformersEngine,
) -> None:
    tasks = envs.get("arithmetic").tasks(4, rng=random.Random(0), difficulty=2)
    trajectories = run_episodes(engine, engine.tokenizer, tasks, samples=3, sampling=SAMPLING,
                                model=MODEL)
    assert len(trajectories) == 12
    for task, group in zip(tasks, [trajectories[i:i + 3] for i in range(0, 12, 3)],
                           strict=True):
        assert {t.task.task_id for t in group} == {task.task_id}
        assert len({t.group_id for t in group}) == 1
        assert [t.sample_index for t in group] == [0, 1, 2]
    assert len({t.event_id for t in trajectories}) == 12
    assert len({t.group_id for t in trajectories}) == 4
    for t in trajectories:
        again = Trajectory.from_bytes(t.to_bytes())
        assert again == t
        assert t.policy_version == 3 and t.model == "tiny" and t.group_size == 3
        assert t.completion_token_ids and len(t.completion_logprobs or []) == len(
            t.completion_token_ids)
        assert t.prompt_token_ids and t.turns[-1].role == "assistant"
        assert t.turns[-1].content == t.completion
        assert t.timings.generation_seconds > 0
    repeat = run_episodes(engine, engine.tokenizer, tasks, samples=3, sampling=SAMPLING,
                          model=MODEL)
    assert [t.event_id for t in repeat] == [t.event_id for t in trajectories]
    assert [t.completion_token_ids for t in repeat] == [t.completion_token_ids
                                                        for t in trajectories]
    newer = run_episodes(engine, engine.tokenizer, tasks, samples=3, sampling=SAMPLING,
                         model=ModelVersion("tiny", 4))
    assert not {t.event_id for t in newer} & {t.event_id for t in trajectories}


def test_a_multi_turn_episode_keeps_every_step(engine: TransformersEngine) -> None:
    # One-token completions can name at most a one-digit number and the secret has two digits:
    # every guess is wrong, so the episode must run its whole budget (bits + 2 = 7 turns).
    rng = random.Random(1)
    task = next(t for t in iter(lambda: envs.get("guess").tasks(1, rng=rng, difficulty=5)[0], None)
                if int(t.verifier.answer) >= 10)  # type: ignore[union-attr]
    one_token = SamplingParams(temperature=1.0, max_tokens=1)
    [trajectory] = run_episodes(engine, engine.tokenizer, [task], samples=1,
                                sampling=one_token, model=MODEL)
    roles = [t.role for t in trajectory.turns]
    assistant = [t for t in trajectory.turns if t.role == "assistant"]
    assert len(assistant) == 7, roles
    assert roles == ["user"] + ["assistant", "user"] * 6 + ["assistant"]
    assert all(t.token_ids and t.logprobs and len(t.token_ids) == len(t.logprobs) == 1
               for t in assistant)
    replies = [t.content for t in trajectory.turns[2::2]]
    assert set(replies) <= {"higher", "lower", "Reply with one number."}
    assert envs.get("guess").verify(task, trajectory.turns).passed is False
