"""The gate's own metrics (``flywheel_gate_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

GATE_PROMOTED_VERSION = Gauge("flywheel_gate_promoted_version", "Current promoted version.")
GATE_SCORE = Gauge("flywheel_gate_score", "Held-out evaluation of the last candidate, by "
                   "held-out set and metric.", ["set", "metric"])
GATE_PROMOTED_SCORE = Gauge("flywheel_gate_promoted_score", "Held-out evaluation of the "
                            "promoted version (the base before any promotion), by held-out "
                            "set and metric.", ["set", "metric"])
GATE_DECISIONS = Counter("flywheel_gate_decisions_total", "Gate decisions by outcome: "
                         "promoted, regressed, not_better, invalid, superseded.",
                         ["outcome"])
GATE_REGRESSIONS = Counter("flywheel_gate_regressions_total", "Regressed candidates by a "
                           "source of their data (kind: env, router_policy, filter_policy, "
                           "scorer).", ["kind", "value"])
GATE_REGRESSION_STREAK = Gauge("flywheel_gate_regression_streak", "Consecutive regressed "
                               "candidates holding data from this source that also lost "
                               "ground over the whole suite (as the rollback counts them); "
                               "an alert fires when a source stands out.", ["kind", "value"])
GATE_EVALUATION_FAILURES = Counter(
    "flywheel_gate_evaluation_failures_total", "Evaluations that raised, by whose: candidate "
    "(retried; then the reference is evaluated to tell the candidate's fault from the "
    "gate's), reference (the gate cannot evaluate: no decision, the service stops), resolve "
    "(reading a candidate failed other than by refusal: no decision, the service stops).",
    ["of"])
