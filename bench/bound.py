"""The supervised bound of ``bench flywheel``: SFT on labelled training tasks from the same
starting model, trained exactly as the trainer trains an accepted SFT sample.

Each labelled task becomes a scored, routed SFT sample and goes through the trainer's own
``to_samples`` (the prompt rendered with the model's chat template, the target ended by the
same end of turn) and ``train_round`` with the profile's optimizer settings. The target is an
answer in the model's own style:

- where the environment writes one (``Environment.reference_answer``: the digits of a sum,
  "The answer is 12." for the word problems, whose prompts ask for that sentence), that
  answer;
- elsewhere (task files, whose labels are bare final answers: a model trained to utter them
  without its working got worse, 0.430 -> 0.090 after 80 samples with SmolLM2), the
  starting model's own completion that the label verifies, the first of ``tries`` samples
  (rejection sampling against the label). A task none of whose samples is right gives no
  sample; the bound draws further tasks until it has as many as it needs.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas import RoutedSample, SamplingParams, Score, ScoredTrajectory, Task, Trajectory, Turn
from services.trainer.store import CheckpointStore
from services.up.profile import Profile


def training_tasks(profile: Profile, count: int, seed: int) -> list[Any]:
    """``count`` tasks as the feeder draws them, held-out excluded: from its task sets, or
    from its environment spread evenly over its curriculum levels (or its mix)."""
    from services import envs
    from services.envs.heldout import gate_guard
    from services.envs.tasksets import TaskSetSpec, load

    held_out = gate_guard(profile.gate)
    rng = random.Random(seed)
    feeder = profile.feeder
    if feeder.get("tasksets"):
        pool = [t for spec in feeder["tasksets"] for t in load(TaskSetSpec(**spec))
                if not held_out.holds(t)]
        return rng.choices(pool, k=count)
    env = envs.get(feeder.get("env", "arithmetic"))
    curriculum = feeder.get("curriculum", {})
    levels = curriculum.get("levels") if curriculum.get("enabled") else None
    out: list[Any] = []
    while len(out) < count:
        level = rng.choice(levels) if levels else feeder.get("difficulty")
        out += held_out.kept(env.tasks(1, rng=rng, difficulty=level))[0]
    return out


def _routed(trajectory: Trajectory) -> RoutedSample:
    """A correct trajectory as the router sends it to ``accepted.sft``."""
    scored = ScoredTrajectory(
        trajectory=trajectory, reward=1.0, verdict="correct", reward_rule="verifier",
        scores=[Score(scorer="verifier", version="bound", value=1.0, passed=True)])
    return RoutedSample(stage="sft", group_id=trajectory.group_id, samples=[scored],
                        reason="verified_correct", policy_name="bound", policy_hash="0" * 64)


def labelled_samples(engine: Any, tasks: list[Task], *, tries: int, sampling: SamplingParams,
                     max_tokens: int) -> tuple[list[Any], int]:
    """The trainer's SFT samples of ``tasks`` with their answers in the model's style, and
    how many tasks gave none (no reference answer, and no right one in ``tries`` samples)."""
    from services import envs
    from services.models.episodes import ModelVersion, run_episodes
    from services.trainer.data import to_samples

    routed: list[RoutedSample] = []
    unanswered: list[Task] = []
    for task in tasks:
        env = envs.get(task.env)
        answer = env.reference_answer(task)
        if answer is None:
            unanswered.append(task)
            continue
        turns = [*env.initial_turns(task), Turn(role="assistant", content=answer)]
        routed.append(_routed(Trajectory(
            task=task, group_id=f"bound:{task.task_id}", sample_index=0, group_size=1,
            turns=turns, completion=answer, policy_version=0, model="bound")))
    missed = 0
    if unanswered:
        own = run_episodes(engine, engine.tokenizer, unanswered, samples=tries,
                           sampling=sampling, model=ModelVersion("bound", 0))
        for i, task in enumerate(unanswered):
            env = envs.get(task.env)
            right = next((t for t in own[i * tries:(i + 1) * tries]
                          if env.verify(task, t.turns).passed), None)
            if right is None:
                missed += 1
            else:
                routed.append(_routed(right))
    return to_samples(routed, engine.tokenizer, max_tokens), missed


def supervised_bound(profile: Profile, start: Path, samples: int, points: int,
                     seed: int = 0, stopping: Callable[[], bool] = lambda: False
                     ) -> list[dict[str, float]]:
    """SFT on labelled training tasks from ``start``: the held-out pass rate after every
    ``samples / points`` samples, up to ``samples`` (fewer when ``stopping`` answers true)."""
    import torch

    from services.envs.heldout import gate_dtype, gate_headline
    from services.gate.evaluate import evaluate
    from services.generator.main import GeneratorSettings
    from services.models.engines import TransformersEngine
    from services.trainer.train import OptimSettings, make_optimizer, train_round

    torch.set_num_threads(2)
    generator = GeneratorSettings(model_path=start, **{
        k: v for k, v in profile.generator.items()
        if k in ("sampling", "samples_per_task", "transformers")})
    engine = TransformersEngine(start, dtype=generator.transformers.dtype)  # as served
    trainer = TransformersEngine(start)  # float32 weights, as the trainer's
    optim = OptimSettings(**profile.trainer.get("optim", {}))
    optimizer = make_optimizer(trainer.model, optim)
    sampling = SamplingParams(**generator.sampling.model_dump())
    held = gate_headline(profile.gate)
    held_tasks = held.tasks()
    rng = random.Random(seed)
    step = max(1, -(-samples // points))  # points evenly spread, the last at ``samples``
    curve: list[dict[str, float]] = []
    done, drawn, missed = 0, 0, 0
    with tempfile.TemporaryDirectory(prefix="flywheel-bound-") as tmp:
        store = CheckpointStore(tmp)
        while done < samples and not stopping():
            need = min(step, samples - done)
            chunk: list[Any] = []
            while len(chunk) < need:
                tasks = training_tasks(profile, need - len(chunk), rng.randrange(2**31))
                got, unanswered = labelled_samples(
                    engine, tasks, tries=generator.samples_per_task, sampling=sampling,
                    max_tokens=optim.max_tokens)
                chunk += got[:need - len(chunk)]
                drawn, missed = drawn + len(tasks), missed + unanswered
                if missed == drawn >= 64:
                    raise ValueError(f"the starting model answered none of {drawn} training "
                                     "tasks right: no bound in its own style")
            train_round(trainer.model, optimizer, {"sft": chunk}, optim, trainer.pad,
                        seed=done)
            done += len(chunk)
            uri, _ = store.write(done, trainer.model, trainer.tokenizer, None)
            scores = evaluate(Path(uri), held, held_tasks, dtype=gate_dtype(profile.gate))
            store.prune(set(), set())
            curve.append({"samples": done, "pass_rate": scores["pass_rate"],
                          "tasks_drawn": drawn, "tasks_without_answer": missed})
            print(f"bound: {done} samples -> {scores['pass_rate']:.3f}", flush=True)
    return curve
