"""How a micro-batch is split across ranks (``services.trainer.parallel``): every sample goes to
exactly one rank, in order, and the ranks' weighted losses add up to the whole micro-batch's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.trainer.objectives import Sample
from services.trainer.parallel import Parallel


@given(weights=st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=1, max_size=40),
       world=st.integers(1, 8))
def test_the_parts_tile_the_micro_batch_and_their_weights_make_its_mean(
        weights: list[float], world: int) -> None:
    chunk = [Sample([1], [i + 2], weight=w) for i, w in enumerate(weights)]
    parts = [Parallel("ddp", rank, world).split(chunk) for rank in range(world)]
    real = [[s for s in part if s.weight > 0] for part, _ in parts]
    assert [s for part in real for s in part] == chunk  # each once, in order
    assert max(map(len, real)) - min(map(len, real)) <= 1  # as even as can be
    for (part, denominator), kept in zip(parts, real, strict=True):
        # A rank without a sample runs a zero-weight copy of one, to join the collectives.
        assert part == kept if kept else (len(part) == 1 and part[0].weight == 0)
        assert denominator == pytest.approx(sum(weights) / world)
    # Averaged over the ranks (what DDP and FSDP do to gradients), the parts' weighted sums
    # over their denominators are the whole micro-batch's weighted mean's weights.
    share = sum(sum(s.weight for s in kept) / d for (_, d), kept in zip(parts, real,
                                                                       strict=True)) / world
    assert share == pytest.approx(1.0)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(st.builds(Sample, prompt=st.lists(st.integers(0, 2**31 - 1), max_size=8),
                 target=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=8),
                 weight=finite, behaviour_logprobs=st.none() | st.lists(finite, max_size=8),
                 advantage=finite, temperature=finite))
def test_a_sample_reaches_the_other_ranks_exactly(sample: Sample) -> None:
    """Rank 0 sends a round's samples as JSON (``ranks.Leader.train``): every float comes back
    bit for bit, or the ranks would train on different data."""
    import dataclasses
    import json

    assert Sample(**json.loads(json.dumps(dataclasses.asdict(sample)))) == sample
