"""What a replay changed: its outputs against the live flow's for the same trajectories.

``flywheel replay report NAME`` (and the end of every replay) reads the replay's outputs and
the live topics' records of the same trajectories (joined by trajectory id) and counts, per
stage the replay ran:

- **scorer**: verdicts under the old and the new config, verdict changes (``incorrect ->
  correct``), the mean reward before and after and how many rewards changed;
- **filter**: accepted and rejected under the old and the new policy, rejections by reason,
  newly accepted, newly rejected by reason;
- **router**: samples per training stage under the old and the new policy, and samples that
  moved (``sft -> none``: routed to SFT before, to no stage now).

A trajectory the live flow has no record of counts as ``unmatched`` (history older than the
live topics' retention, or a replay over records the live stage never saw). The report is a
rich table, a JSON file (``--json``) and a PNG of the distributions (``--png``, needs
matplotlib).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition
from pydantic import BaseModel, Field
from rich.console import Group
from rich.table import Table

from schemas import FilterDecision, RoutedSample, ScoredTrajectory
from services.common.config import KafkaSettings

ROUTES = ("sft", "cpt", "rl")


def read_topic(kafka: KafkaSettings, topic: str) -> Iterator[bytes]:
    """Every committed record value of ``topic`` up to its end offsets as of now."""
    consumer = Consumer(kafka.client_config() | {
        "group.id": "flywheel-replay-report", "enable.auto.commit": False,
        "isolation.level": "read_committed", "enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return
        ends = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = (low, high)
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in ends.items()])
        left = set(ends)
        while left:
            for msg in consumer.consume(1000, 1.0):
                err, p = msg.error(), msg.partition()
                assert p is not None
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"reading {topic}: {err}")
                offset = msg.offset() or 0
                if err is None and msg.value() is not None:
                    yield msg.value()  # type: ignore[misc]
                if offset + (0 if err is not None else 1) >= ends[p][1]:
                    left.discard(p)
    finally:
        consumer.close()


class ScorerDiff(BaseModel):
    verdicts_old: dict[str, int] = Field(default_factory=dict)
    verdicts_new: dict[str, int] = Field(default_factory=dict)
    verdict_changes: dict[str, int] = Field(default_factory=dict)
    mean_reward_old: float | None = None
    mean_reward_new: float | None = None
    rewards_changed: int = 0
    unmatched: int = 0


class FilterDiff(BaseModel):
    old: dict[str, int] = Field(default_factory=dict)
    new: dict[str, int] = Field(default_factory=dict)
    reasons_old: dict[str, int] = Field(default_factory=dict)
    reasons_new: dict[str, int] = Field(default_factory=dict)
    newly_accepted: int = 0
    newly_rejected: dict[str, int] = Field(default_factory=dict)
    """By the new rejection's reasons (a decision with two reasons counts under both)."""
    unmatched: int = 0


class RouterDiff(BaseModel):
    old: dict[str, int] = Field(default_factory=dict)
    new: dict[str, int] = Field(default_factory=dict)
    moved: dict[str, int] = Field(default_factory=dict)
    """``old -> new`` routes of samples whose routes changed (``none``: no stage)."""


class Report(BaseModel):
    name: str
    trajectories: int
    """Trajectories the replay's first stage decided on."""
    scorer: ScorerDiff | None = None
    filter: FilterDiff | None = None
    router: RouterDiff | None = None
    rewards_old: list[float] = Field(default_factory=list, exclude=True)
    rewards_new: list[float] = Field(default_factory=list, exclude=True)


def _decisions(kafka: KafkaSettings, prefix: str) -> dict[str, FilterDecision]:
    out = {}
    for name in ("filtered", "rejected"):
        for value in read_topic(kafka, f"{prefix}{name}"):
            d = FilterDecision.model_validate_json(value)
            out[str(d.scored.trajectory.event_id)] = d
    return out


def _routes(kafka: KafkaSettings, prefix: str, keep: set[str]) -> dict[str, set[str]]:
    """Trajectory id -> the training stages it was routed to (only ids in ``keep``)."""
    out: dict[str, set[str]] = {}
    for stage in ROUTES:
        for value in read_topic(kafka, f"{prefix}accepted.{stage}"):
            for s in RoutedSample.model_validate_json(value).samples:
                tid = str(s.trajectory.event_id)
                if tid in keep:
                    out.setdefault(tid, set()).add(stage)
    return out


def _route_name(stages: set[str] | None) -> str:
    return "+".join(sorted(stages)) if stages else "none"


def build(kafka: KafkaSettings, name: str, stages: list[str]) -> Report:
    """The report of replay ``name`` (stages as its manifest lists them)."""
    live = kafka.topic_prefix
    out = f"{live}replay.{name}."
    report = Report(name=name, trajectories=0)
    ids: set[str] = set()
    if "scorer" in stages:
        new_scored = {str(s.trajectory.event_id): s for s in (
            ScoredTrajectory.model_validate_json(v) for v in read_topic(kafka, f"{out}scored"))}
        old_scored = {}
        for value in read_topic(kafka, f"{live}scored"):
            s = ScoredTrajectory.model_validate_json(value)
            if str(s.trajectory.event_id) in new_scored:
                old_scored[str(s.trajectory.event_id)] = s
        sd = ScorerDiff(unmatched=len(new_scored.keys() - old_scored.keys()))
        sd.verdicts_new = dict(Counter(s.verdict for s in new_scored.values()))
        sd.verdicts_old = dict(Counter(s.verdict for s in old_scored.values()))
        pairs = [(old_scored[t], s) for t, s in new_scored.items() if t in old_scored]
        sd.verdict_changes = dict(Counter(f"{o.verdict} -> {n.verdict}" for o, n in pairs
                                          if o.verdict != n.verdict))
        sd.rewards_changed = sum(1 for o, n in pairs if o.reward != n.reward)
        report.rewards_old = [o.reward for o, _ in pairs]
        report.rewards_new = [s.reward for s in new_scored.values()]
        if report.rewards_old:
            sd.mean_reward_old = sum(report.rewards_old) / len(report.rewards_old)
        if report.rewards_new:
            sd.mean_reward_new = sum(report.rewards_new) / len(report.rewards_new)
        report.scorer, ids = sd, set(new_scored)
    if "filter" in stages:
        new = _decisions(kafka, out)
        old = {t: d for t, d in _decisions(kafka, live).items() if t in new}
        diff = FilterDiff(unmatched=len(new.keys() - old.keys()))
        for label, decided in (("old", old), ("new", new)):
            setattr(diff, label, dict(Counter("accepted" if d.accepted else "rejected"
                                              for d in decided.values())))
            setattr(diff, f"reasons_{label}", dict(Counter(
                r for d in decided.values() for r in d.reasons)))
        both = [(old[t], d) for t, d in new.items() if t in old]
        diff.newly_accepted = sum(1 for o, n in both if n.accepted and not o.accepted)
        diff.newly_rejected = dict(Counter(r for o, n in both if o.accepted and not n.accepted
                                           for r in n.reasons))
        report.filter, ids = diff, set(new)
    if "router" in stages:
        if not ids:  # a router-only replay: the trajectories of its input's decisions
            ids = {str(d.scored.trajectory.event_id) for d in (
                FilterDecision.model_validate_json(v)
                for v in read_topic(kafka, f"{live}filtered"))}
        new_routes = _routes(kafka, out, ids)
        old_routes = _routes(kafka, live, ids)
        report.router = RouterDiff(
            old=dict(Counter(s for v in old_routes.values() for s in v)),
            new=dict(Counter(s for v in new_routes.values() for s in v)),
            moved=dict(Counter(
                f"{_route_name(old_routes.get(t))} -> {_route_name(new_routes.get(t))}"
                for t in old_routes.keys() | new_routes.keys()
                if old_routes.get(t) != new_routes.get(t))))
    report.trajectories = len(ids)
    return report


def _table(title: str, rows: dict[str, tuple[Any, Any]]) -> Table:
    table = Table(title=title)
    for col in ("", "old", "new"):
        table.add_column(col, justify="right" if col else "left")
    for key, (a, b) in rows.items():
        table.add_row(key, f"{a:,}" if isinstance(a, int) else str(a),
                      f"{b:,}" if isinstance(b, int) else str(b))
    return table


def _both(old: dict[str, int], new: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {k: (old.get(k, 0), new.get(k, 0)) for k in sorted(old.keys() | new.keys())}


def render(report: Report) -> Group:
    parts: list[Any] = []
    if report.scorer is not None:
        s = report.scorer
        rows: dict[str, tuple[Any, Any]] = dict(_both(s.verdicts_old, s.verdicts_new))
        rows["mean reward"] = tuple(  # type: ignore[assignment]
            "-" if v is None else f"{v:.3f}" for v in (s.mean_reward_old, s.mean_reward_new))
        parts.append(_table(f"scorer: {s.rewards_changed:,} rewards changed, "
                            f"{s.unmatched:,} unmatched", rows))
        if s.verdict_changes:
            parts.append(_changes("verdict changes", s.verdict_changes))
    if report.filter is not None:
        f = report.filter
        rows = dict(_both(f.old, f.new))
        rows.update({f"reason {k}": v for k, v in _both(f.reasons_old, f.reasons_new).items()})
        parts.append(_table(f"filter: {f.newly_accepted:,} newly accepted, "
                            f"{sum(f.newly_rejected.values()):,} newly rejected "
                            f"(by reason below), {f.unmatched:,} unmatched", rows))
        if f.newly_rejected:
            parts.append(_changes("newly rejected, by reason", f.newly_rejected))
    if report.router is not None:
        r = report.router
        parts.append(_table("router: samples per training stage",
                            dict(_both(r.old, r.new))))
        if r.moved:
            parts.append(_changes("moved between stages", r.moved))
    return Group(*parts)


def _changes(title: str, counts: dict[str, int]) -> Table:
    table = Table(title=title)
    table.add_column("")
    table.add_column("samples", justify="right")
    for key, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(key, f"{n:,}")
    return table


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=1) + "\n",
                    encoding="utf-8")


def write_png(report: Report, path: Path) -> None:
    """Bar charts of the counts, and the reward histograms of a re-scoring."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--png needs matplotlib (pip install matplotlib)") from exc
    panels: list[tuple[str, dict[str, int], dict[str, int]]] = []
    if report.filter is not None:
        panels.append(("filter decisions and reasons",
                       {**report.filter.old, **report.filter.reasons_old},
                       {**report.filter.new, **report.filter.reasons_new}))
    if report.router is not None:
        panels.append(("router: samples per stage", report.router.old, report.router.new))
    rewards = report.scorer is not None
    fig, axes = plt.subplots(1, len(panels) + rewards, figsize=(6 * (len(panels) + rewards),
                                                                4), squeeze=False)
    for ax, (title, old, new) in zip(axes[0], panels, strict=False):
        keys = sorted(old.keys() | new.keys())
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [old.get(k, 0) for k in keys], 0.4, label="old")
        ax.bar([x + 0.2 for x in xs], [new.get(k, 0) for k in keys], 0.4, label="new")
        ax.set_xticks(list(xs), keys, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    if rewards:
        ax = axes[0][-1]
        ax.hist([report.rewards_old, report.rewards_new], bins=30, label=["old", "new"])
        ax.set_title("reward")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
