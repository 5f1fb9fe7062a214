"""The precision a model process computes in, chosen by the machine it runs on.

``auto`` (the default of the generator's, the gate's and the trainer's ``dtype``) means
bfloat16 where the hardware computes it natively, float32 elsewhere:

- a CUDA device of compute capability 8.0 or later (Ampere on; older ones emulate it);
- an x86 CPU with AVX-512 BF16 or AMX (``avx512_bf16``, ``amx_bf16`` in its flags); an ARM CPU
  with the BF16 extension (``bf16`` in its features).

Elsewhere bfloat16 is emulated and far slower than float32: on an AMD EPYC with AVX2 only
(``flywheel bench precision``), a bfloat16 matrix product ran 102x slower than in float32, a
SmolLM2-135M training step 27x slower and its generation 2x slower, while on a CPU with
AVX-512 BF16 the same model trained 2.1x and generated 1.9x faster in bfloat16
(docs/benchmarks.md).

The choice and its reason (the CPU's model and its relevant flags) are logged by every process
that makes it, and exported as ``flywheel_model_precision{dtype}`` for the live view.
"""

from __future__ import annotations

import logging
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import Gauge

log = logging.getLogger(__name__)

Dtype = Literal["auto", "float32", "bfloat16"]
"""A model's weights (engines) or compute (the trainer, whose ``bfloat16-mixed`` is float32
weights with bfloat16 compute)."""

CPUINFO = Path("/proc/cpuinfo")
"""Where the CPU's model and flags are read (Linux); tests point it at a fake machine."""

NATIVE_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU flags under which bfloat16 runs natively: x86 AVX-512 BF16 and AMX, ARM's BF16."""
_SHOWN = re.compile(r"^(avx|amx|sse4_2|fma|f16c|asimd|sve|bf16|i8mm)")
"""The flags a log line names: those that decide how fast matrices multiply."""

PRECISION = Gauge("flywheel_model_precision",
                  "1 on the dtype this process's model computes in (weights, or the "
                  "trainer's compute).", ["dtype"])


@dataclass(frozen=True)
class Machine:
    """What the precision is chosen on: the device, its name and its relevant flags."""

    device: str
    name: str
    flags: tuple[str, ...]
    native_bfloat16: bool

    def describe(self) -> str:
        flags = " ".join(self.flags) or "none"
        return f"{self.device} {self.name!r} (flags: {flags})"


@dataclass(frozen=True)
class Choice:
    dtype: Literal["float32", "bfloat16"]
    reason: str


def _cpu() -> Machine:
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return Machine("cpu", platform.processor() or platform.machine(), (), False)
    name, flags = platform.machine(), set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and name == platform.machine():
            name = value.strip() or name
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    native = any(f in flags for f in NATIVE_FLAGS)
    return Machine("cpu", name, tuple(sorted(f for f in flags if _SHOWN.match(f))), native)


def detect(device: str = "cpu") -> Machine:
    """The machine ``device`` computes on."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index or 0
            # Ampere (compute capability 8) and later compute bfloat16 natively; older GPUs
            # accept bfloat16 tensors but emulate the arithmetic, which
            # torch.cuda.is_bf16_supported() counts as support.
            major, _ = torch.cuda.get_device_capability(index)
            return Machine(device, torch.cuda.get_device_name(index), (), major >= 8)
    return _cpu()


def choose(dtype: Dtype, device: str = "cpu", *, role: str | None = None) -> Choice:
    """``dtype`` resolved for ``device``: ``auto`` becomes bfloat16 where it runs natively,
    float32 elsewhere; a pinned dtype stays. With ``role`` (what the choice is for) the
    choice and its reason are logged, with a warning for a bfloat16 the machine emulates."""
    machine = detect(device)
    if dtype == "auto" and machine.native_bfloat16:
        choice = Choice("bfloat16", f"auto: {machine.describe()} computes bfloat16 natively")
    elif dtype == "auto":
        choice = Choice("float32", f"auto: {machine.describe()} has no native bfloat16 (no "
                        "avx512_bf16, amx_bf16 or bf16 flag), where it is emulated and many "
                        "times slower than float32")
    else:
        choice = Choice(dtype, "set in the configuration")
    if role is not None:
        if choice.dtype == "bfloat16" and not machine.native_bfloat16:
            log.warning("precision of the %s: bfloat16 as configured, but %s has no native "
                        "bfloat16: expect it to run many times slower than float32 (dtype "
                        "auto chooses by the machine)", role, machine.describe())
        else:
            log.info("precision of the %s: %s (%s)", role, choice.dtype, choice.reason)
    return choice


def export(dtype: str) -> None:
    """``flywheel_model_precision{dtype}`` = 1 for this process's choice (its only series)."""
    PRECISION.clear()
    PRECISION.labels(dtype).set(1)
