"""The embedded flywheel at full rate for ``SOAK_SECONDS`` (default 30 minutes): every service's
resident memory must be flat after warm-up, while the filter and router keep remembering
(their state on disk grows).

``flywheel up``'s stack with its own local broker, unthrottled (the feeder keeps a backlog, so
the generator never waits). Every ``SAMPLE_SECONDS`` each service process's resident memory
(VmRSS of the process ``flywheel up`` started) is read from /proc, with the records each
service has put out and the size of the filter's and router's RocksDB folders. The warm-up is
the first third of the run (at least 5 minutes): models loaded, the trainer past its first
rounds, RocksDB's cache (``STATE_MB``) filled. A service's memory after warm-up is its peak
over the two minutes that end the warm-up; at the end, its peak over the last two minutes;
growth must be under ``MAX_GROWTH``. No service may restart. The figures are written to
``results/soak.json``.

Not in the default run (it takes half an hour): ``make soak``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from services.cluster import local_broker as local_kafka
from services.cluster.local_broker import free_port, free_ports
from services.seed_model import SeedModelSettings
from services.up.profile import Profile
from services.up.stack import Stack
from services.up.view import Snapshot

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.soak]

SECONDS = float(os.environ.get("SOAK_SECONDS", "1800"))
WARMUP = float(os.environ.get("SOAK_WARMUP", max(300.0, SECONDS / 3)))
STATE_MB = 16
"""The filter's and router's RocksDB budget here: full within the warm-up at this rate (the
default, 64 MB, fills after about 20 minutes; the RSS grows until it has)."""
WINDOW = 120.0
SAMPLE_SECONDS = 10.0
MAX_GROWTH = 0.10
SEED = SeedModelSettings(samples=100_000)


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() \
        else 0


class Sampler:
    """``until`` for the stack: samples every SAMPLE_SECONDS, stops after SECONDS."""

    def __init__(self, stack: Stack, state_root: Path) -> None:
        self.stack, self.state_root = stack, state_root
        self.started = time.monotonic()
        self.next = 0.0
        self.samples: list[dict[str, Any]] = []

    def __call__(self, snapshot: Snapshot) -> bool:
        now = time.monotonic() - self.started
        if now < self.next:
            return False
        self.next = now + SAMPLE_SECONDS
        supervisor = self.stack.supervisor
        assert supervisor is not None
        rss = {name: _rss(child.proc.pid) for name, child in supervisor.children.items()
               if child.proc is not None and name != "prometheus"}
        self.samples.append({
            "at": round(now, 1), "rss": rss,
            "produced": {n: r["produced"] for n, r in snapshot.rows.items()},
            "restarts": {n: r["restarts"] for n, r in snapshot.rows.items()},
            "state_disk": {s: sum(_bytes(d) for d in self.state_root.glob(f"*{s}*"))
                           for s in ("filter", "router")},
        })
        return now >= SECONDS

    def peak(self, name: str, start: float, end: float) -> int:
        values = [s["rss"].get(name) for s in self.samples if start <= s["at"] <= end]
        values = [v for v in values if v]
        assert values, f"no sample of {name} in [{start:.0f}, {end:.0f}] s"
        return max(values)


@pytest.mark.timeout(SECONDS + 1800)  # and the seed model, and stopping
def test_every_service_s_memory_is_flat_after_warm_up(tmp_path: Path) -> None:
    state_root = Path(tempfile.mkdtemp(prefix="soak-state-", dir=tmp_path))
    profile = Profile(home=tmp_path / "home", checkpoint_url=str(tmp_path / "store"),
                      bootstrap=SEED, broker_port=free_port(), kafka={"topic_prefix": "soak."},
                      filter={"state": {"dir": str(state_root), "memory_mb": STATE_MB}},
                      router={"state": {"dir": str(state_root), "memory_mb": STATE_MB}})
    profile.metrics_port = free_ports(profile.processes)
    stack = Stack(profile)
    stack.prepare(say=print)
    sampler = Sampler(stack, state_root)
    try:
        final = stack.run(seconds=SECONDS + 600, until=sampler,
                          supervisor_options={"grace": 60.0})
    finally:
        local_kafka.stop(stack.home / "kafka")
    ran = sampler.samples[-1]["at"]
    assert ran >= SECONDS, f"the stack stopped after {ran:.0f} s"
    first, last = sampler.samples[0], sampler.samples[-1]
    warm = next(s for s in sampler.samples if s["at"] >= WARMUP)
    report: dict[str, Any] = {"seconds": ran, "warmup_seconds": WARMUP, "services": {}}
    grown = {}
    for name in last["rss"]:
        after = sampler.peak(name, WARMUP - WINDOW, WARMUP)
        end = sampler.peak(name, ran - WINDOW, ran)
        done = last["produced"].get(name, 0) - warm["produced"].get(name, 0)
        report["services"][name] = {
            "rss_mb_start": round((first["rss"].get(name) or 0) / 2**20, 1),
            "rss_mb_after_warmup": round(after / 2**20, 1),
            "rss_mb_end": round(end / 2**20, 1),
            "growth_after_warmup": round(end / after - 1, 4),
            "out_per_second_after_warmup": round(done / (last["at"] - warm["at"]), 1),
        }
        grown[name] = end / after - 1
    report["state_disk_mb"] = {s: {"after_warmup": round(warm["state_disk"][s] / 2**20, 1),
                                   "end": round(last["state_disk"][s] / 2**20, 1)}
                               for s in ("filter", "router")}
    out = Path(os.environ.get("FLYWHEEL_BENCH_OUT", "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report | {"samples": sampler.samples}, indent=1))
    print(json.dumps(report, indent=1))
    assert all(r["restarts"] == 0 for r in final.rows.values()), final.rows
    assert last["produced"]["scorer"] > warm["produced"]["scorer"] > 0
    assert last["state_disk"]["filter"] > 0
    assert all(g < MAX_GROWTH for g in grown.values()), {
        n: round(g, 3) for n, g in grown.items()}
