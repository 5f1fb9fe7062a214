"""The filter's own metrics (``flywheel_filter_*``). Accept ratio:
``rate(decisions_total{outcome="accepted"}) / rate(decisions_total)``, or the batch gauge."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("flywheel_filter_decisions_total", "Decisions by outcome.", ["outcome"])
REJECTIONS = Counter("flywheel_filter_rejections_total",
                     "Rejection reasons (a rejection may list several).", ["reason"])
FLAGS = Counter("flywheel_filter_flags_total", "Non-rejecting flags set on decisions.",
                ["flag"])
DUPLICATE_HITS = Counter("flywheel_filter_duplicate_hits_total",
                         "Samples found in the duplicate memory, by kind.", ["kind"])
ACCEPT_RATIO = Gauge("flywheel_filter_accept_ratio", "Accepted share of the last decided "
                     "groups' samples.")
GROUP_ASSEMBLY_SECONDS = Histogram(
    "flywheel_filter_group_assembly_seconds",
    "From a group's first sample seen to the group decided.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
PENDING_GROUPS = Gauge("flywheel_filter_pending_groups", "Groups waiting for members.")
