"""The router's own metrics (``flywheel_router_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROUTED_SAMPLES = Counter("flywheel_router_routed_samples_total",
                         "Samples sent to a training stage (RL: every member).", ["stage"])
RL_GROUPS = Counter("flywheel_router_rl_groups_total",
                    "Assembled RL groups by outcome: routed, capped, timeout.", ["outcome"])
RL_SKIPPED = Counter("flywheel_router_rl_skipped_samples_total",
                     "Accepted samples not sent to RL, by reason: no_signal, too_small, "
                     "group_closed.",
                     ["reason"])
GROUPS = Counter("flywheel_router_groups_total",
                 "Groups the filter accepted members of, by whether their rewards vary "
                 "(reward_variance true/false): each accepted member adds 1/accepted, so a "
                 "whole group counts 1.", ["reward_variance"])
CAPPED = Counter("flywheel_router_capped_total", "Samples a stage's mix cap held back.",
                 ["stage"])
GROUP_ASSEMBLY_SECONDS = Histogram(
    "flywheel_router_group_assembly_seconds", "From an RL group's first sample to its routing.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
PENDING_GROUPS = Gauge("flywheel_router_pending_groups", "RL groups waiting for members.")
