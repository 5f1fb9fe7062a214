"""The gate's promotion rule over a held-out suite, as pure functions.

A candidate is compared with the reference: the promoted version (or, before any promotion,
the base model), whose metrics and per-task outcomes the gate keeps in its state. It is
promoted when both hold:

1. **No set regresses.** For every set and every tracked metric, the candidate's value is at
   least the best value any promoted version (the base included) reached on that set, minus
   the set's tolerance. Against the best, not the latest, so tolerated drops cannot add up.
2. **At least one set improves beyond noise.** Per set, and for the whole suite pooled when it
   has more than one set, the candidate's per-task outcomes are paired with the reference's:
   ``wins`` are tasks it passes that the reference failed, ``losses`` the reverse. The
   one-sided exact sign test on them (McNemar's exact test) gives ``p``; improvement needs
   ``p <= alpha / m`` for at least one of the ``m`` tests (Bonferroni), and more wins than
   losses. Equal outcomes carry no evidence either way. Outcomes pair only on the same set:
   the reference keeps each set's digest (:meth:`HeldOut.digest`), and the gate evaluates the
   reference on a set it has no outcomes for, or that changed, before judging
   (``GateStage``). There is no promotion without a paired test: a set the reference has no
   outcomes for takes no part, and none can make the candidate better.

A candidate failing (1) is rejected as ``regressed``: the trainer rolls back from it. One that
passes (1) but not (2) is rejected as ``not_better``: sound so far, but not shown better than
noise; the trainer keeps building on it, and its successors are tested again against the same
reference, so small real gains add up to a promotion.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Any

from services.envs.heldout import POOLED, HeldOut
from services.gate.evaluate import SetResult


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def flatten(results: dict[str, SetResult], headline: str) -> dict[str, float]:
    """Metrics as the decision event carries them: ``<set>/<metric>`` for every set, and the
    headline set's metrics under their plain names (``pass_rate``), as dashboards know them."""
    flat = {f"{name}/{k}": v for name, r in results.items() for k, v in r.metrics.items()}
    if headline in results:  # always, but for a reference evaluated again on some sets
        flat.update(results[headline].metrics)
    return flat


def reference(results: dict[str, SetResult], headline: str, version: int, *, base: bool,
              digests: dict[str, str], uri: str | None = None,
              event: dict[str, Any] | None = None) -> dict[str, Any]:
    """The state entry for a reference version: metrics, the best values so far (its own),
    the per-task outcomes as compact strings, each set's digest (what the outcomes pair on),
    and its checkpoint event (``event``, as JSON), to evaluate it again on a new set."""
    flat = flatten(results, headline)
    return {"version": version, "metrics": flat, "best": dict(flat), "base": base, "uri": uri,
            "outcomes": {n: "".join(map(str, r.outcomes)) for n, r in results.items()},
            "sets": {n: digests[n] for n in results if n in digests}, "event": event}


def stale(ref: dict[str, Any], digests: dict[str, str]) -> list[str]:
    """The sets ``ref`` has no outcomes for, or has them for another content of the set."""
    outcomes, known = ref.get("outcomes") or {}, ref.get("sets") or {}
    return [n for n, d in digests.items() if n not in outcomes or known.get(n) != d]


def refresh(ref: dict[str, Any], results: dict[str, SetResult], headline: str,
            digests: dict[str, str], names: list[str]) -> dict[str, Any]:
    """``ref`` with its outcomes and metrics on the sets ``names`` replaced by ``results``
    (the reference evaluated again): on a new or changed set its own values are the floor
    (``best``), the old set's say nothing about the new one."""
    part = reference({n: results[n] for n in names}, headline, ref["version"],
                     base=ref.get("base", False), digests=digests)
    return {**ref, **{k: {**(ref.get(k) or {}), **part[k]}
                      for k in ("metrics", "best", "outcomes", "sets")}}


@dataclass
class Judgement:
    promoted: bool
    rejection: str | None
    """``regressed`` or ``not_better`` when not promoted."""
    reason: str
    metrics: dict[str, float]


def judge(results: dict[str, SetResult], ref: dict[str, Any], sets: list[HeldOut], *,
          tracked: list[str], tolerance: float, alpha: float, headline: str) -> Judgement:
    """The rule above, for one candidate against the reference entry ``ref``."""
    metrics = flatten(results, headline)
    best: dict[str, float] = ref.get("best") or ref.get("metrics") or {}
    worse = []
    for s in sets:
        tol = tolerance if s.tolerance is None else s.tolerance
        for k in tracked:
            key = f"{s.name}/{k}"
            # A state written before suites knows the headline set by plain names only.
            key_ref = key if key in best or s.name != headline else k
            if key_ref in best and metrics.get(key, 0.0) < best[key_ref] - tol:
                worse.append(f"{key} {metrics.get(key, 0.0):.3f} < best {best[key_ref]:.3f} "
                             f"- {tol:g}")

    tests: list[tuple[str, int, int, float]] = []
    stored: dict[str, str] = ref.get("outcomes") or {}
    pooled_w = pooled_l = 0
    unpaired = []
    for s in sets:
        mine, theirs = results[s.name].outcomes, stored.get(s.name)
        if theirs is None or len(theirs) != len(mine):
            unpaired.append(s.name)
            continue
        w = sum(1 for a, b in zip(mine, theirs, strict=True) if a == 1 and b == "0")
        lo = sum(1 for a, b in zip(mine, theirs, strict=True) if a == 0 and b == "1")
        pooled_w, pooled_l = pooled_w + w, pooled_l + lo
        tests.append((s.name, w, lo, sign_test(w, lo)))
    if len(sets) - len(unpaired) > 1:
        tests.append((POOLED, pooled_w, pooled_l, sign_test(pooled_w, pooled_l)))
    level = alpha / max(1, len(tests))
    improved = [t for t in tests if t[1] > t[2] and t[3] <= level]
    for name, w, lo, p in tests:
        metrics[f"{name}/wins"], metrics[f"{name}/losses"], metrics[f"{name}/p"] = w, lo, p

    table = "; ".join(
        f"{s.name} pass_rate {results[s.name].metrics.get('pass_rate', 0.0):.3f}"
        + next((f" (+{w}/-{lo}, p={p:.3g})" for n, w, lo, p in tests if n == s.name), "")
        for s in sets)
    against = f"vs v{ref['version']}" + (" (base)" if ref.get("base") else "")
    if worse:
        return Judgement(False, "regressed", f"regressed {against}: " + "; ".join(worse)
                         + f" | {table}", metrics)
    if not improved:
        missing = f"; no outcomes of the reference on {', '.join(unpaired)}" if unpaired else ""
        return Judgement(False, "not_better", f"not better than noise {against} (needs p <= "
                         f"{level:.3g} on a set or the suite{missing}) | {table}", metrics)
    names = ", ".join(n for n, *_ in improved) or headline
    return Judgement(True, None, f"improved {against} on {names} | {table}", metrics)


def promote(ref: dict[str, Any], results: dict[str, SetResult], headline: str, version: int,
            uri: str | None, digests: dict[str, str], event: dict[str, Any]
            ) -> dict[str, Any]:
    """The new reference after a promotion: the candidate's metrics and outcomes, and the best
    of every metric so far (``ref`` is refreshed on the suite's sets: same digests)."""
    new = reference(results, headline, version, base=False, digests=digests, uri=uri,
                    event=event)
    previous: dict[str, float] = ref.get("best") or {}
    new["best"] = {k: max(v, previous.get(k, v)) for k, v in new["metrics"].items()}
    return new
