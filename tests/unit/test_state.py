"""The state store's journal: what a failing process call changed is undone exactly."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from schemas import Task
from services.common.stage import Output, apply_process
from services.common.state import StateStore
from services.common.state_storage import DiskDatabase
from tests import factories

NewStore = Callable[[str], StateStore]


@pytest.fixture(params=["memory", "rocksdb"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewStore]:
    """Stores on each backend: every contract here holds for both."""
    made: list[StateStore] = []

    def make(topic: str) -> StateStore:
        disk = DiskDatabase(tmp_path / f"{topic}-{len(made)}", 16) \
            if request.param == "rocksdb" else None
        made.append(StateStore(topic, disk=disk))
        return made[-1]

    yield make
    for store in made:
        store.close()


def test_changes_are_the_last_value_of_each_touched_key_or_a_delete(
        new_store: NewStore) -> None:
    store = new_store("t.state")
    store.adopt(0, {"kept": 1, "gone": 2})
    store.adopt(3)
    store.begin()
    p0, p3 = store.partition(0), store.partition(3)
    p0.put("a", {"x": 1})
    p0.put("a", {"x": 2})
    p0.delete("gone")
    p3.put("b", [1, 2])
    assert sorted(store.changes()) == [(0, "a", b'{"x":2}'), (0, "gone", None), (3, "b", b"[1,2]")]
    assert store.changes() == []  # drained


def test_undo_restores_values_deletes_and_absences(
        new_store: NewStore) -> None:
    store = new_store("t.state")
    store.adopt(0, {"k": 1, "d": 5})
    store.begin()
    state = store.partition(0)
    state.put("k", 2)
    mark = store.mark()
    state.put("k", 3)
    state.put("new", 1)
    state.delete("d")
    store.undo(mark)
    assert (state.get("k"), "new" in state, state.get("d")) == (2, False, 5)
    assert store.changes() == [(0, "k", b"2")]


class Counting:
    """Counts records per task in state and raises on a poisoned task."""

    input_type = Task

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def process(self, batch: Sequence[Task]) -> list[Output]:
        state = self.store.partition(0)
        for task in batch:
            state.put(task.task_id, state.get(task.task_id, 0) + 1)
            if task.env == "poison":
                raise ValueError("poisoned")
        return [Output("out", t) for t in batch]


def test_a_record_that_raises_leaves_no_trace_and_the_others_count_once(
        new_store: NewStore) -> None:
    store = new_store("t.state")
    store.adopt(0)
    store.begin()
    stage = Counting(store)
    bad = factories.task(1).model_copy(update={"env": "poison"})
    batch = [factories.task(0), bad, factories.task(0), factories.task(2)]
    result = apply_process(stage.process, batch, store)
    assert [i for i, _ in result.failed] == [1]
    state = store.partition(0)
    assert (state.get("arith-0"), state.get("arith-1"), state.get("arith-2")) == (2, None, 1)
    assert len(result.outputs) == 3


def test_a_partition_not_owned_is_an_error(
        new_store: NewStore) -> None:
    with pytest.raises(KeyError, match="not owned"):
        new_store("t.state").partition(2)


def test_the_event_clock_times_out_in_stream_time_and_forgets_old_entries(
        new_store: NewStore) -> None:
    from services.common.event_time import EventClock

    store = new_store("t.state")
    store.adopt(0)
    store.begin()
    state = store.partition(0)
    clock = EventClock()
    assert clock.observe(state, [1000.0, 990.0]) == 1000.0
    assert clock.due(state, since=960.0, timeout=30, now=state.assigned_at)  # stream moved on
    assert not clock.due(state, since=990.0, timeout=30, now=state.assigned_at)
    state.put("x/old", 100.0)
    state.put("x/new", 950.0)
    state.put("y/other", 0.0)
    clock.forget(state, "x/", 500, now=1.0)
    assert state.keys("x/") == ["x/new"] and "y/other" in state
    state.put("x/later", 0.0)
    clock.forget(state, "x/", 500, now=2.0)  # swept less than a minute ago: not yet
    assert "x/later" in state
    clock.forget(state, "x/", 500, now=62.0)
    assert "x/later" not in state


def test_a_model_value_is_encoded_only_in_the_changelog_and_comes_back_equal(
        new_store: NewStore) -> None:
    """A pydantic model put as a value stays the object in memory; the changelog holds its
    wire JSON, which as_model turns back into an equal model. Put and deleted within one
    batch, it is written as a delete only."""
    import json

    from schemas import ScoredTrajectory
    from services.common.state import as_model

    store = new_store("changelog")
    store.adopt(0)
    store.begin()
    state = store.partition(0)
    kept, passing = factories.scored(1), factories.scored(2)
    state.put("m/kept", kept)
    state.put("m/passing", passing)
    state.delete("m/passing")
    assert state.get("m/kept") is kept
    changes = {key: value for _, key, value in store.changes()}
    assert changes["m/passing"] is None
    assert changes["m/kept"] == kept.to_bytes()
    restored = json.loads(changes["m/kept"])
    assert as_model(ScoredTrajectory, restored) == kept
    assert as_model(ScoredTrajectory, kept) is kept


def test_renames_read_an_older_format_and_leave_the_current_one_alone() -> None:
    from services.common.state import Renames

    upgrade = Renames({"g/": "group/", "c": "mix"}, {"group/": {"t": "first_at"}})
    assert upgrade("g/a/b", {"t": 1.0, "size": 2}) == ("group/a/b", {"first_at": 1.0, "size": 2})
    assert upgrade("c", {"sft": 1}) == ("mix", {"sft": 1})
    assert upgrade("group/a", {"first_at": 1.0}) is None
    assert upgrade("clock", 5.0) is None  # an exact old key is not a prefix
    assert upgrade("mix", {}) is None


def test_a_disk_store_settles_each_batch_and_reads_back_what_it_wrote(tmp_path: Path) -> None:
    """On disk, a batch's changes are kept as objects until the changelog has their
    encoding, then written; what is read back afterwards is the JSON, sorted by key; a
    revoked partition leaves nothing behind; a store reopened on the folder starts empty."""
    store = StateStore("t.state", disk=DiskDatabase(tmp_path / "db", 16))
    store.adopt(1, {"b": 1, "a": {"x": [1, 2]}})
    store.adopt(2, {"a": "other partition"})
    store.begin()
    state = store.partition(1)
    model = factories.scored(1)
    state.put("m", model)
    state.put("c", 3)
    state.delete("b")
    assert state.get("m") is model and state.keys() == ["a", "c", "m"]
    changes = store.changes()
    assert sorted(k for _, k, _ in changes) == ["b", "c", "m"]
    assert state.get("m") == json.loads(model.to_bytes()) and state.get("b") is None
    assert (state.keys(), len(state)) == (["a", "c", "m"], 3)
    assert store.partition(2).keys() == ["a"]
    store.drop([1])
    store.adopt(1)
    assert store.partition(1).keys() == [] and store.partition(2).get("a") == "other partition"
    store.close()
    assert not (tmp_path / "db").exists()
    again = StateStore("t.state", disk=DiskDatabase(tmp_path / "db", 16))
    again.adopt(2)
    assert again.partition(2).keys() == []
    again.close()


def test_a_scan_reads_as_it_goes_and_sees_the_batch(new_store: NewStore) -> None:
    """``scan`` is what a sweep over many entries uses (the decided groups of a day): it
    gives each entry once, with this batch's changes, and may delete as it goes."""
    store = new_store("t.state")
    store.adopt(0, {f"d/{i:03}": i for i in range(50)} | {"other": 1})
    store.begin()
    state = store.partition(0)
    state.put("d/new", 99)
    state.put("d/007", 70)
    state.delete("d/008")
    seen = {}
    for key, value in state.scan("d/"):
        seen[key] = value
        if value % 2:
            state.delete(key)
    assert len(seen) == 50 and seen["d/007"] == 70 and seen["d/new"] == 99
    assert "d/008" not in seen and "other" not in seen
    assert sorted(state.keys("d/")) == sorted(k for k, v in seen.items() if v % 2 == 0)
