"""``flywheel bench flywheel``: the improvement result.

The embedded profile runs for a fixed budget (``FLYWHEEL_BENCH_SECONDS``, default 900 s after
the bootstrap) on a private broker, home and checkpoint store. The curve is the gate's
held-out pass rate of every decided version against wall clock (from the start of the
services) and against version. In the same run a baseline spends the same training compute
(the samples the flywheel's trainer trained on, with its optimizer settings) on one-shot SFT on
the seed data only, from the same seed model. Writes ``results/flywheel.json`` (via the runner)
and ``results/flywheel.png``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from services.common import broker as local_kafka
from services.up.profile import Profile
from services.up.stack import Stack

TARGET_PASS_RATE = 0.8
TARGET_MARGIN = 0.3


def flywheel(profile: Profile, seconds: float) -> dict[str, Any]:
    """Run ``profile`` for ``seconds``; returns the seed model, curve and training totals."""
    stack = Stack(profile)
    boot_started = time.perf_counter()
    stack.prepare(say=lambda line: print(line, flush=True))
    boot_seconds = time.perf_counter() - boot_started
    started = time.time()
    try:
        stack.run(seconds=seconds)
    finally:
        if stack.started_broker:
            local_kafka.stop(profile.home / "kafka")
    versions = stack.versions
    assert versions is not None
    candidates = list(versions.candidates.values())
    decided = versions.decided()
    curve = [{"version": e.version, "status": e.status,
              "seconds": round(max(0.0, e.created_at.timestamp() - started), 2),
              "pass_rate": e.metrics.get("pass_rate")} for e in decided]
    trained = sum(sum(e.stage_mix.values()) for e in candidates if e.version > 0)
    train_seconds = sum(e.metrics.get("train_seconds", 0.0) for e in candidates)
    return {"stack": stack, "curve": curve, "bootstrap_seconds": round(boot_seconds, 1),
            "trained_samples": trained, "train_seconds": round(train_seconds, 2)}


def baseline(profile: Profile, seed_folder: Path, samples: int) -> dict[str, Any]:
    """One-shot SFT on the seed data only, from the seed model, for ``samples`` samples."""
    import torch

    from services.bootstrap import train_on_seed
    from services.envs.heldout import HeldOut
    from services.gate.evaluate import evaluate
    from services.generator.engines import TransformersEngine
    from services.trainer.store import CheckpointStore
    from services.trainer.train import OptimSettings

    torch.set_num_threads(2)
    engine = TransformersEngine(seed_folder)
    optim = OptimSettings(**profile.trainer.get("optim", {}))
    boot = profile.bootstrap.model_copy(update={"micro_batch": optim.micro_batch})
    done, seconds = train_on_seed(engine.model, engine.tokenizer, engine.pad, boot,
                                  samples=samples, lr=optim.lr)
    with tempfile.TemporaryDirectory(prefix="flywheel-baseline-") as tmp:
        uri, _ = CheckpointStore(tmp).write(1, engine.model, engine.tokenizer, None)
        scores = evaluate(Path(uri), HeldOut(**profile.gate.get("held_out", {})))
    return {"samples": done, "seconds": round(seconds, 2), "lr": optim.lr, **scores}


def plot(curve: list[dict[str, Any]], base: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_version) = plt.subplots(1, 2, figsize=(11, 4))
    for status, marker in (("promoted", "o"), ("rejected", "x")):
        points = [p for p in curve if p["status"] == status]
        by_time.plot([p["seconds"] for p in points], [p["pass_rate"] for p in points], marker,
                     label=status)
        by_version.plot([p["version"] for p in points], [p["pass_rate"] for p in points],
                        marker, label=status)
    for ax, xlabel in ((by_time, "seconds since the services started"),
                       (by_version, "version")):
        ax.axhline(base, color="grey", linestyle="--", label="one-shot SFT baseline")
        ax.axhline(TARGET_PASS_RATE, color="green", linestyle=":", label="target 0.8")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out pass rate (3-digit sums)")
        ax.set_ylim(0, 1.02)
    by_version.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run() -> dict[str, Any]:
    seconds = float(os.environ.get("FLYWHEEL_BENCH_SECONDS", "900"))
    out = Path(os.environ.get("FLYWHEEL_BENCH_OUT", "results"))
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as tmp:
        profile = Profile(home=Path(tmp) / "home", checkpoint_url=str(Path(tmp) / "store"),
                          broker_port=local_kafka.free_port())
        profile.metrics_port = local_kafka.free_ports(profile.processes)
        result = flywheel(profile, seconds)
        stack: Stack = result.pop("stack")
        assert stack.base_path is not None
        base = baseline(profile, stack.base_path, result["trained_samples"])
    curve = result["curve"]
    promoted = [p for p in curve if p["status"] == "promoted"]
    seed = next((p["pass_rate"] for p in promoted if p["version"] == 0), None)
    final = promoted[-1]["pass_rate"] if promoted else None
    reached = next((p["seconds"] for p in promoted if p["version"] > 0
                    and (p["pass_rate"] or 0) >= TARGET_PASS_RATE), None)
    out.mkdir(parents=True, exist_ok=True)
    plot(curve, base["pass_rate"], out / "flywheel.png")
    return {
        "budget_seconds": seconds, "bootstrap_seconds": result["bootstrap_seconds"],
        "seed_pass_rate": seed, "final_promoted_pass_rate": final,
        "promoted_versions": sum(1 for p in promoted if p["version"] > 0),
        "rejected_versions": sum(1 for p in curve if p["status"] == "rejected"),
        "seconds_to_target": reached, "target_pass_rate": TARGET_PASS_RATE,
        "trainer_samples": result["trained_samples"],
        "trainer_train_seconds": result["train_seconds"],
        "baseline": base, "margin_over_baseline": None if final is None
        else round(final - base["pass_rate"], 3),
        "target_met": reached is not None and reached <= 900,  # the 15 minutes
        "margin_met": final is not None and final - base["pass_rate"] >= TARGET_MARGIN,
        "curve": curve, "plot": str(out / "flywheel.png"),
    }
