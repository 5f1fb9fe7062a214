"""From routed samples to token sequences for each objective.

The sampler's own token ids are used when the trajectory carries them (the prompt as the
generator rendered it, chat template included, and the completion exactly as sampled, EOS
included), so SFT and RL train on precisely what the policy saw and produced. Text is
tokenized only for trajectories without token ids (e.g. imported data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas import RoutedSample, ScoredTrajectory, Turn
from services.models.engines import render
from services.trainer.objectives import Sample, group_advantages


def _ids(tokenizer: Any, s: ScoredTrajectory) -> tuple[list[int], list[int]]:
    t = s.trajectory
    single_turn = sum(1 for turn in t.turns if turn.role == "assistant") <= 1
    if single_turn and t.prompt_token_ids is not None and t.completion_token_ids:
        return list(t.prompt_token_ids), list(t.completion_token_ids)
    if t.completion_token_ids:
        # Multi-turn: the generator's prompt ids are the first turn's; the final answer was
        # sampled after the whole conversation before it.
        context = [x for x in t.turns[:-1]] if t.turns and t.turns[-1].role == "assistant" \
            else list(t.turns)
        return render(tokenizer, context), list(t.completion_token_ids)
    # The conversation before the final answer, rendered as the generator renders prompts
    # (the chat template for chat models).
    context = list(t.turns)
    if context and context[-1].role == "assistant":
        context = context[:-1]
    prompt = render(tokenizer, context or [Turn(role="user", content=t.task.prompt)])
    target = list(tokenizer(t.completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        target.append(tokenizer.eos_token_id)
    return prompt, target


def to_samples(routed: Sequence[RoutedSample], tokenizer: Any, max_tokens: int
               ) -> list[Sample]:
    """Training samples of one stage's routed records. CPT: the whole text is the target.
    SFT: the completion. RL: the completion, with group-normalised advantages and the
    behaviour log-probs. Sequences longer than ``max_tokens`` keep their end (the target)."""
    out: list[Sample] = []
    for r in routed:
        if r.stage == "rl":
            advantages = group_advantages([s.reward for s in r.samples])
            for s, adv in zip(r.samples, advantages, strict=True):
                prompt, target = _ids(tokenizer, s)
                lps = s.trajectory.completion_logprobs
                if lps is None or len(lps) != len(target):
                    raise ValueError(f"trajectory {s.trajectory.event_id}: RL needs the "
                                     "sampler's log-prob of every completion token")
                temperature = s.trajectory.sampling.temperature or 1.0  # greedy: no tempering
                out.append(_fit(Sample(prompt, target, r.weight, list(lps), adv, temperature),
                                max_tokens))
            continue
        for s in r.samples:
            prompt, target = _ids(tokenizer, s)
            if r.stage == "cpt":
                prompt, target = [], prompt + target
            out.append(_fit(Sample(prompt, target, r.weight), max_tokens))
    return out


def _fit(s: Sample, max_tokens: int) -> Sample:
    over = len(s.prompt) + len(s.target) - max_tokens
    if over <= 0:
        return s
    if over < len(s.prompt):
        return Sample(s.prompt[over:], s.target, s.weight, s.behaviour_logprobs, s.advantage,
                      s.temperature)
    cut = over - len(s.prompt)
    lps = s.behaviour_logprobs[cut:] if s.behaviour_logprobs is not None else None
    return Sample([], s.target[cut:], s.weight, lps, s.advantage, s.temperature)
