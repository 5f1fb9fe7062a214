"""The hot path's types: msgspec Structs that decode the wire format in one pass.

The pydantic models of :mod:`schemas.messages` stay the source of truth (JSON Schema export,
golden files, settings, every edge where a person writes a message). A stage that handles
thousands of records a second (scorer, filter, router) declares one of the types below as its
``input_type`` instead: the runtime decodes each record into it once, with the same
constraints, and keeps the bytes it was read as (:attr:`Received.raw`), so that an output that
carries the input record embeds those bytes as they came instead of encoding them again
(:class:`ScoredTrajectoryOut`, :class:`FilterDecisionOut`, :class:`RoutedSampleOut`).

``tests/unit/test_fast.py`` checks every Struct against its pydantic model field by field
(names, order, requiredness, defaults), and that every golden file, a corpus of varied
records and every hostile record decode to the same values, or to the same dead letter,
both ways. The one difference, decided here: **unknown fields** are not kept on the Struct.
Nothing is lost: the raw bytes are what a stage forwards and embeds, unknown fields
included, byte for byte (pydantic's ``extra="allow"`` kept them by re-encoding). Lax forms
(``"3"`` for an int, a naive or date-only datetime, NaN inside free-form details) are not a
difference: the fast decode is strict and hands what it refuses to the model
(:class:`Decoder`).

Over 300 lines: a Struct for each wire type the hot path reads or writes (each a few lines,
beside the model it mirrors in :mod:`schemas.messages`), and the decoder that falls back to
the models.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeGuard

import msgspec
from msgspec import Meta, Raw

from schemas import messages
from schemas.envelope import SCHEMA_VERSION

Role = Literal["system", "user", "assistant", "tool"]
Verdict = Literal["correct", "incorrect", "unverified"]
TrainingStage = Literal["cpt", "sft", "rl"]

NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Version = Annotated[int, Meta(ge=1, le=SCHEMA_VERSION)]


def _now() -> datetime:
    return datetime.now(UTC)


def timestamp(at: datetime) -> float:
    """Seconds since the epoch; a naive datetime is UTC (what every producer means by it)."""
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()


class Wire(msgspec.Struct, kw_only=True):
    """Base of every nested wire type."""


class ProducerInfo(Wire, kw_only=True):
    service: str
    instance: str


class Envelope(Wire, kw_only=True):
    """The envelope fields of :class:`schemas.envelope.Message`, in its order."""

    event_id: uuid.UUID = msgspec.field(default_factory=uuid.uuid4)
    schema_version: Version = SCHEMA_VERSION
    created_at: datetime = msgspec.field(default_factory=_now)
    producer: ProducerInfo | None = None


class Received(Envelope, kw_only=True, dict=True):
    """A top-level record as decoded from Kafka. ``raw`` (set by :func:`decoder`'s decode,
    not a wire field) holds the bytes it was read as."""

    if TYPE_CHECKING:  # not a field: set by the decoder, in the instance's __dict__
        raw: bytes


class VerifierSpec(Wire, kw_only=True):
    kind: str
    answer: str | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class Task(Envelope, kw_only=True):
    task_id: str
    env: str
    prompt: str
    observation: dict[str, Any] | None = None
    verifier: VerifierSpec | None = None
    difficulty: NonNegFloat = 0.0
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


# Token ids and log-probs are most of a record's bytes (about 60 % of a scored record with
# 64-token completions) and no stage reads them one by one: they stay the JSON they came as
# (``Raw``, a view of the record's bytes) once checked. The check decodes them into the model's
# types and lets go of the lists at once, which costs a third of keeping them.
_IDS = msgspec.json.Decoder(list[int] | None).decode
_LOGPROBS = msgspec.json.Decoder(list[float] | None).decode  # finite: JSON has no NaN


def _null() -> Raw:
    return Raw(b"null")


def count(tokens: Raw | list[Any] | None) -> int | None:
    """How many ids (or log-probs) ``tokens`` holds, None when absent: a Struct's checked JSON
    list (counted by its commas, a list of numbers having no other), or a model's list."""
    if not isinstance(tokens, Raw):
        return None if tokens is None else len(tokens)
    data = bytes(tokens)
    if data == b"null":
        return None
    commas = data.count(b",")
    return commas + 1 if commas or data[1:-1].strip() else 0


class Turn(Wire, kw_only=True):
    role: Role
    content: str
    token_ids: Raw = msgspec.field(default_factory=_null)
    """``list[int] | None``, as its JSON."""
    logprobs: Raw = msgspec.field(default_factory=_null)
    """``list[float] | None``, as its JSON."""

    def __post_init__(self) -> None:
        messages.check_tokens(_IDS(self.token_ids), "token_ids", _LOGPROBS(self.logprobs),
                              "logprobs")


class SamplingParams(Wire, kw_only=True):
    temperature: NonNegFloat = 1.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Meta(ge=-1)] = -1
    max_tokens: Annotated[int, Meta(ge=1)] = 256
    n: Annotated[int, Meta(ge=1)] = 1
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)


class Timings(Wire, kw_only=True):
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_seconds: NonNegFloat | None = None
    generation_seconds: NonNegFloat = 0.0
    env_seconds: NonNegFloat = 0.0


class Trajectory(Envelope, kw_only=True):
    task: Task
    group_id: str
    sample_index: NonNegInt
    group_size: Annotated[int, Meta(ge=1)]
    turns: list[Turn]
    completion: str
    prompt_token_ids: Raw = msgspec.field(default_factory=_null)
    """``list[int] | None``, as its JSON (and the two below: :func:`count`)."""
    completion_token_ids: Raw = msgspec.field(default_factory=_null)
    completion_logprobs: Raw = msgspec.field(default_factory=_null)
    finish_reason: str | None = None
    policy_version: NonNegInt
    model: str
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    timings: Timings = msgspec.field(default_factory=Timings)

    def __post_init__(self) -> None:
        messages.check_sample_index(self.sample_index, self.group_size)
        _IDS(self.prompt_token_ids)
        messages.check_tokens(_IDS(self.completion_token_ids), "completion_token_ids",
                              _LOGPROBS(self.completion_logprobs), "completion_logprobs")


class TrajectoryRecord(Trajectory, Received, kw_only=True):
    """:class:`schemas.Trajectory` as the scorer reads it from ``trajectories``."""


class Score(Wire, kw_only=True):
    scorer: str
    version: str
    value: float  # finite: the decoder refuses NaN and Infinity tokens
    passed: bool | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class ScoredTrajectory(Received, kw_only=True):
    """:class:`schemas.ScoredTrajectory` as the filter reads it."""

    trajectory: Trajectory
    scores: list[Score]
    reward: float
    verdict: Verdict
    reward_rule: str


class FilterDecision(Received, kw_only=True):
    """:class:`schemas.FilterDecision` as the router reads it: ``scored`` stays the bytes it
    was embedded as, and is decoded into :attr:`record` (not a wire field) by the decoder."""

    scored: Raw
    accepted: bool
    reasons: list[str] = msgspec.field(default_factory=list)
    flags: list[str] = msgspec.field(default_factory=list)
    policy_name: str
    policy_hash: str
    group_accepted: NonNegInt | None = None
    latest_version: NonNegInt | None = None

    if TYPE_CHECKING:
        record: ScoredTrajectory

    def __post_init__(self) -> None:
        messages.check_decision(self)


# -- outputs: encoded once, embedding what they carry -----------------------------------------


def uuid5(namespace: uuid.UUID, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``, without building the UUID object (a third of
    the time): the ids the hot path derives for its outputs."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = digest.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


class Output(Wire, kw_only=True):
    """Base of the hot path's outputs: :meth:`to_bytes` as the runtime expects of a message.
    The envelope's fields, in its order; ``event_id`` as its text (:func:`uuid5`), encoded as
    the models encode a UUID. The runtime stamps ``producer`` when it is unset."""

    event_id: str = msgspec.field(default_factory=lambda: str(uuid.uuid4()))
    schema_version: int = SCHEMA_VERSION
    created_at: datetime = msgspec.field(default_factory=_now)
    producer: ProducerInfo | None = None

    def to_bytes(self) -> bytes:
        return _ENCODER.encode(self)

    def partition_key(self) -> str:
        raise TypeError(f"{type(self).__name__} has no key of its own: give the stage's Output "
                        "one")


class ScoredTrajectoryOut(Output, kw_only=True):
    """Encodes as :class:`schemas.ScoredTrajectory`, with ``trajectory`` the input's bytes.
    ``scores`` and ``reward`` must be finite (checked by the scorer: JSON has no NaN)."""

    trajectory: Raw
    scores: list[Score]
    reward: float
    verdict: Verdict
    reward_rule: str


class FilterDecisionOut(Output, kw_only=True):
    """Encodes as :class:`schemas.FilterDecision`, with ``scored`` the input's bytes."""

    scored: Raw
    accepted: bool
    reasons: list[str]
    flags: list[str]
    policy_name: str
    policy_hash: str
    group_accepted: int | None
    latest_version: int | None


class RoutedSampleOut(Output, kw_only=True):
    """Encodes as :class:`schemas.RoutedSample`, each sample the bytes it was read as."""

    stage: TrainingStage
    group_id: str
    samples: list[Raw]
    decision_ids: list[uuid.UUID]
    weight: float
    reason: str
    policy_name: str
    policy_hash: str
    filter_policy_hash: str | None
    replay: str | None = None


_ENCODER = msgspec.json.Encoder()


class Unrepresentable(ValueError):
    """A record the model accepts, but whose canonical encoding the Struct refuses: the two
    are out of step (a bug, which the field-by-field test exists to catch). The record is
    dead-lettered ('schema') with this message, not a reason to stop."""


class Decoder:
    """Decodes one record value into a :class:`Received` type, keeping its bytes.

    The fast decode is strict: the JSON that services write (canonical types, RFC 3339
    datetimes) is all it takes. Anything it refuses is handed to the pydantic model, which
    decides as it always has: a ``pydantic.ValidationError`` (the record is dead-lettered with
    the same kind and message as before), or a value in a lax form (``"3"`` for an int, a
    date without a time...) that is accepted, re-encoded canonically by the model and decoded
    from that. So the hot path accepts exactly what the models accept, and the models stay the
    one definition of what is valid."""

    __slots__ = ("_decode", "_model", "_scored", "type")

    def __init__(self, type_: type[Received]) -> None:
        self.type = type_
        self._model = MODELS[type_]
        self._decode = msgspec.json.Decoder(type_).decode
        self._scored = msgspec.json.Decoder(ScoredTrajectory).decode \
            if type_ is FilterDecision else None

    def __call__(self, data: bytes) -> Any:
        try:
            return self._fast(data)
        except (msgspec.DecodeError, RecursionError):  # ValidationError included, and
            pass  # nesting too deep for msgspec: the model decides
        canonical = self._model.model_validate_json(data).to_bytes()  # raises if invalid
        try:
            return self._fast(canonical)
        except (msgspec.DecodeError, RecursionError) as exc:  # a mirror out of step: refused
            raise Unrepresentable(f"{self.type.__name__} refuses what {self._model.__name__} "
                                  f"accepts and wrote as: {exc}") from exc

    def _fast(self, data: bytes) -> Any:
        record: Any = self._decode(data)
        record.raw = data
        if self._scored is not None:
            raw = bytes(record.scored)
            record.record = self._scored(raw)
            record.record.raw = raw
        return record


MODELS: dict[type[Received], type[messages.Message]] = {
    TrajectoryRecord: messages.Trajectory, ScoredTrajectory: messages.ScoredTrajectory,
    FilterDecision: messages.FilterDecision}
"""The pydantic model each record type mirrors: its source of truth."""

_DECODERS: dict[type[Received], Decoder] = {}


def decoder(type_: type[Received]) -> Decoder:
    """The (shared) decoder of a record type."""
    found = _DECODERS.get(type_)
    if found is None:
        found = _DECODERS[type_] = Decoder(type_)
    return found


def is_fast(type_: Any) -> TypeGuard[type[Received]]:
    """Whether ``type_`` is one of this module's record types (not a pydantic model)."""
    return isinstance(type_, type) and issubclass(type_, Received)
