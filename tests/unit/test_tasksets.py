"""Task sets: field mapping, validation that names the file and line, cycles, split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from schemas import Task, Turn
from services.common.errors import ConfigError
from services.envs.declared import Declared
from services.envs.tasksets import Cycle, FieldMap, TaskSetSpec, load, split, write_rows

ROWS = [{"qid": f"q{i}", "question": f"What is {i} + {i}?", "solution": 2 * i, "level": i % 3,
         "topic": "sums"} for i in range(30)]
FIELDS = FieldMap(id="qid", prompt="question", answer="solution", difficulty="level",
                  metadata=["topic"])


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_and_parquet_give_the_same_tasks(tmp_path: Path) -> None:
    j = _jsonl(tmp_path / "s.jsonl", ROWS)
    p = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    a = load(TaskSetSpec(name="s", path=j, fields=FIELDS))
    b = load(TaskSetSpec(name="s", path=p, fields=FIELDS))
    assert [t.model_dump(exclude={"event_id", "created_at"}) for t in a] == \
        [t.model_dump(exclude={"event_id", "created_at"}) for t in b]
    t = a[4]
    assert t.task_id == "s:q4" and t.prompt == "What is 4 + 4?" and t.difficulty == 1
    assert t.verifier is not None and t.verifier.kind == "math" and t.verifier.answer == "8"
    assert t.metadata == {"topic": "sums"} and t.env == "reference"
    # the answer is checked from prose
    assert Declared().verify(t, [*Declared().initial_turns(t)]).passed is False
    turns = [Turn(role="user", content=t.prompt), Turn(role="assistant",
                                                       content="4 + 4 = 8, so the answer is 8.")]
    assert Declared().verify(t, turns).passed is True


def test_chat_messages_start_the_episode_and_ids_default_to_a_content_hash(tmp_path: Path
                                                                           ) -> None:
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "2+2?"}], "answer": "4"}]
    spec = TaskSetSpec(name="chat", path=_jsonl(tmp_path / "c.jsonl", rows),
                       fields=FieldMap(id=None, prompt=None, messages="messages"))
    (task,) = load(spec)
    assert [t.role for t in Declared().initial_turns(task)] == ["system", "user"]
    assert task.prompt == "2+2?" and task.task_id.startswith("chat:")
    assert load(spec)[0].task_id == task.task_id
    bad = [{"messages": [{"role": "narrator", "content": "x"}], "answer": "4"}]
    with pytest.raises(ConfigError, match=r"c2\.jsonl:1: .*roles among"):
        load(spec.model_copy(update={"path": _jsonl(tmp_path / "c2.jsonl", bad)}))


@pytest.mark.parametrize(("line", "error"), [
    ('{"qid": "x", "question": "q", "solution": 1', "not JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"qid": "x", "solution": 1}', "missing field 'question'"),
    ('{"qid": "x", "question": "q"}', "missing field 'solution'"),
    ('{"qid": "x", "question": "", "solution": 1}', "non-empty string"),
    ('{"qid": "x", "question": "q", "solution": 1, "level": "hard"}', "must be a number"),
    ('{"qid": "q0", "question": "q", "solution": 1}', "repeats"),
])
def test_a_bad_row_is_refused_with_file_and_line(tmp_path: Path, line: str, error: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"bad.jsonl:3: .*{error}"):
        load(TaskSetSpec(name="b", path=f, fields=FIELDS))


def test_specs_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValidationError, match="Input should be"):
        TaskSetSpec(name="x", path=Path("x.jsonl"), verifier="unknown_kind")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"fields\.tests"):
        TaskSetSpec(name="x", path=Path("x.jsonl"), verifier="unit_tests")
    with pytest.raises(ValidationError, match="exactly one"):
        TaskSetSpec(name="x", path=Path("x.jsonl"), fields=FieldMap(messages="m"))
    with pytest.raises(ValidationError, match="extract"):
        TaskSetSpec(name="x", path=Path("x.jsonl"), verifier_params={"extract": ["guess"]})
    with pytest.raises(ConfigError, match="format"):
        _ = TaskSetSpec(name="x", path=Path("x.csv")).file_format


def test_unit_test_sets_carry_their_tests(tmp_path: Path) -> None:
    rows = [{"id": 1, "prompt": "Write f.", "tests": "assert f() == 1"}]
    spec = TaskSetSpec(name="code", path=_jsonl(tmp_path / "c.jsonl", rows), verifier="unit_tests",
                       fields=FieldMap(answer=None, tests="tests"))
    (task,) = load(spec)
    assert task.verifier is not None and task.verifier.kind == "unit_tests"
    assert task.verifier.params["tests"] == "assert f() == 1"


def test_the_cycle_visits_every_task_once_per_epoch_in_a_new_order_and_resumes() -> None:
    pool = [Task(task_id=f"t{i}", env="reference", prompt=str(i)) for i in range(10)]
    cycle = Cycle("s", pool, seed=1)
    drawn = [cycle.next() for _ in range(35)]
    epochs: dict[int, list[str]] = {}
    for task, where in drawn:
        epochs.setdefault(where["epoch"], []).append(task.task_id)
    assert all(sorted(epochs[e]) == sorted(t.task_id for t in pool) for e in (0, 1, 2))
    assert epochs[0] != epochs[1] != epochs[2]
    # From a saved cursor, the same tasks follow as without the interruption.
    resumed = Cycle("s", pool, seed=1, epoch=drawn[16][1]["epoch"],
                    position=drawn[16][1]["position"] + 1)
    assert [resumed.next()[0].task_id for _ in range(18)] == [t.task_id for t, _ in drawn[17:]]
    again = Cycle("s", pool, seed=1)
    assert [again.next()[0].task_id for _ in range(35)] == [t.task_id for t, _ in drawn]
    assert [t.task_id for t, _ in drawn[:10]] != [t.task_id for t, _ in
                                                  (Cycle("s", pool, seed=2).next()
                                                   for _ in range(10))]


def test_split_is_disjoint_by_id_and_prompt(tmp_path: Path) -> None:
    rows = [*ROWS, {**ROWS[3], "qid": "again"}]  # a repeated question under another id
    spec = TaskSetSpec(name="s", path=_jsonl(tmp_path / "s.jsonl", rows), fields=FIELDS)
    train, test = split(spec, held_out=10, seed=4)
    assert len(test) == 10 and len(train) + len(test) <= len(rows)
    assert not {r["qid"] for r in train} & {r["qid"] for r in test}
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert split(spec, held_out=10, seed=4) == (train, test)
    assert split(spec, held_out=10, seed=5)[1] != test
    write_rows(tmp_path / "t.parquet", train, "parquet")
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == train
    with pytest.raises(ConfigError, match="between"):
        split(spec, held_out=len(rows), seed=0)
    assert Counter(r["qid"] for r in train).most_common(1)[0][1] == 1
