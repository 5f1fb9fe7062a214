"""Environments: task generation, episodes, verification, the registry, task files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from schemas import Task, Turn, VerifierSpec
from services import envs
from services.common.errors import ConfigError
from services.envs.declared import load_task_file
from services.envs.verify import check


def _episode(env: envs.Environment, task: Task, answers: list[str]) -> list[Turn]:
    """Play ``answers`` as the policy until the environment ends the episode."""
    turns = env.initial_turns(task)
    for answer in answers:
        turns.append(Turn(role="assistant", content=answer))
        result = env.step(task, turns)
        if result.done:
            return turns
        assert result.reply is not None
        turns.append(result.reply)
    raise AssertionError("episode did not end")


def test_registry_knows_the_built_in_environments() -> None:
    assert {"arithmetic", "addition", "guess", "reference"} <= set(envs.names())
    with pytest.raises(ConfigError, match="unknown environment"):
        envs.get("chess")


def test_arithmetic_tasks_follow_difficulty_and_are_checked_exactly() -> None:
    env = envs.get("arithmetic")
    tasks = env.tasks(50, rng=random.Random(1), difficulty=3)
    assert all(t.difficulty == 3 and t.env == "arithmetic" for t in tasks)
    for t in tasks:
        a, b = t.prompt.rstrip("=").split("+")
        assert len(a) == 3 and len(b) == 3 and t.verifier is not None
        right, wrong = str(int(a) + int(b)), str(int(a) + int(b) + 1)
        assert env.verify(t, _episode(env, t, [right])).passed
        assert env.verify(t, _episode(env, t, [f"{right} because"])).passed
        assert not env.verify(t, _episode(env, t, [wrong])).passed
        assert not env.verify(t, _episode(env, t, ["no idea"])).passed


def test_arithmetic_is_deterministic_per_seed_and_ids_follow_content() -> None:
    a = envs.get("arithmetic").tasks(20, rng=random.Random(7))
    b = envs.get("arithmetic").tasks(20, rng=random.Random(7))
    assert [t.task_id for t in a] == [t.task_id for t in b]
    assert all(t.task_id == f"arithmetic:{t.prompt.rstrip('=')}" for t in a)


def test_addition_writes_every_number_least_significant_digit_first() -> None:
    env = envs.get("addition")
    task = env.task(123, "+", 458)  # 581
    assert task.prompt == "321+854=" and task.task_id == "addition:321+854"
    assert task.verifier is not None and task.verifier.answer == "185"
    assert env.verify(task, _episode(env, task, ["185"])).passed
    assert not env.verify(task, _episode(env, task, ["581"])).passed
    [zeros] = [env.task(500, "+", 500)]  # 1000, written 0001: the zeros are digits
    assert env.verify(zeros, _episode(env, zeros, ["0001"])).passed
    assert not env.verify(zeros, _episode(env, zeros, ["1"])).passed
    assert all(t.difficulty == 2 for t in env.tasks(20, rng=random.Random(0), difficulty=2))
    with pytest.raises(ValueError, match="addition only"):
        type(env)(operators="+*")


def test_padded_addition_gives_every_sum_up_to_four_digits_the_same_positions() -> None:
    env = envs.get("addition_padded")
    task = env.task(123, "+", 458)  # 581
    assert task.prompt == "3210+8540=" and task.task_id == "addition_padded:3210+8540"
    assert task.verifier is not None and task.verifier.answer == "18500"
    assert env.verify(task, _episode(env, task, ["18500"])).passed
    assert not env.verify(task, _episode(env, task, ["185"])).passed  # unpadded: wrong
    top = env.task(9999, "+", 9999)  # 19998: the fifth digit is the carry
    assert top.prompt == "9999+9999=" and top.verifier.answer == "89991"  # type: ignore[union-attr]
    assert len({len(t.prompt) for t in env.tasks(40, rng=random.Random(0))}) == 1
    assert env.levels == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="up to 4 digits"):
        env.task(10_000, "+", 1)


def test_guessing_is_multi_turn_with_feedback() -> None:
    env = envs.get("guess")
    [task] = env.tasks(1, rng=random.Random(3), difficulty=4)
    secret = int(task.verifier.answer)  # type: ignore[union-attr]
    low, high = 1, 16
    answers = []
    turns = env.initial_turns(task)
    while True:  # binary search, as a perfect policy would
        guess = (low + high) // 2
        answers.append(guess)
        turns.append(Turn(role="assistant", content=str(guess)))
        step = env.step(task, turns)
        if step.done:
            break
        assert step.reply is not None and step.reply.content in ("higher", "lower")
        turns.append(step.reply)
        low, high = (guess + 1, high) if step.reply.content == "higher" else (low, guess - 1)
    verdict = env.verify(task, turns)
    assert verdict.passed and answers[-1] == secret
    assert sum(t.role == "assistant" for t in turns) == len(answers) <= 4
    assert verdict.score == pytest.approx(min(1.0, 4 / len(answers)))


def test_guessing_ends_after_its_turn_budget_and_fails() -> None:
    env = envs.get("guess")
    [task] = env.tasks(1, rng=random.Random(5), difficulty=3)
    wrong = "0"
    turns = _episode(env, task, [wrong] * 10)
    assert sum(t.role == "assistant" for t in turns) == 5  # bits + 2
    assert env.verify(task, turns).passed is False


def test_declared_verifiers() -> None:
    assert check(VerifierSpec(kind="exact", answer="Paris"), " Paris ")[0]
    assert check(VerifierSpec(kind="exact", answer="Paris", params={"case_insensitive": True}),
                 "paris")[0]
    assert check(VerifierSpec(kind="numeric", answer="3.14", params={"tolerance": 0.01}),
                 "about 3.141")[0]
    assert not check(VerifierSpec(kind="numeric", answer="3.14"), "none")[0]
    assert check(VerifierSpec(kind="regex", params={"pattern": r"^\d{3}$"}), "123")[0]
    with pytest.raises(ConfigError):
        check(VerifierSpec(kind="unit_tests"), "x")


def test_task_files(tmp_path: Path) -> None:
    f = tmp_path / "tasks.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "Capital of France?", "answer": "Paris"}),
        "",
        json.dumps({"prompt": "2+2=", "env": "arithmetic", "answer": "4", "difficulty": 1}),
        json.dumps({"prompt": "pi?", "verifier": {"kind": "numeric", "answer": "3.14",
                                                  "params": {"tolerance": 0.01}}}),
    ]))
    tasks = load_task_file(f)
    assert [t.env for t in tasks] == ["reference", "arithmetic", "reference"]
    ref = envs.get("reference")
    turns = [Turn(role="user", content="pi?"), Turn(role="assistant", content="3.141")]
    assert ref.verify(tasks[2], turns).passed
    assert tasks[0].task_id == load_task_file(f)[0].task_id  # stable ids
    f.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + '{"answer": 1}\n')
    with pytest.raises(ConfigError, match=r"tasks.jsonl:2"):
        load_task_file(f)


def test_the_held_out_guard_matches_by_id_and_by_normalized_prompt(tmp_path: Path) -> None:
    """A held-out set given as a task file, and the arithmetic environment drawing the same
    questions: the ids differ in form (``held:...`` against ``arithmetic:12+34``), the prompts
    do not. The feeder's environment source used to exclude by id only."""
    from services.envs.heldout import HeldOut, guard
    from services.feeder.sources import EnvSource

    env = envs.get("arithmetic")
    drawn = env.tasks(400, rng=random.Random(3), difficulty=1)
    file = tmp_path / "held.jsonl"
    file.write_text("".join(json.dumps({"id": f"h{i}", "prompt": f"  {t.prompt.upper()}\n",
                                        "answer": "0", "env": "arithmetic"}) + "\n"
                            for i, t in enumerate(drawn[:10])), encoding="utf-8")
    held = HeldOut(name="file", tasks_file=file)
    held_out = guard([held])
    assert not held_out.ids & {t.task_id for t in drawn}  # no id in common
    assert all(held_out.holds(t) for t in drawn[:10])
    kept, left_out = held_out.kept(drawn)
    prompts = {t.prompt for t in drawn[:10]}
    assert left_out >= 10 and not [t for t in kept if t.prompt in prompts]
    # A chat task's question is its last user message, whatever its prompt renders.
    chat = Task(task_id="chat:1", env="reference", prompt="system: Be brief.\nuser: Hello",
                observation={"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hello"},
                                          {"role": "assistant", "content": "Hi."},
                                          {"role": "user", "content": drawn[0].prompt}]})
    assert held_out.holds(chat)
    assert not held_out.holds(chat.model_copy(update={"observation": None}))
    source = EnvSource(env, difficulty=1, curriculum=None, guard=held_out)
    published = source.draw(300, random.Random(3))
    assert len(published) == 300 and not [t for t in published if t.prompt in prompts]
    assert not guard(None).holds(drawn[0])


def test_a_held_out_set_holds_each_task_once(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Repeats would count as independent pairs in the gate's sign test: dropped, the first
    kept, and named in a warning; an environment's set keeps the draws of its seed (the
    default suite: 95 distinct tasks of its 100 draws)."""
    from services.envs.heldout import HeldOut, suite

    raw = envs.get("arithmetic").tasks(100, rng=random.Random(20261125))
    with caplog.at_level("WARNING", logger="services.envs.heldout"):
        default = suite(None)[0].tasks()
    assert len({t.task_id for t in raw}) == len(default) == len({t.task_id for t in default})
    assert len(default) < 100 and "repeat others" in caplog.text
    assert [t.task_id for t in default] == list(dict.fromkeys(t.task_id for t in raw))
    file = tmp_path / "held.jsonl"
    rows = [{"task_id": "a", "prompt": "What is 2+2?", "answer": "4"},
            {"task_id": "b", "prompt": "  what IS 2+2? ", "answer": "4"},
            {"task_id": "a", "prompt": "Another question", "answer": "1"},
            {"task_id": "c", "prompt": "Name a colour.", "answer": "red"}]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    caplog.clear()
    with caplog.at_level("WARNING", logger="services.envs.heldout"):
        kept = HeldOut(name="file", tasks_file=file).tasks()
    assert [t.prompt for t in kept] == ["What is 2+2?", "Name a colour."]
    assert "'file': 2 of its 4 tasks repeat others" in caplog.text and "b, a" in caplog.text
