"""``bench state``: what the filter's remembered state costs in memory, on disk and in speed,
with its entries in RocksDB against the in-memory dict, measured in the same run.

N scored arithmetic trajectories (groups of 4, one task per group, as ``bench quality``
makes them) go through the filter stage in batches of 500 over 6 partitions, exactly as the
runtime drives a stateful stage (``begin``, ``process_partition``, ``changes``) but without a
broker, so only the stage and its store are measured. Every group is decided and remembered
(``decided/<group>``, ``seen/<task>``: the default policy keeps both for a day).

Each backend runs in a process of its own so that resident memory (VmRSS) is its alone. The
first half of the records is the warm-up, long enough for RocksDB to fill its budget
(``MEMORY_MB``: block cache and memtables); the figure, bytes per remembered record, is the
growth of resident memory over the second half per record of it. For RocksDB the bytes on
disk per record are reported too. The targets: memory per remembered record on RocksDB under
a tenth of the dict's, the filter's speed on RocksDB at least half the dict's.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

RECORDS = int(os.environ.get("BENCH_STATE_RECORDS", "200000"))
BATCH = 500
PARTITIONS = 6
MEMORY_MB = 32


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _one(backend: str, records: int, folder: str, out: Any) -> None:
    """In a fresh process: the filter over ``records`` scored trajectories on ``backend``."""
    import gc

    from bench.quality import GROUP, group_of
    from schemas import fast
    from services.common.service import tune_gc
    from services.envs.arithmetic import Arithmetic
    from services.filter.main import FilterSettings, build_stage
    from services.scorer.stage import ScorerStage, ScoringConfig

    settings = FilterSettings(instance_id="bench", metrics={"enabled": False},
                              state={"backend": backend, "dir": folder,
                                     "memory_mb": MEMORY_MB})
    stage = build_stage(settings)
    store = stage.state
    for p in range(PARTITIONS):
        store.adopt(p)
    scorer = ScorerStage(ScoringConfig(), "scored")
    # Records as the runtime hands them to the scorer and to the filter.
    generated, read = fast.decoder(fast.TrajectoryRecord), fast.decoder(fast.ScoredTrajectory)
    tune_gc()
    warm = records // 2
    seconds, done, rss_warm = 0.0, 0, 0
    env = Arithmetic()
    for start in range(0, records, BATCH * 10):
        # Distinct 3-digit expressions by construction: no set of drawn tasks grows in the
        # measured process. The last chunk stops at ``records``.
        end = min(start + BATCH * 10, records)
        chunk = [t for g in range(start // GROUP, end // GROUP)
                 for t in group_of(env.task(100 + g // 900, "+", 100 + g % 900), g)]
        scored = [read(o.value.to_bytes())
                  for o in scorer.process([generated(t.to_bytes()) for t in chunk])]
        for i in range(0, len(scored), BATCH):
            batch = scored[i:i + BATCH]
            parts: dict[int, list[Any]] = {}
            for s in batch:
                key = s.trajectory.task.task_id.encode()
                parts.setdefault(zlib.crc32(key) % PARTITIONS, []).append(s)
            began = time.perf_counter()
            store.begin()
            for p, mine in parts.items():
                stage.process_partition(store.partition(p), mine)
            store.changes()
            seconds += time.perf_counter() - began
            done += len(batch)
            if done >= warm and not rss_warm:
                gc.collect()
                rss_warm, warm = _rss_bytes(), done
    gc.collect()
    rss_end = _rss_bytes()
    remembered = sum(len(store.partition(p).keys("decided/")) for p in range(PARTITIONS))
    disk = _folder_bytes(Path(folder)) if backend == "rocksdb" else 0
    out.put({"backend": backend, "records": done, "seconds": round(seconds, 2),
             "records_per_second": round(done / seconds),
             "groups_remembered": remembered,
             "rss_mb_after_warmup": round(rss_warm / 2**20, 1),
             "rss_mb_end": round(rss_end / 2**20, 1),
             "rss_bytes_per_record": round((rss_end - rss_warm) / (done - warm), 1),
             "disk_bytes_per_record": round(disk / done, 1) if disk else None})
    store.close()


def run() -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    figures: dict[str, dict[str, Any]] = {}
    for backend in ("memory", "rocksdb"):
        folder = tempfile.mkdtemp(prefix=f"bench-state-{backend}-")
        queue = ctx.Queue()
        proc = ctx.Process(target=_one, args=(backend, RECORDS, folder, queue))
        proc.start()
        figures[backend] = queue.get(timeout=3600)
        proc.join()
        shutil.rmtree(folder, ignore_errors=True)
    mem, disk = figures["memory"], figures["rocksdb"]
    ratio = disk["rss_bytes_per_record"] / max(mem["rss_bytes_per_record"], 1.0)
    speed = disk["records_per_second"] / mem["records_per_second"]
    return {**figures, "summary": {
        "records": RECORDS,
        "memory_bytes_per_record": mem["rss_bytes_per_record"],
        "rocksdb_bytes_per_record_in_memory": disk["rss_bytes_per_record"],
        "rocksdb_bytes_per_record_on_disk": disk["disk_bytes_per_record"],
        "memory_ratio": round(ratio, 3),
        "speed_ratio": round(speed, 3),
        "targets_met": ratio < 0.1 and speed >= 0.5,
    }}
