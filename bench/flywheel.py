"""``flywheel bench flywheel [--profile P]``: the improvement result, against its bounds.

A profile runs on a private broker, home and checkpoint store (its Kafka and paths are
replaced) for a budget of ``FLYWHEEL_BENCH_SECONDS`` after the services start. The curve is
the gate's held-out pass rate of every decided version against wall clock and against the
training samples behind it. In the same run, from the same starting model:

- the starting model's held-out score (the seed model's, for the embedded profile);
- the supervised bound (:mod:`bench.bound`): SFT on as many samples as the flywheel trained
  on, drawn from the training tasks (the feeder's, held-out excluded) with their labels'
  answers in the model's own style, trained as the trainer trains, evaluated as it goes;
- for the embedded profile, also the seed-data baseline: the same compute as one-shot SFT on
  the seed data only.

A bootstrapped profile (the embedded one, or a file without ``model_path``) runs
``FLYWHEEL_BENCH_RUNS`` times (default 3) with different seeds, each until a promoted version
reaches 0.8 or the budget ends; the figures are the medians of the seconds to 0.8 (bootstrap
included) and of the training samples to 0.8, beside the bound's. A profile with a model runs
once, for the whole budget. Writes ``results/flywheel[-NAME].json`` (via
the runner) and ``.png`` with every curve, both in ``FLYWHEEL_BENCH_OUT`` (or ``--out``), and
reports the checkpoint store's size at the end. SIGTERM or SIGINT (Ctrl-C) ends it with what
it has: the run in progress stops (its bound too, at the next point) and no further seed
starts; the results say ``interrupted``.

Over 300 lines: the flywheel run and its two baselines (the supervised bound, the seed-data
baseline) are measured on the same samples in the same run, so they share one module.
"""

from __future__ import annotations

import math
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.bound import supervised_bound
from services.cluster import local_broker as local_kafka
from services.trainer.store import CheckpointStore
from services.up.profile import Profile, load_profile
from services.up.stack import Stack
from services.up.view import Snapshot

TARGET = 0.8


def flywheel(profile: Profile, seconds: float, stop_at: float | None,
             stop: threading.Event | None = None) -> dict[str, Any]:
    """Run ``profile`` for ``seconds`` (or until a promoted version reaches ``stop_at``, or
    ``stop`` is set); returns the curve, the seed model's time and training totals."""
    stack = Stack(profile)
    boot_started = time.perf_counter()
    stack.prepare(say=lambda line: print(line, flush=True))
    boot_seconds = time.perf_counter() - boot_started

    def reached(snapshot: Snapshot) -> bool:
        if stop is not None and stop.is_set():
            return True
        return stop_at is not None and any(
            e.status == "promoted" and e.version > 0
            and e.metrics.get("pass_rate", 0.0) >= stop_at for e in snapshot.versions)

    started = time.time()
    try:
        stack.run(seconds=seconds, until=reached)
    finally:
        if stack.started_broker:
            local_kafka.stop(profile.home / "kafka")
    versions = stack.versions
    assert versions is not None
    candidates = sorted(versions.candidates.values(), key=lambda e: e.version)
    # "samples": all the trainer consumed up to a version (the compute spent, rolled-back
    # lineages included); "lineage_samples": those in its weights (through its parents).
    trained_by: dict[int, int] = {}
    lineage: dict[int, int] = {}
    total = 0
    for e in candidates:
        mix = sum(e.stage_mix.values()) if e.version > 0 else 0
        total += mix
        trained_by[e.version] = total
        lineage[e.version] = mix + lineage.get(e.parent_version or 0, 0)
    curve = [{"version": e.version, "status": e.status, "rejection": e.rejection,
              "parent": e.parent_version,
              "seconds": round(max(0.0, e.created_at.timestamp() - started), 2),
              "samples": trained_by.get(e.version, 0),
              "lineage_samples": lineage.get(e.version, 0),
              "pass_rate": e.metrics.get("pass_rate"),
              "sets": {k.removesuffix("/pass_rate"): v for k, v in e.metrics.items()
                       if k.endswith("/pass_rate")}} for e in versions.decided()]
    train_seconds = sum(e.metrics.get("train_seconds", 0.0) for e in candidates)
    return {"stack": stack, "curve": curve, "seed_model_seconds": round(boot_seconds, 1),
            "promotion_to_serving": promotion_to_serving(versions.decided(),
                                                         profile.home / "logs"),
            "trained_samples": total, "train_seconds": round(train_seconds, 2),
            "store_bytes": CheckpointStore(profile.checkpoint_url).size_bytes()}


_SERVING = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ "
                      r"services\.generator\.reload: now serving \S+ v(\d+) ")


def promotion_to_serving(decided: list[Any], logs: Path) -> list[dict[str, Any]]:
    """For each promoted version: seconds from the gate's decision (its event's time) to the
    first and the last generator serving it (their reload log lines), None for a generator
    that never did. Measures how late a decision reaches the fleet."""
    serving: dict[str, dict[int, float]] = {}
    for path in sorted(logs.glob("generator*.log")):
        seen = serving.setdefault(path.stem, {})
        for line in path.read_text(errors="replace").splitlines():
            if (m := _SERVING.match(line)) is not None:
                at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").astimezone()
                seen.setdefault(int(m[2]), at.timestamp())
    out = []
    for e in decided:
        if e.status != "promoted" or e.version == 0:
            continue
        lags = [None if e.version not in seen else round(seen[e.version]
                                                         - e.created_at.timestamp(), 1)
                for seen in serving.values()]
        known = [lag for lag in lags if lag is not None]
        out.append({"version": e.version, "first_seconds": min(known, default=None),
                    "last_seconds": None if None in lags else max(known, default=None)})
    return out


def seed_baseline(profile: Profile, seed_folder: Path, samples: int) -> dict[str, Any]:
    """One-shot SFT on the seed data only, from the seed model, for ``samples`` samples."""
    import torch

    from services.envs.heldout import gate_dtype, gate_guard, gate_headline
    from services.gate.evaluate import evaluate
    from services.models.engines import TransformersEngine
    from services.seed_model import train_on_seed
    from services.trainer.train import OptimSettings

    torch.set_num_threads(2)
    engine = TransformersEngine(seed_folder)
    optim = OptimSettings(**profile.trainer.get("optim", {}))
    boot = profile.seed_model.model_copy(update={"micro_batch": optim.micro_batch})
    done, seconds = train_on_seed(engine.model, engine.tokenizer, engine.pad, boot,
                                  samples=samples, lr=optim.lr,
                                  held_out=gate_guard(profile.gate))
    with tempfile.TemporaryDirectory(prefix="flywheel-baseline-") as tmp:
        uri, _ = CheckpointStore(tmp).write(1, engine.model, engine.tokenizer, None)
        scores = evaluate(Path(uri), gate_headline(profile.gate),
                          dtype=gate_dtype(profile.gate))
    return {"samples": done, "seconds": round(seconds, 2), "lr": optim.lr, **scores}


def first_reaching(curve: list[dict[str, Any]], key: str, rate: float) -> Any:
    """``key`` of the first point (promoted, for the flywheel) at or above ``rate``."""
    for p in curve:
        if p.get("status", "promoted") == "promoted" and p.get("version", 1) > 0 \
                and (p["pass_rate"] or 0.0) >= rate:
            return p[key]
    return None


def plot(runs: list[dict[str, Any]], start: float | None, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_samples, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(runs):
        for status, marker in (("promoted", "o-"), ("rejected", "x")):
            points = [p for p in run["curve"] if p["status"] == status]
            label = f"flywheel {status}" + (f" (run {i + 1})" if len(runs) > 1 else "")
            by_samples.plot([p["samples"] for p in points], [p["pass_rate"] for p in points],
                            marker, label=label, alpha=0.8)
            by_time.plot([p["seconds"] for p in points], [p["pass_rate"] for p in points],
                         marker, label=label, alpha=0.8)
        bound = run.get("bound") or []
        by_samples.plot([p["samples"] for p in bound], [p["pass_rate"] for p in bound], "s--",
                        label="supervised bound" + (f" (run {i + 1})" if len(runs) > 1 else ""))
        if run.get("seed_baseline"):
            by_samples.axhline(run["seed_baseline"]["pass_rate"], color="grey", linestyle=":",
                               label="seed-data SFT baseline" if i == 0 else None)
    for ax, xlabel in ((by_samples, "training samples"),
                       (by_time, "seconds since the services started")):
        if start is not None:
            ax.axhline(start, color="black", linestyle="--", label="starting model")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out pass rate")
        ax.set_ylim(0, 1.02)
    by_samples.legend(loc="lower right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _private(profile: Profile, tmp: Path, seed: int) -> Profile:
    """``profile`` on its own broker, home, store and ports, with the run's seed."""
    update: dict[str, Any] = {"home": tmp / "home", "checkpoint_url": str(tmp / "store"),
                              "kafka": {}, "broker_port": local_kafka.free_port()}
    if profile.model_path is None:
        update["seed_model"] = profile.seed_model.model_copy(update={"seed": seed})
    update["feeder"] = {**profile.feeder, "seed": seed}
    private = profile.model_copy(update=update)
    private.metrics_port = local_kafka.free_ports(private.processes)
    return private


def run(profile_path: Path | None = None) -> dict[str, Any]:
    stop = threading.Event()  # SIGTERM, SIGINT: end with what there is
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(profile_path, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(profile_path: Path | None, stop: threading.Event) -> dict[str, Any]:
    profile = load_profile(profile_path)
    embedded = profile.model_path is None  # a seed model: seeds, a stop at the target
    seconds = float(os.environ.get("FLYWHEEL_BENCH_SECONDS", "900" if embedded else "1800"))
    runs_wanted = int(os.environ.get("FLYWHEEL_BENCH_RUNS", "3" if embedded else "1"))
    out = Path(os.environ.get("FLYWHEEL_BENCH_OUT", "results"))
    suffix = "" if profile.name == "embedded" else f"-{profile.name}"
    runs: list[dict[str, Any]] = []
    start_rate: float | None = None
    for i in range(runs_wanted):
        if stop.is_set():
            break
        with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as tmp:
            private = _private(profile, Path(tmp), seed=i)
            if private.model_path is not None and start_rate is None:
                from services.envs.heldout import gate_dtype, gate_headline
                from services.gate.evaluate import evaluate

                started = time.perf_counter()
                start_rate = evaluate(private.model_path, gate_headline(private.gate),
                                      dtype=gate_dtype(private.gate))["pass_rate"]
                print(f"starting model: held-out pass rate {start_rate:.3f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            result = flywheel(private, seconds, stop_at=TARGET if embedded else None,
                              stop=stop)
            stack: Stack = result.pop("stack")
            assert stack.base_path is not None
            if stack.signalled:  # its handlers had the signal while it ran
                stop.set()
            curve = result["curve"]
            seed_rate = next((p["pass_rate"] for p in curve if p["version"] == 0
                              and p["status"] == "promoted"), start_rate)
            to_target = first_reaching(curve, "samples", TARGET)
            budget = max(result["trained_samples"], 2 * (to_target or 0))
            result["bound"] = supervised_bound(private, stack.base_path, budget,
                                               points=16 if embedded else 6, seed=i,
                                               stopping=stop.is_set)
            if embedded and not stop.is_set():
                result["seed_baseline"] = seed_baseline(private, stack.base_path,
                                                        result["trained_samples"])
            result["start_pass_rate"] = seed_rate
            result["samples_to_target"] = to_target
            reached = first_reaching(curve, "seconds", TARGET)
            result["seconds_to_target_with_seed_model"] = (
                None if reached is None else round(reached + result["seed_model_seconds"], 1))
            result["bound_samples_to_target"] = first_reaching(result["bound"], "samples",
                                                               TARGET)
            result["interrupted"] = stop.is_set()
            runs.append(result)
            print({k: v for k, v in result.items() if k not in ("curve", "bound")}, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"flywheel{suffix}.png"
    starts = [r["start_pass_rate"] for r in runs if r["start_pass_rate"] is not None]
    plot(runs, statistics.median(starts) if starts else None, png,
         f"profile {profile.name}: held-out pass rate")
    return {"profile": profile.name, "budget_seconds": seconds, "runs": runs,
            "interrupted": stop.is_set(), "summary": summarize(runs, embedded),
            "plot": str(png)}


def _median(values: list[Any]) -> float | None:
    """Median of costs to reach the target, a run that never reached it counting as
    infinite; None when the median itself is such a run."""
    if not values:
        return None
    median = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(median) else median


def summarize(runs: list[dict[str, Any]], embedded: bool) -> dict[str, Any]:
    if not runs:  # stopped before the first run ended
        return {"runs": 0}
    first = runs[0]
    promoted = [p for p in first["curve"] if p["status"] == "promoted" and p["version"] > 0]
    start = first["start_pass_rate"]
    summary: dict[str, Any] = {
        "runs": len(runs),
        "start_pass_rate": [r["start_pass_rate"] for r in runs],
        "final_promoted_pass_rate": [max((p["pass_rate"] for p in r["curve"]
                                          if p["status"] == "promoted"), default=None)
                                     for r in runs],
        "promoted_versions": [sum(1 for p in r["curve"] if p["status"] == "promoted"
                                  and p["version"] > 0) for r in runs],
        "rejected_versions": [sum(1 for p in r["curve"] if p["status"] == "rejected")
                              for r in runs],
        "trained_samples": [r["trained_samples"] for r in runs],
        "bound_final_pass_rate": [r["bound"][-1]["pass_rate"] if r["bound"] else None
                                  for r in runs],
        "store_bytes": [r["store_bytes"] for r in runs],
        "promotion_to_serving_seconds": [[p["first_seconds"] for p in r["promotion_to_serving"]]
                                         for r in runs],
    }
    if embedded:
        # An interrupted run did not have its budget: it is no "never reached" in a median.
        whole = [r for r in runs if not r.get("interrupted")]
        samples = _median([r["samples_to_target"] for r in whole])
        bound = _median([r["bound_samples_to_target"] for r in whole])
        summary |= {
            "interrupted_runs_left_out": len(runs) - len(whole),
            "median_seconds_to_0.8_with_seed_model": _median(
                [r["seconds_to_target_with_seed_model"] for r in whole]),
            "median_samples_to_0.8": samples, "median_bound_samples_to_0.8": bound,
            "samples_ratio_to_bound": None if not samples or not bound
            else round(samples / bound, 2),
        }
    else:
        best = max((p["pass_rate"] for p in promoted), default=None)
        summary |= {
            "rise": None if best is None or start is None else round(best - start, 3),
            "no_promoted_below_start": start is not None and all(
                p["pass_rate"] >= start for p in promoted),
        }
    return summary
