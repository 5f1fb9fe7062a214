"""The scorers a scorer config composes, and the declared rule that turns scores into a reward.

A scorer looks at a batch of trajectories (the hot path's Structs, :mod:`schemas.fast`, or
the pydantic models: the same fields) and gives each one a :class:`~schemas.fast.Score`, or
None where it does not apply (the code verifier on a task without unit tests). Every score
carries the scorer's name and version; a version is a hash of what decides the score (the
scorer's config, and for a reward model its weights), so two scores with the same name and
version are comparable, and a replay under a new config is told apart.

The reward and the verdict are derived from the scores by :class:`RewardRule`, whose text is
recorded with every scored trajectory.

Over 300 lines: six scorers, each beside its config (about 40 lines a pair), and the reward
rule that reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field

from schemas import Score as ScoreModel
from schemas import Task, Turn, Verdict, fast
from schemas import Trajectory as TrajectoryModel
from schemas.fast import Score
from services import envs
from services.common.errors import ConfigError, DependencyError
from services.common.text import REPETITION_MEASURE, repetition_ratio
from services.scorer.metrics import SANDBOX_KILLS
from services.scorer.sandbox import NO_NETNS, SandboxLimits, isolation_plan, run_python_tests

Trajectory = TrajectoryModel | fast.Trajectory
"""What a scorer reads: the scorer stage's Structs, or the models (tests, benchmarks)."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def digest(self) -> str:
        """12 hex digits of the config's sha256: the scorer's version."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class VerifierConfig(_Config):
    """The task's own check: the environment's verifier, or the declared ``VerifierSpec``
    (exact, numeric, regex, json_schema). Tasks whose verifier is ``unit_tests`` are left to
    the code verifier."""

    kind: Literal["verifier"] = "verifier"
    name: str = "verifier"


class CodeConfig(_Config):
    """Unit tests in a sandboxed subprocess, for tasks whose verifier kind is ``unit_tests``
    (``params.tests``: Python source with asserts). The solution is the completion's first
    fenced code block, or the whole completion."""

    kind: Literal["code"] = "code"
    name: str = "code"
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    parallelism: int = Field(default=2, ge=1, description="Sandboxes run at once per batch.")
    python: str | None = Field(
        default=None, description="Interpreter for solutions (standard library only). Default: "
        "when running as root, the system's /usr/bin/python3, which the unprivileged sandbox "
        "user can execute (a virtualenv under /root is not); otherwise this interpreter.")
    require_isolation: bool = Field(
        default=True, description="Refuse to start unless solutions can run as an "
        "unprivileged user (the scorer runs as root) in a network namespace of their own "
        "(CAP_SYS_ADMIN). False accepts weaker isolation: solutions could then read the "
        "scorer's environment and files, or reach the network. Never root: a scorer running "
        "as root whose interpreter uid 65534 cannot execute does not start either way.")


def sandbox_python(configured: str | None) -> str:
    if configured:
        return configured
    system = Path("/usr/bin/python3")
    if os.geteuid() == 0 and os.access(system, os.X_OK):
        return str(system)
    return sys.executable


class RewardModelConfig(_Config):
    """A local Hugging Face sequence-classification folder. One label: its logit is the
    score; two or more: the probability of ``positive_label``."""

    kind: Literal["reward_model"] = "reward_model"
    name: str = "reward_model"
    path: Path
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=512, ge=8)
    positive_label: int = Field(default=1, ge=0)
    device: str = "cpu"


class LengthConfig(_Config):
    """Completion length in characters or in sampled tokens; passes inside the bounds."""

    kind: Literal["length"] = "length"
    name: str = "length"
    unit: Literal["chars", "tokens"] = "chars"
    min: int = Field(default=0, ge=0)
    max: int | None = Field(default=None, ge=1)


class RepetitionConfig(_Config):
    """Share of repeated word n-grams in the completion (0: none repeats); passes at or
    below ``max_ratio``."""

    kind: Literal["repetition"] = "repetition"
    name: str = "repetition"
    ngram: int = Field(default=3, ge=1)
    max_ratio: float = Field(default=0.5, ge=0, le=1)


class FormatConfig(_Config):
    """The completion (stripped) must match a regular expression from its start."""

    kind: Literal["format"] = "format"
    name: str = "format"
    pattern: str
    full_match: bool = True


ScorerConfig = Annotated[
    VerifierConfig | CodeConfig | RewardModelConfig | LengthConfig | RepetitionConfig
    | FormatConfig,
    Field(discriminator="kind"),
]


class Scorer(Protocol):
    name: str
    version: str

    def score(self, batch: Sequence[Trajectory]) -> list[Score | None]: ...


class VerifierScorer:
    def __init__(self, config: VerifierConfig) -> None:
        self.name, self.version = config.name, config.digest()

    def score(self, batch: Sequence[Trajectory]) -> list[Score | None]:
        out: list[Score | None] = []
        for traj in batch:
            spec = traj.task.verifier
            if spec is not None and spec.kind == "unit_tests":
                out.append(None)
                continue
            try:
                env = envs.get(traj.task.env)
            except ConfigError as exc:
                raise ValueError(f"unknown environment {traj.task.env!r}") from exc
            # An environment reads a task's and the turns' fields, which the Structs share
            # with the models (Environment.verify).
            result = env.verify(cast(Task, traj.task), cast(list[Turn], traj.turns))
            out.append(Score(scorer=self.name, version=self.version, value=float(result.score),
                             passed=result.passed, details=_jsonable(result.details)))
        return out


_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion, or the completion itself."""
    match = _CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


class CodeScorer:
    def __init__(self, config: CodeConfig) -> None:
        self.name, self.version = config.name, config.digest()
        self.limits = config.limits
        self.parallelism = config.parallelism
        self.python = sandbox_python(config.python)
        self.require_isolation = config.require_isolation
        plan = isolation_plan(self.python)
        if os.geteuid() == 0 and "setuid" not in plan:  # the waiver does not cover root
            raise ConfigError(
                f"code scorer {config.name}: uid 65534 cannot execute {self.python}, and "
                "solutions never run as root (require_isolation: false does not change that). "
                "Use an interpreter uid 65534 can execute (python: /usr/bin/python3), or run "
                "the scorer as a user other than root.")
        if self.require_isolation and "setuid" not in plan:
            raise ConfigError(
                f"code scorer {config.name}: solutions cannot be run as an unprivileged user "
                f"with {self.python} (isolation available: {', '.join(plan)}). Run the scorer "
                "as root with an interpreter uid 65534 can execute (python: /usr/bin/python3), "
                "or set require_isolation: false to accept weaker isolation.")
        if self.require_isolation and "netns" not in plan:
            raise ConfigError(f"code scorer {config.name}: {NO_NETNS} Or set "
                              "require_isolation: false to accept solutions with the network.")

    def score(self, batch: Sequence[Trajectory]) -> list[Score | None]:
        jobs: dict[int, tuple[str, str]] = {}
        for i, traj in enumerate(batch):
            spec = traj.task.verifier
            if spec is None or spec.kind != "unit_tests":
                continue
            tests = spec.params.get("tests")
            if not isinstance(tests, str) or not tests.strip():
                raise ValueError(f"task {traj.task.task_id}: unit_tests verifier without "
                                 "params.tests")
            jobs[i] = (extract_code(traj.completion), tests)
        out: list[Score | None] = [None] * len(batch)
        if not jobs:
            return out
        with ThreadPoolExecutor(max_workers=min(self.parallelism, len(jobs))) as pool:
            futures = {i: pool.submit(run_python_tests, code, tests, self.limits,
                                      python=self.python,
                                      require_isolation=self.require_isolation)
                       for i, (code, tests) in jobs.items()}
            for i, future in futures.items():
                try:
                    result = future.result()
                except OSError as exc:  # the machine, not the record: retried by a restart
                    raise DependencyError(f"sandbox could not start: {exc}") from exc
                passed = result.status == "passed"
                if result.status == "killed":
                    SANDBOX_KILLS.labels(result.reason or "unknown").inc()
                out[i] = Score(
                    scorer=self.name, version=self.version, value=1.0 if passed else 0.0,
                    passed=passed,
                    details={"status": result.status, "reason": result.reason,
                             "seconds": round(result.seconds, 3),
                             "isolation": ",".join(result.isolation),
                             "stderr": result.stderr[-500:]},
                )
        return out


class RewardModelScorer:
    """Batched inference with ``AutoModelForSequenceClassification``. Loads safetensors only
    (``use_safetensors=True``): a folder holding only pickled weights is refused."""

    def __init__(self, config: RewardModelConfig) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = config.path
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise ConfigError(f"reward model {path}: no *.safetensors weights")
        digest = hashlib.sha256()
        for f in [*weights, path / "config.json"]:
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        self.name = config.name
        self.version = f"{config.digest()}-{digest.hexdigest()[:12]}"
        self.config = config
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True).to(config.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, batch: Sequence[Trajectory]) -> list[Score | None]:
        texts = [t.task.prompt + t.completion for t in batch]
        values: list[float] = []
        size = self.config.batch_size
        for start in range(0, len(texts), size):
            enc = self.tokenizer(texts[start:start + size], padding=True, truncation=True,
                                 max_length=self.config.max_length, return_tensors="pt")
            enc = {k: v.to(self.config.device) for k, v in enc.items()}
            with self._torch.inference_mode():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                values.extend(logits[:, 0].tolist())
            else:
                values.extend(logits.softmax(-1)[:, self.config.positive_label].tolist())
        return [Score(scorer=self.name, version=self.version, value=float(v)) for v in values]


class LengthScorer:
    def __init__(self, config: LengthConfig) -> None:
        self.name, self.version, self.config = config.name, config.digest(), config

    def score(self, batch: Sequence[Trajectory]) -> list[Score | None]:
        c = self.config
        out: list[Score | None] = []
        for t in batch:
            n = (len(t.completion) if c.unit == "chars"
                 else fast.count(t.completion_token_ids) or 0)
            ok = n >= c.min and (c.max is None or n <= c.max)
            out.append(Score(scorer=self.name, version=self.version, value=float(n), passed=ok,
                             details={"unit": c.unit}))
        return out


class RepetitionScorer:
    def __init__(self, config: RepetitionConfig) -> None:
        self.name, self.version, self.config = config.name, config.digest(), config

    def score(self, batch: Sequence[Trajectory]) -> list[Score | None]:
        c = self.config
        out: list[Score | None] = []
        for t in batch:
            ratio = repetition_ratio(t.completion, c.ngram)
            out.append(Score(scorer=self.name, version=self.version, value=float(ratio),
                             passed=ratio <= c.max_ratio,
                             details={"measure": REPETITION_MEASURE, "ngram": c.ngram}))
        return out


class FormatScorer:
    def __init__(self, config: FormatConfig) -> None:
        self.name, self.version, self.config = config.name, config.digest(), config
        try:
            self.pattern = re.compile(config.pattern)
        except re.error as exc:
            raise ConfigError(f"format scorer {config.name}: bad pattern: {exc}") from exc

    def score(self, batch: Sequence[Trajectory]) -> list[Score | None]:
        match = self.pattern.fullmatch if self.config.full_match else self.pattern.match
        out: list[Score | None] = []
        for t in batch:
            ok = match(t.completion.strip()) is not None
            out.append(Score(scorer=self.name, version=self.version, value=1.0 if ok else 0.0,
                             passed=ok))
        return out


def build(config: ScorerConfig) -> Scorer:
    if isinstance(config, VerifierConfig):
        return VerifierScorer(config)
    if isinstance(config, CodeConfig):
        return CodeScorer(config)
    if isinstance(config, RewardModelConfig):
        return RewardModelScorer(config)
    if isinstance(config, LengthConfig):
        return LengthScorer(config)
    if isinstance(config, RepetitionConfig):
        return RepetitionScorer(config)
    return FormatScorer(config)


class RewardRule(_Config):
    """How scores become the scalar reward and the verdict.

    - reward = sum of ``weights[name] * value`` over the scores present (a scorer without a
      weight only informs);
    - but if any scorer named in ``require`` failed (``passed`` is False), reward =
      ``fail_reward``: a malformed or runaway completion is worth less than a wrong answer;
    - verdict: of the scores named in ``verdict_from`` that judged the sample (``passed`` not
      None), all passed: ``correct``; any failed: ``incorrect``; none judged: ``unverified``.
    """

    weights: dict[str, float] = Field(default_factory=lambda: {"verifier": 1.0, "code": 1.0})
    require: list[str] = Field(default_factory=list)
    fail_reward: float = -1.0
    verdict_from: list[str] = Field(default_factory=lambda: ["verifier", "code"])

    def text(self) -> str:
        terms = " + ".join(f"{w:g}*{n}" for n, w in sorted(self.weights.items())) or "0"
        req = f"; if any of {sorted(self.require)} fails: {self.fail_reward:g}" \
            if self.require else ""
        return (f"reward = {terms}{req}; verdict = all({', '.join(self.verdict_from)})"
                f" [{self.digest()}]")

    def apply(self, scores: Sequence[Score | ScoreModel]) -> tuple[float, Verdict]:
        by_name = {s.scorer: s for s in scores}
        if any(by_name[n].passed is False for n in self.require if n in by_name):
            reward = self.fail_reward
        else:
            reward = sum(w * by_name[n].value for n, w in self.weights.items() if n in by_name)
        judged = [by_name[n].passed for n in self.verdict_from
                  if n in by_name and by_name[n].passed is not None]
        verdict: Verdict = ("unverified" if not judged
                            else "correct" if all(judged) else "incorrect")
        return reward, verdict


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, str | int | float | bool | None) else str(v)
            for k, v in details.items()}
