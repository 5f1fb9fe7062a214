"""The three training objectives, as pure functions of a model and tokenized samples.

- CPT: next-token loss over the whole text.
- SFT: next-token loss over the completion only; the prompt is context (it was rendered by
  the generator with the model's chat template, when it has one, so the loss sees exactly the
  tokens the policy produced after exactly the prompt it saw).
- RL: GRPO-style. Advantages are normalised within each group (the samples drawn for one task
  at one time): ``(r - mean) / (std + eps)``. The loss is PPO's clipped surrogate on the
  per-token importance ratio ``pi_new / pi_behaviour``, where the behaviour log-probs are
  the sampler's, carried by the trajectory: this corrects for samples drawn by an older
  version (off-policy). Optionally a KL penalty to a frozen reference model (the k3
  estimator, ``exp(ref - new) - (ref - new) - 1``, always >= 0).

Losses are token means within a sample, then weighted means over samples (sample weights come
from the router), so long completions do not dominate a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sequence: ``prompt`` is context, ``target`` is what the loss is on."""

    prompt: list[int]
    target: list[int]
    weight: float = 1.0
    behaviour_logprobs: list[float] | None = None
    """RL: the sampler's log-prob of each target token."""
    advantage: float = 0.0
    """RL: the sample's group-normalised advantage."""
    temperature: float = 1.0
    """RL: the temperature it was sampled at. The behaviour log-probs are those of the
    tempered distribution, so the policy's are computed from logits divided by it too."""


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    """[B, T-1]: 1 where the next token (input_ids[:, 1:]) is a target token."""
    weights: torch.Tensor
    behaviour: torch.Tensor
    """[B, T-1]: behaviour log-prob of each target token (0 elsewhere)."""
    advantages: torch.Tensor
    temperatures: torch.Tensor
    """[B]: sampling temperature of each row (1.0 when not sampled, e.g. SFT)."""
    denominator: float | None = None
    """What the weighted mean over samples divides by; None: these samples' total weight.
    Across ranks, the whole micro-batch's weight over the world size (``parallel``)."""


def collate(samples: Sequence[Sample], pad_id: int, device: str | torch.device = "cpu",
            denominator: float | None = None) -> Batch:
    """Right-padded tensors for ``samples``."""
    if not samples:
        raise ValueError("an empty batch")
    width = max(len(s.prompt) + len(s.target) for s in samples)
    n = len(samples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    tmask = torch.zeros((n, width - 1), dtype=torch.float32)
    behaviour = torch.zeros((n, width - 1), dtype=torch.float32)
    for row, s in enumerate(samples):
        seq = s.prompt + s.target
        if len(seq) < 2 or not s.target:
            raise ValueError("a sample needs a target and at least two tokens")
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        start = max(len(s.prompt) - 1, 0)  # position predicting the first target token
        first = 1 if not s.prompt else 0  # without a prompt the first token is not predicted
        tmask[row, start: start + len(s.target) - first] = 1
        if s.behaviour_logprobs is not None:
            lps = s.behaviour_logprobs[first:]
            if len(lps) != len(s.target) - first:
                raise ValueError("behaviour_logprobs must align with the target tokens")
            behaviour[row, start: start + len(lps)] = torch.tensor(lps)
    return Batch(
        input_ids=ids.to(device), attention_mask=attn.to(device), target_mask=tmask.to(device),
        weights=torch.tensor([s.weight for s in samples], dtype=torch.float32, device=device),
        behaviour=behaviour.to(device),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32,
                                device=device),
        temperatures=torch.tensor([s.temperature for s in samples], dtype=torch.float32,
                                  device=device),
        denominator=denominator,
    )


def token_logprobs(model: Any, batch: Batch, *, tempered: bool = False) -> torch.Tensor:
    """[B, T-1]: log-prob under ``model`` of each next token; ``tempered``: of the
    distribution each row was sampled from (logits divided by its temperature)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].float()
    if tempered:
        logits = logits / batch.temperatures.clamp(min=1e-4)[:, None, None]
    return torch.gather(F.log_softmax(logits, dim=-1), 2,
                        batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def _sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values`` over ``mask``."""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def _weighted(per_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
    if batch.denominator is not None:
        return (per_sample * batch.weights).sum() / max(batch.denominator, 1e-8)
    return (per_sample * batch.weights).sum() / batch.weights.sum().clamp(min=1e-8)


def lm_loss(model: Any, batch: Batch) -> torch.Tensor:
    """Negative log-likelihood of the target tokens (CPT: the whole text; SFT: completions)."""
    nll = -token_logprobs(model, batch)
    return _weighted(_sample_mean(nll, batch.target_mask), batch)


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """GRPO: each reward relative to its group's mean, in units of the group's std."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + eps) for r in rewards]


@dataclass(frozen=True, slots=True)
class RLStats:
    loss: float
    clip_fraction: float
    """Share of target tokens whose ratio was clipped."""
    mean_ratio: float
    kl: float


def grpo_loss(model: Any, batch: Batch, *, clip: float = 0.2, kl_coef: float = 0.0,
              reference: Any = None) -> tuple[torch.Tensor, RLStats]:
    """The clipped surrogate ``-min(r * A, clip(r, 1 - e, 1 + e) * A)`` per target token, with
    ``r = exp(logp_new - logp_behaviour)``, plus ``kl_coef`` times the k3 KL to ``reference``.
    Both log-probs are of the tempered distribution the sample was drawn from: sampled at 0.7,
    a policy equal to the sampler has ratio 1, not exp(logp(T=1) - logp(T=0.7))."""
    new = token_logprobs(model, batch, tempered=True)
    mask = batch.target_mask
    ratio = torch.exp((new - batch.behaviour) * mask)
    adv = batch.advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    per_token = -surrogate
    kl_value = torch.zeros((), device=new.device)
    if reference is not None and kl_coef > 0:
        with torch.no_grad():
            ref = token_logprobs(reference, batch, tempered=True)
        diff = ref - new
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + kl_coef * kl
        kl_value = _sample_mean(kl, mask).mean()
    loss = _weighted(_sample_mean(per_token, mask), batch)
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip).float() * mask
        stats = RLStats(
            loss=float(loss), clip_fraction=float(clipped.sum() / mask.sum().clamp(min=1)),
            mean_ratio=float((ratio * mask).sum() / mask.sum().clamp(min=1)),
            kl=float(kl_value),
        )
    return loss, stats
