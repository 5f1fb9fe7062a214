"""The scorer's own metrics (``flywheel_scorer_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SCORE_BUCKETS = (-10, -1, -0.5, 0, 0.1, 0.25, 0.5, 0.75, 0.9, 1, 2, 5, 10, 100, 1000, 10000)

SCORES = Histogram(
    "flywheel_scorer_score", "Score values, by scorer.", ["scorer"], buckets=SCORE_BUCKETS,
)
REWARD = Histogram("flywheel_scorer_reward", "Scalar reward after the reward rule, by "
                   "environment and task difficulty.", ["env", "difficulty"],
                   buckets=SCORE_BUCKETS)
# Rewards can be negative (``fail_reward``), so the histogram has no ``_sum`` (it would not be
# a counter: prometheus_client leaves it out). Its mean over any window comes from these two
# counters instead: (rate(positive) - rate(negative)) / rate(flywheel_scorer_reward_count).
REWARD_POSITIVE = Counter("flywheel_scorer_reward_positive_total", "Sum of the positive "
                          "rewards, by environment and task difficulty.", ["env", "difficulty"])
REWARD_NEGATIVE = Counter("flywheel_scorer_reward_negative_total", "Sum of the negative "
                          "rewards' magnitudes, by environment and task difficulty.",
                          ["env", "difficulty"])
VERDICTS = Counter("flywheel_scorer_verdicts_total", "Scored trajectories by verdict, "
                   "environment and task difficulty.", ["verdict", "env", "difficulty"])
SANDBOX_KILLS = Counter(
    "flywheel_scorer_sandbox_kills_total",
    "Code-verifier sandboxes stopped by a limit or a rule, by reason.", ["reason"],
)


def difficulty_label(difficulty: float) -> str:
    """A task's difficulty as a label value, to one decimal: task sets with continuous
    difficulties must not make a series per task."""
    return f"{round(difficulty, 1):g}"
