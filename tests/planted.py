"""A planted mix of scored trajectories whose fate under the test policies is known exactly.

Groups of four samples, each kind built so that one rule decides it:

- ``varied``: two correct, two incorrect, distinct long completions: all accepted; SFT 2,
  CPT 2, one RL group of 4;
- ``equal``: four correct, distinct: accepted, flagged no_rl_signal; SFT 4, no RL;
- ``exact_dup``: a second group for a ``varied`` task, completions equal to the first group's
  up to case and spaces: 4 x ``duplicate``;
- ``near_dup``: a second group for a ``varied`` task, each completion the first group's plus
  "!": 4 x ``near_duplicate``;
- ``stale``: sampled by a version too old: 4 x ``stale``;
- ``low_reward``: two samples with reward -1: 2 x ``low_reward``; the other two (correct,
  incorrect) accepted: SFT 1, CPT 1, one RL group of 2;
- ``over_long``: one sample over the length limit: 1 x ``too_long``; three accepted
  (correct, correct, incorrect): SFT 2, CPT 1, one RL group of 3;
- ``in_group_dup``: four accepted, sample 1 repeats sample 0: flagged duplicate_in_group and
  skipped by SFT; SFT 1, CPT 2, one RL group of 4.

Records are keyed by task id as the scorer writes them, so a duplicate group lands in the
partition of the group it repeats, after it.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field

from schemas import ProducerInfo, Score, ScoredTrajectory, Task, Trajectory, Turn, VerifierSpec
from services.filter.policy import FilterPolicy, LengthRule
from services.router.policy import RoutingPolicy

LATEST_VERSION = 5
MAX_STALENESS = 2
MAX_TOKENS = 48
MODEL = "tiny"
KINDS = ("varied", "equal", "varied", "exact_dup", "stale", "near_dup", "low_reward",
         "over_long", "in_group_dup")
"""One cycle; two ``varied`` groups for the two duplicate groups to repeat."""
PRODUCER = ProducerInfo(service="test", instance="planted")


def filter_policy() -> FilterPolicy:
    return FilterPolicy(name="planted", min_reward=0.0, max_staleness=MAX_STALENESS,
                        length=LengthRule(unit="tokens", min=1, max=MAX_TOKENS))


def routing_policy() -> RoutingPolicy:
    return RoutingPolicy(name="planted")


FILTER_POLICY_YAML = f"""\
name: planted
min_reward: 0.0
max_staleness: {MAX_STALENESS}
length: {{unit: tokens, min: 1, max: {MAX_TOKENS}}}
"""


@dataclass
class Expected:
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejections by reason (each planted rejection has exactly one reason)."""
    sft: int = 0
    cpt: int = 0
    rl_groups: int = 0
    rl_samples: int = 0

    def add(self, other: Expected) -> None:
        self.accepted += other.accepted
        self.rejected.update(other.rejected)
        self.sft += other.sft
        self.cpt += other.cpt
        self.rl_groups += other.rl_groups
        self.rl_samples += other.rl_samples


def _scored(task: Task, group: str, index: int, completion: str, *, reward: float,
            verdict: str, version: int = LATEST_VERSION, tokens: int = 8) -> ScoredTrajectory:
    traj = Trajectory(
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{group}/{index}"),
        task=task, group_id=group, sample_index=index, group_size=4,
        turns=[Turn(role="user", content=task.prompt),
               Turn(role="assistant", content=completion)],
        completion=completion, completion_token_ids=list(range(tokens)),
        completion_logprobs=[-0.5] * tokens, finish_reason="stop", policy_version=version,
        model=MODEL, producer=PRODUCER,
    )
    passed = {"correct": True, "incorrect": False}.get(verdict)
    return ScoredTrajectory(
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"scored/{group}/{index}"), trajectory=traj,
        scores=[Score(scorer="verifier", version="t", value=max(reward, 0.0), passed=passed)],
        reward=reward, verdict=verdict,  # type: ignore[arg-type]
        reward_rule="planted", producer=PRODUCER,
    )


def _task(n: int) -> Task:
    return Task(task_id=f"planted:{n}", env="arithmetic", prompt=f"{n}+{n}=",
                verifier=VerifierSpec(kind="env", answer=str(2 * n)), producer=PRODUCER)


def _texts(n: int, rng: random.Random) -> list[str]:
    """Four long, clearly different completions for task ``n``."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
             "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]
    return [f"Working {n} out: " + " ".join(rng.sample(words, 10)) + f" so the answer is {v}"
            for v in (2 * n, 2 * n + 1, 2 * n + 2, 2 * n + 3)]


STRICT_MIN_REWARD = 0.5
"""A stricter filter for replays: the planted policy with ``min_reward: 0.5``."""


def planted_mix(groups: int, seed: int = 0, strict: dict[str, str | None] | None = None
                ) -> tuple[list[ScoredTrajectory], Expected]:
    """``groups`` groups of 4 (``4 * groups`` records), cycling through the kinds, and what
    the planted policies must make of them. ``strict``, if given, is filled with what the
    stricter filter (``STRICT_MIN_REWARD``) must decide on each record (trajectory id ->
    rejection reason, None for accepted): a sample it rejects is not remembered, so later
    copies of the incorrect members of a group pass where the planted policy rejected them as
    duplicates."""
    rng = random.Random(seed)
    records: list[ScoredTrajectory] = []
    expected = Expected()
    varied: list[tuple[Task, list[str]]] = []  # tasks a duplicate group can repeat
    for g in range(groups):
        kind = KINDS[g % len(KINDS)]
        if kind in ("exact_dup", "near_dup") and not varied:
            kind = "varied"
        group = f"group-{seed}-{g}"
        task = _task(g)
        texts = _texts(g, rng)
        e = Expected()
        if kind == "varied":
            verdicts = ["correct", "incorrect", "correct", "incorrect"]
            members = [_scored(task, group, i, texts[i], reward=float(v == "correct"),
                               verdict=v) for i, v in enumerate(verdicts)]
            varied.append((task, texts))
            e = Expected(accepted=4, sft=2, cpt=2, rl_groups=1, rl_samples=4)
        elif kind == "equal":
            members = [_scored(task, group, i, texts[i], reward=1.0, verdict="correct")
                       for i in range(4)]
            e = Expected(accepted=4, sft=4)
        elif kind in ("exact_dup", "near_dup"):
            task, original = varied.pop(rng.randrange(len(varied)))
            if kind == "exact_dup":
                copies = ["  " + t.upper().replace(" ", "   ") for t in original]
            else:
                copies = [t + "!" for t in original]
            members = [_scored(task, group, i, copies[i], reward=1.0, verdict="correct")
                       for i in range(4)]
            reason = "duplicate" if kind == "exact_dup" else "near_duplicate"
            e = Expected(rejected=Counter({reason: 4}))
        elif kind == "stale":
            members = [_scored(task, group, i, texts[i], reward=1.0, verdict="correct",
                               version=LATEST_VERSION - MAX_STALENESS - 1) for i in range(4)]
            e = Expected(rejected=Counter({"stale": 4}))
        elif kind == "low_reward":
            spec = [(-1.0, "incorrect"), (1.0, "correct"), (-1.0, "incorrect"),
                    (0.0, "incorrect")]
            members = [_scored(task, group, i, texts[i], reward=r, verdict=v)
                       for i, (r, v) in enumerate(spec)]
            e = Expected(accepted=2, rejected=Counter({"low_reward": 2}), sft=1, cpt=1,
                         rl_groups=1, rl_samples=2)
        elif kind == "over_long":
            spec = [("correct", 8), ("correct", MAX_TOKENS + 1), ("correct", 8),
                    ("incorrect", 8)]
            members = [_scored(task, group, i, texts[i], reward=float(v == "correct"),
                               verdict=v, tokens=n) for i, (v, n) in enumerate(spec)]
            e = Expected(accepted=3, rejected=Counter({"too_long": 1}), sft=2, cpt=1,
                         rl_groups=1, rl_samples=3)
        else:  # in_group_dup
            spec = [(texts[0], "correct"), (texts[0], "correct"), (texts[1], "incorrect"),
                    (texts[2], "incorrect")]
            members = [_scored(task, group, i, t, reward=float(v == "correct"), verdict=v)
                       for i, (t, v) in enumerate(spec)]
            e = Expected(accepted=4, sft=1, cpt=2, rl_groups=1, rl_samples=4)
        records.extend(members)
        expected.add(e)
        if strict is not None:
            for s, outcome in zip(members, _strict(kind, members), strict=True):
                strict[str(s.trajectory.event_id)] = outcome
    return records, expected


def _strict(kind: str, members: list[ScoredTrajectory]) -> list[str | None]:
    """Each member's outcome under the stricter filter: the per-sample rules first (stale,
    too_long, then low_reward), then the duplicate memory, which holds only what it accepted:
    a copy of member i repeats member i of a ``varied`` group, whose odd members are wrong
    (reward 0) and are now rejected, so their copies are new."""
    if kind in ("exact_dup", "near_dup"):
        reason = "duplicate" if kind == "exact_dup" else "near_duplicate"
        return [reason if i % 2 == 0 else None for i in range(len(members))]
    out: list[str | None] = []
    for s in members:
        if kind == "stale":
            out.append("stale")
        elif len(s.trajectory.completion_token_ids or []) > MAX_TOKENS:
            out.append("too_long")
        elif s.reward < STRICT_MIN_REWARD:
            out.append("low_reward")
        else:
            out.append(None)
    return out
