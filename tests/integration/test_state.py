"""Stage state on a real broker: restored after a restart, kept under the record size limit,
timers that cannot produce their output do not loop."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pytest

from schemas import Task
from services.common.config import StateSettings
from services.common.runtime import StreamRuntime
from services.common.stage import Output
from services.common.state import PartitionState, StateStore
from services.common.state_storage import DiskDatabase
from tests import factories
from tests.integration.runners import InThread, settings
from tests.kafka import Broker, wait_until

pytestmark = pytest.mark.integration

LIMIT = 4096


class Tally:
    """Numbers the tasks of each partition 1, 2, 3... in state. env 'big' makes a state value
    over the limit; env 'alarm' sets a timer whose output is over it."""

    input_type = Task
    tick_seconds = 0.2

    def __init__(self, changelog: str, output: str, disk: Path | None = None) -> None:
        self.state = StateStore(changelog, disk=DiskDatabase(disk, 16) if disk else None)
        self.output = output
        self.ticks = 0  # timer runs, one per partition per tick

    def process_partition(self, state: PartitionState, batch: Sequence[Task]) -> list[Output]:
        out = []
        for task in batch:
            n = state.get("n", 0) + 1
            state.put("n", n)
            if task.env == "big":
                state.put("blob", "x" * (2 * LIMIT))
            if task.env == "alarm":
                state.put("alarm", task.task_id)
            out.append(Output(self.output, task.model_copy(
                update={"metadata": {"n": n, "partition": state.partition}})))
        return out

    def tick(self, state: PartitionState, now: float) -> list[Output]:
        self.ticks += 1
        alarm = state.get("alarm")
        if alarm is None:
            return []
        state.delete("alarm")
        return [Output(self.output, Task(task_id=alarm, env="alarm", prompt="y" * 2 * LIMIT))]


def _topics(kafka: Broker, uid: str) -> tuple[str, str, str, str]:
    names = (f"st{uid}.in", f"st{uid}.out", f"st{uid}.dlq", f"st{uid}.tally.state")
    kafka.create_topics(names, partitions=2)
    return names


def _runtime(kafka: Broker, uid: str, names: tuple[str, str, str, str],
             disk: Path | None = None) -> StreamRuntime:
    src, out, dlq, changelog = names
    s = settings(kafka.bootstrap, "tally", prefix=f"st{uid}.", max_record_bytes=LIMIT,
                 batch_max_records=7)
    return StreamRuntime(s, Tally(changelog, out, disk), [src], dlq_topic=dlq)


def _numbers(kafka: Broker, topic: str) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = defaultdict(list)
    for m in kafka.read_all(topic):
        meta = Task.from_bytes(m.value()).metadata
        if "n" in meta:
            seen[meta["partition"]].append(meta["n"])
    return seen


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
def test_state_is_restored_from_the_changelog_after_a_restart(
        kafka: Broker, uid: str, backend: str, tmp_path: Path) -> None:
    names = _topics(kafka, uid)
    src, out = names[0], names[1]
    disks = iter([tmp_path / "1", tmp_path / "2"] if backend == "rocksdb" else [None, None])
    kafka.produce(src, ((f"k{i}".encode(), factories.task(i).to_bytes()) for i in range(40)))
    with InThread(_runtime(kafka, uid, names, next(disks))) as r:
        wait_until(lambda: sum(map(len, _numbers(kafka, out).values())) >= 40 or r.error, 60,
                   "the first 40 numbered")
    assert r.error is None
    kafka.produce(src, ((f"k{i}".encode(), factories.task(i).to_bytes())
                        for i in range(40, 90)))
    with InThread(_runtime(kafka, uid, names, next(disks))) as r:  # as a new process would
        wait_until(lambda: sum(map(len, _numbers(kafka, out).values())) >= 90 or r.error, 60,
                   "all 90 numbered")
    assert r.error is None
    numbers = _numbers(kafka, out)
    assert sum(map(len, numbers.values())) == 90
    for seq in numbers.values():  # each partition counted on from its restored state
        assert sorted(seq) == list(range(1, len(seq) + 1))


def test_a_restart_on_the_same_disk_reads_only_the_changelog_after_its_local_checkpoint(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    """A clean stop keeps the RocksDB with a checkpoint; meanwhile another instance (another
    disk) counts on; the restart on the first disk reads only what that one wrote, and counts
    on from it. Without a checkpoint (a crash: the store not closed) the next start reads the
    whole changelog."""
    from services.common.state_storage import CHECKPOINT

    names = _topics(kafka, uid)
    src, out, changelog = names[0], names[1], names[3]
    mine, other = tmp_path / "mine", tmp_path / "other"

    def produce(lo: int, hi: int) -> None:
        kafka.produce(src, ((f"k{i}".encode(), factories.task(i).to_bytes())
                            for i in range(lo, hi)))

    def run(disk: Path, total: int) -> Tally:
        runtime = _runtime(kafka, uid, names, disk)
        with InThread(runtime) as r:
            wait_until(lambda: sum(map(len, _numbers(kafka, out).values())) >= total
                       or r.error, 60, f"{total} numbered")
        assert r.error is None
        assert isinstance(runtime.stage, Tally)
        return runtime.stage

    produce(0, 40)
    first = run(mine, 40)
    first.state.close()  # as serve() does at a clean stop
    assert (mine / CHECKPOINT).exists()
    kept_at = len(kafka.read_all(changelog))
    produce(40, 60)
    second = run(other, 60)  # another instance, another disk: the whole changelog
    assert second.state.last_restore["from_checkpoint"] == 0
    second.state.close()
    written = len(kafka.read_all(changelog))
    produce(60, 90)
    again = _runtime(kafka, uid, names, mine)
    assert not (mine / CHECKPOINT).exists()  # taken as the database opened
    assert isinstance(again.stage, Tally)
    with InThread(again) as r:
        wait_until(lambda: sum(map(len, _numbers(kafka, out).values())) >= 90 or r.error, 60,
                   "all 90 numbered")
    assert r.error is None
    restore = again.stage.state.last_restore
    print("restart on the same disk:", restore)
    assert restore["from_checkpoint"] == 2
    assert restore["records_read"] == written - kept_at > 0  # what the other one wrote
    numbers = _numbers(kafka, out)
    assert sum(map(len, numbers.values())) == 90
    for seq in numbers.values():  # each partition counted on, across the three
        assert sorted(seq) == list(range(1, len(seq) + 1))

    # As a crash leaves the folder: the database's files, no checkpoint. The whole changelog
    # is read.
    again.stage.state.close()
    (mine / CHECKPOINT).unlink()
    produce(90, 100)
    crashed = run(mine, 100)
    assert crashed.state.last_restore["from_checkpoint"] == 0
    assert crashed.state.last_restore["records_read"] >= written


def test_oversized_state_and_timer_outputs_are_dead_lettered_once(
        kafka: Broker, uid: str) -> None:
    names = _topics(kafka, uid)
    src, out, dlq = names[0], names[1], names[2]
    tasks = [factories.task(i) for i in range(10)]
    tasks[3] = tasks[3].model_copy(update={"env": "big"})
    tasks[6] = tasks[6].model_copy(update={"env": "alarm"})
    kafka.produce(src, ((b"same-key", t.to_bytes()) for t in tasks))  # one partition, in order
    runtime = _runtime(kafka, uid, names)
    stage = runtime.stage
    assert isinstance(stage, Tally)
    with InThread(runtime) as r:
        wait_until(lambda: len(kafka.read_all(dlq)) >= 2 or r.error, 60, "two dead letters")
        # A looping timer would dead-letter again at its next run: let it run ten more times.
        ticks = stage.ticks
        wait_until(lambda: stage.ticks >= ticks + 10 or r.error, 60, "ten more timer runs")
        assert r.error is None
    letters = {dict(m.headers() or [])["flywheel-error-class"]: m
               for m in kafka.read_all(dlq)}
    assert len(kafka.read_all(dlq)) == 2
    assert set(letters) == {b"StateTooLarge", b"OutputTooLarge"}
    [numbers] = _numbers(kafka, out).values()
    assert sorted(numbers) == list(range(1, 10))  # the big one left no trace in the count


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
def test_filter_state_in_the_old_format_is_read_and_rewritten(
        kafka: Broker, uid: str, backend: Literal["memory", "rocksdb"], tmp_path: Path) -> None:
    """State written before the filter's keys had names (``g/ m/ x/ d/``; ``t n have e``) is
    read at restore: a group half assembled in it completes with its next member. The
    changelog is then rewritten, so no old key is left to bring a finished group back at the
    next restore."""
    import json

    from schemas import FilterDecision
    from services.filter.stage import FilterStage, state_store
    from tests import planted

    src, out, dlq, changelog = (f"fs{uid}.scored", f"fs{uid}.filtered", f"fs{uid}.dlq",
                                f"fs{uid}.filter.state")
    kafka.create_topics([src, out, dlq, changelog], partitions=1)
    records, _ = planted.planted_mix(1)
    group = records[0].trajectory.group_id
    task = records[0].trajectory.task.task_id
    first_at = records[0].created_at.timestamp()
    old = {
        f"g/{group}": {"t": first_at, "n": 4, "have": [0, 1, 2]},
        **{f"m/{group}/{i}": json.loads(records[i].to_bytes()) for i in range(3)},
        "x/decided-long-ago": first_at - 10,
        f"d/{task}": {"e": []},
    }
    kafka.produce(changelog, [(k.encode(), json.dumps(v).encode()) for k, v in old.items()])

    s = settings(kafka.bootstrap, "filter", prefix=f"fs{uid}.")
    s.state = StateSettings(backend=backend, dir=tmp_path)
    stage = FilterStage(planted.filter_policy(), "f" * 64, accepted_topic=out,
                        rejected_topic=out, state=state_store(changelog, s),
                        latest_version=lambda _m: planted.LATEST_VERSION)
    with InThread(StreamRuntime(s, stage, [src], dlq_topic=dlq)) as running:
        kafka.produce(src, [(task.encode(), records[3].to_bytes())])
        decided = wait_until(lambda: len(kafka.read_all(out)) == 4 and kafka.read_all(out),
                             60, "the whole group decided")
    assert running.error is None
    decisions = [FilterDecision.from_bytes(m.value()) for m in decided]
    assert sorted(d.scored.trajectory.sample_index for d in decisions) == [0, 1, 2, 3]
    assert not any("incomplete_group" in d.flags or "late_member" in d.flags
                   for d in decisions)

    final: dict[str, bytes | None] = {}
    for m in kafka.read_all(changelog):
        final[m.key().decode()] = m.value()
    live = {k for k, v in final.items() if v is not None}
    assert not any(k.startswith(("g/", "m/", "x/", "d/")) for k in live), live
    assert {f"decided/{group}", "decided/decided-long-ago"} <= live
    assert not any(k.startswith(("group/", "member/")) for k in live), live
    s.instance_id += "-again"  # a second store beside the first, as another instance's
    restored = state_store(changelog, s)
    restored.restore(s.kafka.client_config(), [0], 60)
    state = restored.partition(0)
    assert state.keys("group/") == [] and state.keys("member/") == []
    assert state.get("decided/decided-long-ago") == first_at - 10
    assert json.loads(final[f"seen/{task}"] or b"{}")["entries"], "the accepted ones remembered"
