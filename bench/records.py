"""Records shaped like the real profile's, for the data-path benchmarks (``bench replay``,
``bench quality``), and the per-step profile of the filter and the router over them.

:func:`trajectories`: groups of 8 drawn for arithmetic tasks, each task drawn many times
(``DRAWS``), so the filter's duplicate memory of a task fills up (``memory_per_task``) as in a
long run. Each completion is reasoning text of about 64 tokens (200-300 characters; 1-2 KB with
``long``) ending in an answer, right for half the group; prompt token ids, completion token
ids and behaviour log-probs are filled, in the assistant turn too, as the generators write
them. Words are drawn at random, so repeats and near-repeats are rare, as from a sampler at
temperature 1.

:func:`steps`: microseconds per record of each step of the filter and the router, in process
(no broker): decode, MinHash, memory look-up, the rest of the stage's logic, encode, and the
state's changelog records.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from schemas import ScoredTrajectory, Task, Trajectory, Turn, fast
from services import envs

GROUP = 8
DRAWS = 24
"""How many groups are drawn for each task: 192 samples, three times the default memory."""
WORDS = ("first", "add", "the", "ones", "digit", "carry", "one", "then", "tens", "so", "we",
         "get", "sum", "of", "and", "next", "column", "write", "down", "check", "result",
         "again", "total", "is", "which", "gives", "step", "hundreds", "plus", "equals")


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS) if rng.random() > 0.15 else str(rng.randrange(1000))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def trajectories(n: int, *, long: bool = False, seed: int = 0) -> list[Trajectory]:
    """``n`` raw trajectories in groups of :data:`GROUP`, tasks drawn :data:`DRAWS` times."""
    rng = random.Random(seed)
    env = envs.get("arithmetic")
    tasks: list[Task] = env.tasks(max(1, n // (GROUP * DRAWS)), rng=rng, difficulty=3)
    out: list[Trajectory] = []
    g = 0
    while len(out) < n:
        task = tasks[g % len(tasks)]
        right = task.verifier.answer if task.verifier and task.verifier.answer else "0"
        for i in range(GROUP):
            answer = right if i % 2 == 0 else str(int(right) + 1 + i)
            body = _text(rng, rng.randrange(1000, 2000) if long else rng.randrange(180, 280))
            text = f"{body}. The answer is {answer}"
            tokens = [rng.randrange(50_000) for _ in range(max(1, len(text) // 4))]
            logprobs = [round(-rng.expovariate(4.0), 6) for _ in tokens]
            prompt = [rng.randrange(50_000) for _ in range(32)]
            out.append(Trajectory(
                task=task, group_id=f"bench-{seed}-{g}", sample_index=i, group_size=GROUP,
                turns=[Turn(role="user", content=task.prompt),
                       Turn(role="assistant", content=text, token_ids=tokens,
                            logprobs=logprobs)],
                completion=text, prompt_token_ids=prompt, completion_token_ids=tokens,
                completion_logprobs=logprobs, finish_reason="stop", policy_version=0,
                model="tiny"))
        g += 1
    return out[:n]


def scored(raw: list[Trajectory]) -> list[ScoredTrajectory]:
    """``raw`` through the real scorer stage (default config)."""
    from services.scorer.stage import ScorerStage, ScoringConfig

    stage = ScorerStage(ScoringConfig(), "scored")
    read = fast.decoder(fast.TrajectoryRecord)  # as the runtime hands records to the stage
    out: list[ScoredTrajectory] = []
    for i in range(0, len(raw), 1000):
        out += [ScoredTrajectory.from_bytes(o.value.to_bytes())
                for o in stage.process([read(t.to_bytes()) for t in raw[i:i + 1000]])]
    return out


class _Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        """Time every call of ``owner.attr`` as ``name``; returns the undo."""
        inner = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.step(name):
                return inner(*args, **kwargs)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, inner)


def steps(values: list[bytes], batch: int = 2000) -> dict[str, dict[str, float]]:
    """Microseconds per input record of each step, for the filter (over ``values``, scored
    records as written) and the router (over what the filter accepted)."""
    from services.common.service import tune_gc
    from services.common.state import StateStore
    from services.filter import stage as filter_stage
    from services.filter.policy import FilterPolicy
    from services.router.policy import RoutingPolicy
    from services.router.stage import RouterStage

    tune_gc()  # as every service does: the cyclic collector would dominate the decode
    timers = _Timers()
    undo = [timers.wrap(filter_stage, "fingerprints", "minhash"),
            timers.wrap(filter_stage.Memory, "match_many", "memory"),
            timers.wrap(filter_stage.Memory, "add_many", "memory")]
    try:
        fstore = StateStore("filter.state")
        fstore.adopt(0)
        filt = filter_stage.FilterStage(FilterPolicy(), "f" * 64, accepted_topic="filtered",
                                        rejected_topic="rejected", state=fstore)
        accepted = _run(timers, "filter", filt, fstore, values, batch)
        timers_f = dict(timers.seconds)
        timers.seconds.clear()
        rstore = StateStore("router.state")
        rstore.adopt(0)
        router = RouterStage(RoutingPolicy(), "r" * 64, state=rstore,
                             topics={s: f"accepted.{s}" for s in ("cpt", "sft", "rl")})
        _run(timers, "router", router, rstore, accepted, batch)
        timers_r = dict(timers.seconds)
    finally:
        for u in undo:
            u()
    out = {}
    for name, secs, n in (("filter", timers_f, len(values)), ("router", timers_r,
                                                                len(accepted))):
        logic = secs.pop("stage") - secs.get("minhash", 0.0) - secs.get("memory", 0.0)
        table = {**secs, "logic": logic}
        out[name] = {k: round(v / max(n, 1) * 1e6, 2) for k, v in table.items()}
        out[name]["total"] = round(sum(table.values()) / max(n, 1) * 1e6, 2)
    return out


def _run(timers: _Timers, name: str, stage: Any, store: Any, values: list[bytes],
         batch: int) -> list[bytes]:
    """The stage over ``values`` in batches, as the runtime drives it; returns the bytes of
    what it wrote to its accepted topic (``filtered``), for the next stage."""
    decode = fast.decoder(stage.input_type) if fast.is_fast(stage.input_type) \
        else stage.input_type.from_bytes
    forward: list[bytes] = []
    for i in range(0, len(values), batch):
        with timers.step("decode"):
            records = [decode(v) for v in values[i:i + batch]]
        store.begin()
        with timers.step("stage"):
            outputs = stage.process_partition(store.partition(0), records)
        with timers.step("encode"):
            encoded = [(o.topic, o.value.to_bytes()) for o in outputs]
        with timers.step("changelog"):
            store.changes()
        forward += [data for topic, data in encoded if topic == "filtered"]
    return forward
