"""The feeder's metrics: what it published, the backlog, and both curricula."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

TASKS_PUBLISHED = Counter("flywheel_feeder_tasks_published_total", "Tasks published.",
                          ["source"])
BACKLOG = Gauge("flywheel_feeder_backlog_tasks", "Tasks waiting for a generator.")
LEVEL_PASS_RATE = Gauge("flywheel_curriculum_pass_rate",
                        "Recent sampled pass rate per difficulty level.", ["difficulty"])
FRONTIER = Gauge("flywheel_curriculum_frontier", "The difficulty tasks are drawn around.")
TASKS_BY_STATE = Gauge("flywheel_feeder_tasks", "Task-set tasks by curriculum state.",
                       ["state"])
GROUPS_WITH_VARIANCE = Gauge("flywheel_feeder_groups_with_variance_ratio",
                             "Share of recent complete groups whose verdicts differ (GRPO "
                             "signal).")
HELD_OUT_EXCLUDED = Counter("flywheel_feeder_held_out_excluded_total",
                            "Tasks kept off `tasks` because they are held out.", ["source"])
CYCLE_SKIPPED = Counter("flywheel_feeder_cycle_skipped_total", "Mastered or hopeless tasks "
                        "the cycle passed over until their next epoch.", ["taskset"])
