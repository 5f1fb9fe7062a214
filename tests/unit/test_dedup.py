"""The filter's duplicate memory as a signature matrix: the same answers as comparing each
stored entry on its own (the memory before the matrix), over random memories."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.filter.dedup import Fingerprint, Memories, Memory, decode_signature, jaccard


def _one_by_one(entries: list[list[Any]], fp: Fingerprint, *, exact: bool, near: bool,
                threshold: float, at: float, horizon: float | None
                ) -> tuple[str, float] | None:
    """The look-up as it was: every entry decoded and compared on its own."""
    held = entries if horizon is None else [
        e for e in entries if len(e) < 4 or at - float(e[3]) < horizon]
    if exact and any(e[0] == fp.exact for e in held):
        return "duplicate", 1.0
    if near:
        best = max((jaccard(fp.signature, decode_signature(e[1])) for e in held), default=0.0)
        if best >= threshold:
            return "near_duplicate", best
    return None


def _fp(rng: np.random.Generator, width: int, base: np.ndarray | None, exact: str
        ) -> Fingerprint:
    sig = rng.integers(0, 4, size=width, dtype=np.uint32)  # few values: many near-matches
    if base is not None and len(base) == width:
        keep = rng.random(width) < 0.85
        sig = np.where(keep, base, sig).astype(np.uint32)
    return Fingerprint(exact, sig)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 12),
       horizon=st.sampled_from([None, 5.0, 50.0]), threshold=st.sampled_from([0.5, 0.8, 0.9]),
       exact=st.booleans(), near=st.booleans(), cap=st.integers(1, 8))
def test_the_matrix_answers_as_each_entry_compared_alone(
        seed: int, size: int, horizon: float | None, threshold: float, exact: bool,
        near: bool, cap: int) -> None:
    rng = np.random.default_rng(seed)
    entries: list[list[Any]] = []
    for i in range(size):  # mixed widths (a num_perm changed), old entries without a time
        width = 16 if rng.random() < 0.8 else 32
        fp = _fp(rng, width, None, f"e{rng.integers(0, 4)}")
        entry = [fp.exact, fp.encoded(), f"g{i}", float(rng.integers(0, 100))]
        entries.append(entry[:3] if rng.random() < 0.2 else entry)
    memory = Memory([list(e) for e in entries])
    reference = [list(e) for e in entries]
    for step in range(6):
        base = decode_signature(reference[-1][1]) if reference else None
        fp = _fp(rng, 16, base, f"e{rng.integers(0, 6)}")
        at = float(rng.integers(0, 120))
        kwargs = {"exact": exact, "near": near, "threshold": threshold, "at": at,
                  "horizon": horizon}
        assert memory.match(fp, **kwargs) == _one_by_one(reference, fp, **kwargs)
        if step % 2 == 0:  # the memory grows and is capped as the filter adds to it
            memory.add(fp, f"n{step}", at, cap)
            reference = [*reference, [fp.exact, fp.encoded(), f"n{step}", at]][-cap:]
            assert memory.entries == reference


def test_a_cached_memory_is_used_only_with_the_state_value_it_was_made_from() -> None:
    rng = np.random.default_rng(0)
    memories = Memories(size=2)
    fp = _fp(rng, 16, None, "a")
    value = {"entries": []}
    memory = memories.get("t", value)
    memory.add(fp, "g", 1.0, 8)
    stored = {"entries": memory.entries}
    memories.put("t", stored, memory)
    again = memories.get("t", stored)
    assert again.entries == memory.entries
    again.add(_fp(rng, 16, None, "b"), "g2", 2.0, 8)  # a copy: the cached one is unchanged
    assert len(memories.get("t", stored).entries) == 1
    undone = {"entries": []}  # an undo or a restore put another value: decoded afresh
    assert memories.get("t", undone).entries == []
