"""The training objectives on a tiny real model: masks, losses, advantages, clipping, KL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch  # the model extras: missing is a failure, never a skip

from services.trainer.objectives import (
    Sample,
    collate,
    group_advantages,
    grpo_loss,
    lm_loss,
    token_logprobs,
)

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> object:
    from transformers import AutoModelForCausalLM

    from services.models.tiny import tiny_model

    folder = tiny_model(Path(tmp_path_factory.mktemp("tiny")), seed=3)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_only_target_tokens_are_in_the_loss() -> None:
    batch = collate([Sample(prompt=[5, 6], target=[7, 8, 9]), Sample(prompt=[], target=[4, 5])],
                    pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 5, 0, 0, 0]]
    assert batch.target_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]


def test_lm_loss_is_the_mean_nll_of_the_targets(model: object) -> None:
    samples = [Sample(prompt=[5, 6, 7], target=[8, 9]), Sample(prompt=[4], target=[5, 6, 7])]
    batch = collate(samples, pad_id=0)
    lp = token_logprobs(model, batch)
    expected = (-(lp[0, 2:4].mean()) - lp[1, 0:3].mean()) / 2
    assert torch.isclose(lm_loss(model, batch), expected, atol=1e-6)
    heavy = collate([samples[0], Sample(prompt=[4], target=[5, 6, 7], weight=3.0)], pad_id=0)
    weighted = (-(lp[0, 2:4].mean()) - 3 * lp[1, 0:3].mean()) / 4
    assert torch.isclose(lm_loss(model, heavy), weighted, atol=1e-6)


def test_group_advantages_are_normalised_within_the_group() -> None:
    adv = group_advantages([1.0, 0.0, 1.0, 0.0])
    assert adv == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-5)
    assert group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]


def _on_policy(model: object, prompt: list[int], target: list[int], advantage: float) -> Sample:
    probe = collate([Sample(prompt=prompt, target=target)], pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(model, probe)[0]
    start = len(prompt) - 1
    return Sample(prompt=prompt, target=target, advantage=advantage,
                  behaviour_logprobs=lp[start: start + len(target)].tolist())


def test_a_grpo_step_moves_probability_towards_positive_advantages(model: object) -> None:
    import copy

    policy = copy.deepcopy(model)
    good = _on_policy(policy, [5, 6], [7, 8], advantage=1.0)
    bad = _on_policy(policy, [5, 6], [9, 10], advantage=-1.0)
    batch = collate([good, bad], pad_id=0)
    before = token_logprobs(policy, batch).detach()
    loss, stats = grpo_loss(policy, batch)
    assert stats.clip_fraction == 0.0 and stats.mean_ratio == pytest.approx(1.0, abs=1e-5)
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = token_logprobs(policy, batch).detach()
    mask = batch.target_mask.bool()
    assert after[0][mask[0]].sum() > before[0][mask[0]].sum()
    assert after[1][mask[1]].sum() < before[1][mask[1]].sum()


def test_ratios_beyond_the_clip_range_give_no_gradient(model: object) -> None:
    import copy

    policy = copy.deepcopy(model)
    sample = _on_policy(policy, [5, 6], [7, 8], advantage=1.0)
    stale = Sample(prompt=sample.prompt, target=sample.target, advantage=1.0,
                   behaviour_logprobs=[lp - 2.0 for lp in sample.behaviour_logprobs or []])
    loss, stats = grpo_loss(policy, collate([stale], pad_id=0), clip=0.2)
    assert stats.clip_fraction == 1.0 and stats.mean_ratio > 1.2
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_kl_to_the_reference_is_zero_for_itself_and_positive_after_a_change(
        model: object) -> None:
    import copy

    sample = _on_policy(model, [5, 6], [7, 8], advantage=0.0)
    batch = collate([sample], pad_id=0)
    _, same = grpo_loss(model, batch, kl_coef=0.1, reference=model)
    assert same.kl == pytest.approx(0.0, abs=1e-6)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _, moved = grpo_loss(changed, batch, kl_coef=0.1, reference=model)
    assert moved.kl > 0.0
