"""The flywheel's Grafana dashboards, as code: `python deploy/grafana/dashboards.py` writes
deploy/grafana/dashboards/*.json (provisioned by provisioning/dashboards.yml). Edit here, not
the JSON; tests/unit/test_dashboards.py fails when the two differ, when a query names a
metric the services do not export, or when promtool cannot parse a query.

Five dashboards: flow (rates, lag, batch latency), quality (reward, pass rate per environment
and difficulty, verdicts, acceptance, rejections, groups with RL signal, samples per stage),
learning (held-out scores of the promoted version and of the last candidate, decisions, loss,
rollbacks, curriculum), fleet (versions served, reload latency, tokens per trajectory and per
second), health (dead letters, scrape status, restarts, transactions).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

Panel = tuple[str, str, list[tuple[str, str]]]
"""(title, unit, [(PromQL, legend)]): one time-series panel."""


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}[{RATE}]))"


def quantile(q: float, metric: str, by: str = "") -> str:
    keep = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keep}) (rate({metric}_bucket[{RATE}])))"


def quantiles(metric: str, qs: tuple[float, ...], by: str = "") -> list[tuple[str, str]]:
    """One query per quantile of a histogram, legends ``p50`` (after ``{{by}}`` if grouped)."""
    prefix = f"{{{{{by}}}}} " if by else ""
    return [(quantile(q, metric, by), f"{prefix}p{round(q * 100)}") for q in qs]


def share(metric: str, match: str, by: str = "") -> str:
    """The share of a counter's rate whose series match ``match`` (e.g. ``verdict="correct"``)."""
    grouping = f" by ({by})" if by else ""
    return (f"sum{grouping} (rate({metric}{{{match}}}[{RATE}])) / "
            f"sum{grouping} (rate({metric}[{RATE}]))")


def mean_reward(by: str = "") -> str:
    """The scorer's mean reward: rewards can be negative, so the reward histogram has no
    ``_sum``; its positive and negative parts are counters of their own."""
    grouping = f" by ({by})" if by else ""
    return (f"(sum{grouping} (rate(flywheel_scorer_reward_positive_total[{RATE}])) - "
            f"sum{grouping} (rate(flywheel_scorer_reward_negative_total[{RATE}]))) / "
            f"sum{grouping} (rate(flywheel_scorer_reward_count[{RATE}]))")


DASHBOARDS: dict[str, tuple[str, list[Panel]]] = {
    "flow": ("Flywheel / flow", [
        ("Records consumed /s", "reqps", [
            (rate("flywheel_runtime_records_consumed_total", "service, topic"),
             "{{service}} <- {{topic}}")]),
        ("Records produced /s", "reqps", [
            (rate("flywheel_runtime_records_produced_total", "service, topic"),
             "{{service}} -> {{topic}}")]),
        ("Consumer lag", "short", [
            ("sum by (service, topic) (flywheel_runtime_consumer_lag_records)",
             "{{service}} on {{topic}}")]),
        ("Batch latency (p50, p95)", "s",
         quantiles("flywheel_runtime_batch_seconds", (0.5, 0.95), "service")),
        ("Tasks published /s and feeder backlog", "short", [
            (rate("flywheel_feeder_tasks_published_total", "source"), "published {{source}}"),
            ("sum(flywheel_feeder_backlog_tasks)", "backlog")]),
    ]),
    "quality": ("Flywheel / quality", [
        ("Reward (mean, p10, p90)", "short", [
            (mean_reward(), "mean"),
            *quantiles("flywheel_scorer_reward", (0.1, 0.9))]),
        ("Mean reward by environment and difficulty", "short", [
            (mean_reward("env, difficulty"), "{{env}} {{difficulty}}")]),
        ("Pass rate (correct verdicts) by environment and difficulty", "percentunit", [
            (share("flywheel_scorer_verdicts_total", 'verdict="correct"', "env, difficulty"),
             "{{env}} {{difficulty}}")]),
        ("Verdicts /s", "reqps", [
            (rate("flywheel_scorer_verdicts_total", "verdict"), "{{verdict}}")]),
        ("Filter accept ratio", "percentunit", [
            ("avg(flywheel_filter_accept_ratio)", "accepted share")]),
        ("Rejections by reason /s", "reqps", [
            (rate("flywheel_filter_rejections_total", "reason"), "{{reason}}")]),
        ("Samples routed per stage /s", "reqps", [
            (rate("flywheel_router_routed_samples_total", "stage"), "{{stage}}")]),
        ("Accepted groups with reward variance (RL signal)", "percentunit", [
            (share("flywheel_router_groups_total", 'reward_variance="true"'), "share")]),
        ("Samples trained per stage /s", "reqps", [
            (rate("flywheel_trainer_samples_total", "stage"), "{{stage}}")]),
    ]),
    "learning": ("Flywheel / learning", [
        ("Held-out pass rate of the promoted version, by set", "percentunit", [
            ('max by (set) (flywheel_gate_promoted_score{metric="pass_rate"})', "{{set}}")]),
        ("Held-out mean score of the promoted version, by set", "short", [
            ('max by (set) (flywheel_gate_promoted_score{metric="mean_score"})', "{{set}}")]),
        ("Held-out pass rate of the last candidate, by set", "percentunit", [
            ('max by (set) (flywheel_gate_score{metric="pass_rate"})', "{{set}}")]),
        ("Promoted and candidate versions", "short", [
            ("max(flywheel_gate_promoted_version)", "promoted"),
            ("max(flywheel_trainer_candidate_version)", "latest candidate")]),
        ("Gate decisions /h", "short", [
            ("sum by (outcome) (increase(flywheel_gate_decisions_total[1h]))", "{{outcome}}")]),
        ("Training loss by stage", "short", [
            ("max by (stage) (flywheel_trainer_loss)", "{{stage}}")]),
        ("Rollbacks and discarded versions /h", "short", [
            ("sum(increase(flywheel_trainer_rollbacks_total[1h]))", "rollbacks"),
            ("sum(increase(flywheel_trainer_discarded_versions_total[1h]))", "discarded")]),
        ("Curriculum: sampled pass rate by level, frontier", "short", [
            ("max by (difficulty) (flywheel_curriculum_pass_rate)", "level {{difficulty}}"),
            ("max(flywheel_curriculum_frontier)", "frontier")]),
    ]),
    "fleet": ("Flywheel / fleet", [
        ("Version served per generator", "short", [
            ("max by (instance) (flywheel_generator_policy_version)", "{{instance}}"),
            ("max(flywheel_gate_promoted_version)", "promoted")]),
        ("Reload latency (p50, p95)", "s",
         quantiles("flywheel_generator_reload_seconds", (0.5, 0.95))),
        ("Completion tokens per trajectory (p50, p95)", "short",
         quantiles("flywheel_generator_trajectory_tokens", (0.5, 0.95))),
        ("Tokens /s per generator", "short", [
            (rate("flywheel_generator_tokens_total", "instance"), "{{instance}}")]),
        ("Trajectories /s per generator", "reqps", [
            (rate("flywheel_generator_trajectories_total", "instance"), "{{instance}}")]),
    ]),
    "health": ("Flywheel / health", [
        ("Dead letters /s by error", "reqps", [
            (rate("flywheel_runtime_records_dead_lettered_total", "service, error"),
             "{{service}}: {{error}}")]),
        ("Services answering scrapes", "short", [
            ('up{job="flywheel"}', "{{service}} {{instance}}")]),
        ("Restarts /h", "short", [
            ('changes(process_start_time_seconds{job="flywheel"}[1h])', "{{service}}")]),
        ("Transactions /s by outcome", "reqps", [
            (rate("flywheel_runtime_transactions_total", "service, outcome"),
             "{{service}} {{outcome}}")]),
        ("Ready (connected, partitions assigned)", "short", [
            ("max by (service) (flywheel_runtime_ready)", "{{service}}")]),
    ]),
}


def dashboard(uid: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    out = []
    for i, (name, unit, queries) in enumerate(panels):
        out.append({
            "id": i + 1, "type": "timeseries", "title": name, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr,
                         "legendFormat": legend} for j, (expr, legend) in enumerate(queries)],
        })
    return {
        "uid": f"flywheel-{uid}", "title": title, "tags": ["flywheel"], "editable": True,
        "schemaVersion": 39, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus",
                                 "type": "datasource", "query": "prometheus"}]},
        "panels": out,
    }


def render() -> dict[str, str]:
    """File name -> JSON text, for every dashboard."""
    return {f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
            for uid, (title, panels) in DASHBOARDS.items()}


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"wrote {OUT / name}", file=sys.stderr)
