"""``bench restart``: how long a filter holding N remembered records takes to restore its state
at a restart, from the whole changelog (a new disk, or after a crash) and from its local
checkpoint (a clean stop, then a restart on the same disk), in the same run.

The changelog of a filter (6 partitions, compacted, as ``topics.yaml`` declares it) is filled
with N entries shaped as the filter writes them: ``decided/<group>`` (a decided group, its
time and sample indexes) for most, and ``seen/<task>`` (a task's duplicate memory of 64
fingerprints) for one in 200. Then, on RocksDB (the default backend):

- ``full``: a store on a new folder restores every partition: it reads the whole changelog;
- ``checkpoint``: that store stops as a clean stop does (its changelog end offsets kept, the
  database closed with its checkpoint), ``CHANGED`` more entries are written (what another
  instance or the last moments before the stop would add), and a store on the same folder
  restores: it reads only those.

Reported: seconds and changelog records read for each, and the ratio. The broker is
``FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS`` if set, else a local one, on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.runtime import broker
from services.cluster import topics as topic_ops
from services.common.config import KafkaSettings
from services.common.offsets import high_watermarks
from services.common.produce import produce_when_room
from services.filter.dedup import MINHASH, fingerprint
from services.filter.main import FilterSettings
from services.filter.stage import DECIDED, SEEN, state_store

RECORDS = int(os.environ.get("BENCH_RESTART_RECORDS", "1000000"))
CHANGED = int(os.environ.get("BENCH_RESTART_CHANGED", "10000"))
PARTITIONS = 6
MEMORY_MB = 64


def _entries(start: int, n: int) -> list[tuple[str, bytes]]:
    fp = fingerprint("first add the ones digit then carry one so we get the sum", num_perm=64,
                     shingle=5)
    seen = json.dumps({"entries": [[fp.exact, fp.encoded(), f"g{i}", 1.7e9 + i]
                                   for i in range(64)], "minhash": MINHASH}).encode()
    out = []
    for i in range(start, start + n):
        if i % 200 == 0:
            out.append((f"{SEEN}task-{i // 200}", seen))
        else:
            out.append((f"{DECIDED}bench-{i}", json.dumps(
                {"at": 1.7e9 + i, "indexes": list(range(8))}).encode()))
    return out


def _fill(bootstrap: str, topic: str, entries: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50,
                         "compression.type": "lz4"})
    for i, (key, value) in enumerate(entries):
        produce_when_room(producer, topic, value, key, partition=i % PARTITIONS)
    if producer.flush(300):
        raise RuntimeError("the changelog was not filled in time")


def run() -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    try:
        with broker() as bootstrap:
            prefix = f"bs{uuid.uuid4().hex[:8]}."
            kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
            topic_ops.apply(topic_ops.admin_client(kafka), [
                s for s in topic_ops.load(prefix=prefix) if s.name == f"{prefix}filter.state"])
            changelog = f"{prefix}filter.state"
            started = time.perf_counter()
            _fill(bootstrap, changelog, _entries(0, RECORDS))
            fill_seconds = time.perf_counter() - started
            config = kafka.client_config()
            partitions = list(range(PARTITIONS))

            settings = FilterSettings(instance_id="bench", metrics={"enabled": False},
                                      state={"backend": "rocksdb", "dir": str(folder),
                                             "memory_mb": MEMORY_MB})
            store = state_store(changelog, settings)  # on RocksDB, the default backend
            store.restore(config, partitions, 3600)
            full = dict(store.last_restore)
            ends = {p: high for p, (_, high) in
                    high_watermarks(config, changelog, partitions).items()}
            store.keep(ends)  # what a clean stop does (StreamRuntime._checkpoint)
            store.drop(partitions)
            store.close()
            _fill(bootstrap, changelog, _entries(RECORDS, CHANGED))

            again = state_store(changelog, settings)  # the same folder: the same disk
            again.restore(config, partitions, 3600)
            kept = dict(again.last_restore)
            held = sum(1 for p in partitions for _ in again.partition(p).scan(DECIDED))
            again.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "records": RECORDS, "changed_after_the_checkpoint": CHANGED,
        "fill_seconds": round(fill_seconds, 1),
        "full": {k: round(v, 3) for k, v in full.items()},
        "checkpoint": {k: round(v, 3) for k, v in kept.items()},
        "decided_groups_held_after": held,
        "summary": {"full_seconds": round(full["seconds"], 2),
                    "checkpoint_seconds": round(kept["seconds"], 2),
                    "speedup": round(full["seconds"] / kept["seconds"], 1)},
    }
