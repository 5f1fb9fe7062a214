"""Scorers, the reward rule and the scorer stage, on real subprocess sandboxes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec
import pytest

from schemas import Score, ScoredTrajectory, Task, Trajectory, Turn, VerifierSpec, fast
from services import envs
from services.common.errors import ConfigError
from services.envs.verify import check
from services.scorer.metrics import SANDBOX_KILLS
from services.scorer.sandbox import SandboxLimits
from services.scorer.scorers import (
    CodeConfig,
    FormatConfig,
    LengthConfig,
    RepetitionConfig,
    RewardRule,
    VerifierConfig,
    extract_code,
)
from services.scorer.stage import ScorerStage, ScoringConfig
from tests.isolation import require


def traj(task: Task, completion: str, index: int = 0) -> Trajectory:
    return Trajectory(
        task=task, group_id=f"g-{task.task_id}", sample_index=index, group_size=8,
        turns=[Turn(role="user", content=task.prompt),
               Turn(role="assistant", content=completion)],
        completion=completion, completion_token_ids=list(range(len(completion))),
        policy_version=0, model="tiny",
    )


def score(scored: ScoredTrajectory, name: str) -> Score:
    return next(s for s in scored.scores if s.scorer == name)


def run(config: ScoringConfig, batch: list[Trajectory]) -> list[ScoredTrajectory]:
    read = fast.decoder(fast.TrajectoryRecord)  # as the runtime hands records to the stage
    outputs = ScorerStage(config, "scored").process([read(t.to_bytes()) for t in batch])
    assert {o.topic for o in outputs} == {"scored"}
    return [o.value for o in outputs]  # type: ignore[misc]


def test_arithmetic_answers_get_verdicts_rewards_and_named_versioned_scores() -> None:
    task = envs.get("arithmetic").task(12, "+", 34)
    config = ScoringConfig(scorers=[VerifierConfig(), LengthConfig(max=10), FormatConfig(
        pattern=r"-?\d+")], reward=RewardRule(weights={"verifier": 1.0}, require=["format"]))
    first = traj(task, "46")
    right, wrong, chatty = run(config, [first, traj(task, "45"),
                                        traj(task, "It is 46, I think")])
    assert (right.verdict, right.reward) == ("correct", 1.0)
    assert (wrong.verdict, wrong.reward) == ("incorrect", 0.0)
    assert (chatty.verdict, chatty.reward) == ("correct", -1.0)  # right, but malformed
    assert score(chatty, "length").passed is False
    assert all(s.version and len(s.version) == 12 for s in right.scores)
    assert right.reward_rule == config.reward.text()
    again = run(config, [first])[0]
    assert again.event_id == right.event_id  # same trajectory, same config: same id


def test_a_config_change_changes_versions_and_ids() -> None:
    task = envs.get("arithmetic").task(1, "+", 1)
    t = traj(task, "2")
    a = run(ScoringConfig(scorers=[VerifierConfig(), LengthConfig(max=10)]), [t])[0]
    b = run(ScoringConfig(scorers=[VerifierConfig(), LengthConfig(max=11)]), [t])[0]
    assert score(a, "length").version != score(b, "length").version
    assert score(a, "verifier").version == score(b, "verifier").version
    assert a.event_id != b.event_id


def test_the_verdict_rule() -> None:
    rule = RewardRule(weights={"verifier": 1.0, "rm": 0.5}, verdict_from=["verifier", "code"])
    def s(name: str, value: float, passed: bool | None) -> Score:
        return Score(scorer=name, version="v", value=value, passed=passed)
    assert rule.apply([s("rm", 2.0, None)]) == (1.0, "unverified")
    assert rule.apply([s("verifier", 1, True), s("code", 0, False)]) == (1.0, "incorrect")
    assert rule.apply([s("verifier", 1, True), s("rm", 0.4, None)]) == (1.2, "correct")


def test_declared_checks_include_answer_schemas() -> None:
    spec = VerifierSpec(kind="json_schema", params={"schema": {
        "type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}})
    assert check(spec, '{"answer": 3}')[0]
    assert check(spec, 'Sure:\n```json\n{"answer": 3}\n```')[0]
    assert not check(spec, '{"answer": "three"}')[0]
    assert not check(spec, "three")[0]
    with pytest.raises(ConfigError):
        check(VerifierSpec(kind="json_schema"), "{}")


def test_heuristics() -> None:
    task = envs.get("arithmetic").task(1, "+", 1)
    config = ScoringConfig(scorers=[VerifierConfig(), RepetitionConfig(ngram=2, max_ratio=0.3)])
    loop, fine = run(config, [traj(task, "2 and 2 and 2 and 2 and 2 and 2"),
                              traj(task, "2 because one and one make two")])
    assert score(loop, "repetition").passed is False and score(loop, "repetition").value > 0.5
    assert score(fine, "repetition").value == 0.0


def test_a_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "scorer.yaml"
    file.write_text("scorers:\n  - kind: magic\n")
    with pytest.raises(ConfigError, match="magic"):
        ScoringConfig.load(file)
    file.write_text("scorers:\n  - kind: length\n  - kind: length\n")
    with pytest.raises(ConfigError, match="unique"):
        ScoringConfig.load(file)


CODE_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
SOLUTIONS = {
    "correct": "```python\ndef add(a, b):\n    return a + b\n```",
    "wrong": "def add(a, b):\n    return a - b\n",
    "loop": "def add(a, b):\n    while True:\n        pass\n",
    "memory": "x = bytearray(10 * 1024**3)\ndef add(a, b):\n    return a + b\n",
    "socket": "import socket\ntry:\n    socket.socket().connect(('10.0.0.1', 80))\n"
              "except Exception:\n    pass\ndef add(a, b):\n    return a + b\n",
    "fork": "import os\nwhile True:\n    os.fork()\n",
}




def test_the_code_scorer_refuses_to_start_without_real_isolation() -> None:
    # The virtualenv's interpreter (under /root here) is not executable by uid 65534, and as
    # a non-root user no interpreter is: either way solutions would keep the scorer's uid.
    # Waived, a scorer that is not root starts; as root it does not (solutions never run as
    # root: tests/unit/test_sandbox.py).
    with pytest.raises(ConfigError, match=r"unprivileged|never run as root"):
        ScorerStage(ScoringConfig(scorers=[CodeConfig(python=sys.executable)]), "scored")
    waived = ScoringConfig(scorers=[CodeConfig(python=sys.executable, require_isolation=False)])
    if os.geteuid() == 0:
        with pytest.raises(ConfigError, match="never run as root"):
            ScorerStage(waived, "scored")
    else:
        ScorerStage(waived, "scored")


def test_code_solutions_are_judged_in_the_sandbox_and_abuse_is_stopped_with_a_reason() -> None:
    # The code scorer isolates solutions by switching to uid 65534, which needs root; without
    # it the scorer refuses to start (tested above), so this needs root or the waiver.
    require("the code scorer needs root to drop privileges", os.geteuid() == 0)
    task = Task(task_id="code:add", env="reference", prompt="Write add(a, b).",
                verifier=VerifierSpec(kind="unit_tests", params={"tests": CODE_TESTS}))
    names = [*SOLUTIONS, "correct"]  # a good one after all the kills: scoring goes on
    batch = [traj(task, SOLUTIONS[n], i) for i, n in enumerate(names)]
    config = ScoringConfig(scorers=[VerifierConfig(), CodeConfig(
        limits=SandboxLimits(cpu_seconds=1, wall_seconds=5, memory_mb=256))])
    before = {r: SANDBOX_KILLS.labels(r)._value.get() for r in ("cpu_time", "memory",
                                                                 "network", "process_limit")}
    scored = dict(zip(names[:-1], run(config, batch), strict=False))
    last = run(config, batch[-1:])[0]
    details = {n: score(s, "code").details for n, s in scored.items()}
    assert scored["correct"].verdict == "correct" and last.verdict == "correct"
    assert scored["wrong"].verdict == "incorrect"
    assert details["wrong"]["reason"] == "AssertionError"
    expected = {"loop": "cpu_time", "memory": "memory", "socket": "network",
                "fork": "process_limit"}
    for name, reason in expected.items():
        assert (details[name]["status"], details[name]["reason"]) == ("killed", reason), name
        assert scored[name].verdict == "incorrect"
        assert SANDBOX_KILLS.labels(reason)._value.get() >= before[reason] + 1
    assert "verifier" not in {s.scorer for s in scored["correct"].scores}  # not its task


def test_code_is_taken_from_the_first_fence() -> None:
    assert extract_code("Here:\n```py\nx = 1\n```\nand ```python\ny\n```") == "x = 1\n"
    assert extract_code("x = 2") == "x = 2"


@pytest.mark.model
def test_a_reward_model_folder_scores_in_batches(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from services.models.tiny import tiny_model
    from services.scorer.scorers import RewardModelConfig, RewardModelScorer

    folder = tiny_model(tmp_path / "rm")
    cfg = LlamaConfig.from_pretrained(folder)
    cfg.num_labels = 1
    LlamaForSequenceClassification(cfg).save_pretrained(folder, safe_serialization=True)
    scorer = RewardModelScorer(RewardModelConfig(path=folder, batch_size=2))
    task = envs.get("arithmetic").task(1, "+", 1)
    batch = [traj(task, c) for c in ("2", "3", "2 is the answer", "no")]
    scores = scorer.score(batch)
    assert len(scores) == 4 and all(s is not None and s.scorer == "reward_model" for s in scores)
    one_by_one = [scorer.score([t])[0] for t in batch]
    for a, b in zip(scores, one_by_one, strict=True):  # padding does not change a score
        assert a is not None and b is not None and abs(a.value - b.value) < 1e-4
    assert len({s.value for s in scores if s is not None}) > 1
    assert Score.model_validate_json(msgspec.json.encode(scores[0])).value == scores[0].value  # type: ignore[union-attr]
