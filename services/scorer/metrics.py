"""The scorer's own metrics (``flywheel_scorer_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SCORE_BUCKETS = (-10, -1, -0.5, 0, 0.1, 0.25, 0.5, 0.75, 0.9, 1, 2, 5, 10, 100, 1000, 10000)

SCORES = Histogram(
    "flywheel_scorer_score", "Score values, by scorer.", ["scorer"], buckets=SCORE_BUCKETS,
)
REWARD = Histogram("flywheel_scorer_reward", "Scalar reward after the reward rule.",
                   buckets=SCORE_BUCKETS)
VERDICTS = Counter("flywheel_scorer_verdicts_total", "Scored trajectories by verdict.",
                   ["verdict"])
SANDBOX_KILLS = Counter(
    "flywheel_scorer_sandbox_kills_total",
    "Code-verifier sandboxes stopped by a limit or a rule, by reason.", ["reason"],
)
