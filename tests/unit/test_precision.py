"""``dtype: auto`` on both kinds of CPU: bfloat16 where the CPU computes it natively, float32
where it is emulated. Only the detection is faked (the CPU's /proc/cpuinfo); the generator's
engine, the gate's evaluation and a training round run for real on the tiny model, and the
dtype each computes in is read off its linear layers as they run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch  # the model extras: missing is a failure, never a skip
from prometheus_client import REGISTRY

from schemas import SamplingParams
from services.models import precision

pytestmark = pytest.mark.model

# name, flags (as /proc/cpuinfo writes them), the weights' dtype auto gives, the trainer's
MACHINES = {
    "avx2": ("AMD EPYC 7B13 64-Core Processor",
             "fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt aes avx f16c "
             "avx2 bmi1 bmi2 sha_ni", "float32", "float32"),
    "avx512_bf16": ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
                    "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq "
                    "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8", "bfloat16",
                    "bfloat16-mixed"),
}


@pytest.fixture(params=sorted(MACHINES))
def machine(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, str, str]:
    name, flags, weights, compute = MACHINES[request.param]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {i}\nvendor_id\t: x\nmodel name\t: {name}\n"
                               f"flags\t\t: {flags}\n\n" for i in range(2)), encoding="utf-8")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    return name, flags, weights, compute


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.models.tiny import tiny_model

    return tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=3)


def _computed_in(work: Callable[[], Any]) -> set[torch.dtype]:
    """The dtypes every linear layer's output had while ``work`` ran."""
    seen: set[torch.dtype] = set()

    def hook(module: torch.nn.Module, _: Any, output: Any) -> None:
        if isinstance(module, torch.nn.Linear):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        work()
    finally:
        handle.remove()
    return seen


def _exported() -> str | None:
    values = {dtype: REGISTRY.get_sample_value("flywheel_model_precision", {"dtype": dtype})
              for dtype in ("float32", "bfloat16")}
    return next((k for k, v in values.items() if v == 1), None)


def test_auto_computes_in_bfloat16_only_where_the_cpu_runs_it_natively(
        machine: tuple[str, str, str, str], tiny: Path, caplog: pytest.LogCaptureFixture
        ) -> None:
    from services.gate.main import GateSettings, build_stage
    from services.generator.main import GeneratorSettings, build_engine
    from services.trainer.objectives import Sample
    from services.trainer.train import OptimSettings, make_optimizer, resolve_dtype, train_round

    name, _, weights, compute = machine
    expected = getattr(torch, weights)
    caplog.set_level(logging.INFO, logger=precision.__name__)

    # The generator (its default dtype is auto): weights, generation and the exported gauge.
    engine, _ = build_engine(GeneratorSettings(model_path=tiny, backend="transformers"))
    assert {p.dtype for p in engine.model.parameters()} == {expected}
    assert _computed_in(lambda: engine.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2), [None])) == {expected}
    assert _exported() == weights

    # The gate evaluates every version in the same precision.
    stage = build_stage(GateSettings(base_model_path=tiny, held_out={
        "env": "addition", "difficulty": 1, "count": 2, "max_tokens": 2}))
    assert _computed_in(lambda: stage.evaluate(tiny)) == {expected}

    # The trainer: mixed precision (float32 weights, bfloat16 compute) or float32.
    optim = resolve_dtype(OptimSettings(lr=1e-3, micro_batch=2), role="trainer's compute")
    assert optim.dtype == compute
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    data = [Sample([5, 6, 7], [8, 2], 1.0), Sample([6, 7], [9, 2], 1.0)]
    assert _computed_in(lambda: train_round(model, make_optimizer(model, optim), {"sft": data},
                                            optim, pad_id=0)) == {expected}
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    # Every choice is logged with its reason: the CPU's model and its flags.
    lines = [r.getMessage() for r in caplog.records if r.name == precision.__name__]
    assert len(lines) == 3 and all(name in line and "avx2" in line for line in lines), lines
    assert all(("natively" in line) == (weights == "bfloat16") for line in lines), lines


def test_a_pinned_bfloat16_is_kept_and_warned_about_where_it_is_emulated(
        machine: tuple[str, str, str, str], caplog: pytest.LogCaptureFixture) -> None:
    _, _, weights, _ = machine
    caplog.set_level(logging.INFO, logger=precision.__name__)
    assert precision.choose("bfloat16", role="generator's weights").dtype == "bfloat16"
    assert precision.choose("float32", role="gate's evaluations").dtype == "float32"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == (0 if weights == "bfloat16" else 1)
    assert all("slower" in r.getMessage() for r in warned)


def test_flywheel_up_says_what_the_real_profile_computes_in_and_why(
        machine: tuple[str, str, str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from services.up import prepare
    from services.up.profile import load_profile

    name, _, weights, compute = machine
    monkeypatch.chdir(Path(__file__).parents[2])  # the profile's paths are the checkout's
    profile = load_profile(Path("deploy/profiles/real.yaml")).model_copy(
        update={"home": tmp_path})
    checked = prepare.validate(profile, {"bootstrap_servers": "127.0.0.1:1"},
                               prepare.write_policies(profile))
    said: list[str] = []
    prepare.say_precision(checked, said.append)
    assert len(said) == 1 and name in said[0] and "avx2" in said[0], said
    assert f"generator {weights} (auto), gate {weights} (auto), trainer {compute} (auto)" \
        in said[0], said


@pytest.fixture(autouse=True)
def _no_gauge_left() -> Iterator[None]:
    yield
    precision.PRECISION.clear()


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((8, 0), True)])
def test_a_gpu_computes_bfloat16_natively_from_ampere_on(
        monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], native: bool) -> None:
    """No GPU here: torch.cuda's answers are faked. A V100 (7.0) accepts bfloat16 tensors and
    torch.cuda.is_bf16_supported() says yes, but it emulates the arithmetic; an A100 (8.0)
    computes it. The capability asked is that of the device named, not the current one."""
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"gpu{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda i: asked.append(i) or capability)
    machine = precision.detect("cuda:1")
    assert (machine.name, machine.native_bfloat16, asked) == ("gpu1", native, [1])
    assert precision.choose("auto", "cuda:1").dtype == ("bfloat16" if native else "float32")
