"""The hot path's types (schemas/fast.py) against the pydantic models they mirror: field by
field, on the golden files, on a corpus of varied records and on every hostile record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

import schemas
from schemas import fast
from services.common.stage import DecodeFailure, decode
from tests import hostile

PAIRS: list[tuple[type[BaseModel], type[msgspec.Struct]]] = [
    (schemas.ProducerInfo, fast.ProducerInfo), (schemas.VerifierSpec, fast.VerifierSpec),
    (schemas.Task, fast.Task), (schemas.Turn, fast.Turn),
    (schemas.SamplingParams, fast.SamplingParams), (schemas.Timings, fast.Timings),
    (schemas.Trajectory, fast.Trajectory), (schemas.Trajectory, fast.TrajectoryRecord),
    (schemas.Score, fast.Score), (schemas.ScoredTrajectory, fast.ScoredTrajectoryOut),
    (schemas.ScoredTrajectory, fast.ScoredTrajectory),
    (schemas.FilterDecision, fast.FilterDecision),
    (schemas.FilterDecision, fast.FilterDecisionOut),
    (schemas.RoutedSample, fast.RoutedSampleOut),
]
GOLDEN = Path(schemas.__file__).parent / "compat" / "v1"
RECORDS = {"raw": fast.TrajectoryRecord, "scored": fast.ScoredTrajectory,
           "filtered": fast.FilterDecision}
BY_MODEL = {"Trajectory": fast.TrajectoryRecord, "ScoredTrajectory": fast.ScoredTrajectory,
            "FilterDecision": fast.FilterDecision}
ALWAYS_SET = {"event_id", "created_at"}  # fresh per message: defaults of their own


@pytest.mark.parametrize(("model", "struct"), PAIRS, ids=lambda t: t.__name__)
def test_every_struct_has_its_models_fields_in_order_with_the_same_defaults(
        model: type[BaseModel], struct: type[msgspec.Struct]) -> None:
    info = msgspec.structs.fields(struct)
    assert [f.name for f in info] == list(model.model_fields)
    outputs = issubclass(struct, fast.Output)
    for f in info:
        field = model.model_fields[f.name]
        if outputs and f.required:  # an output names every field a stage sets
            continue
        assert f.required == field.is_required(), f.name
        if f.required or f.name in ALWAYS_SET:
            continue
        ours = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
        if isinstance(ours, msgspec.Raw):  # token ids and log-probs: kept as their JSON
            ours = msgspec.json.decode(ours)
        theirs = field.get_default(call_default_factory=True)
        if isinstance(theirs, BaseModel):
            theirs = json.loads(theirs.model_dump_json())
            ours = msgspec.to_builtins(ours)
        assert ours == theirs, f.name


def _same(model: type[BaseModel], data: bytes) -> None:
    """Both decode ``data`` to the same values, or both refuse it with the same dead letter."""
    try:
        expected: Any = model.model_validate_json(data)
    except ValidationError:
        expected = None
    type_ = BY_MODEL[model.__name__]
    if expected is None:
        with pytest.raises(DecodeFailure) as theirs:
            decode(model, data)
        with pytest.raises(DecodeFailure) as ours:
            decode(type_, data)
        assert (ours.value.kind, str(ours.value)) == (theirs.value.kind, str(theirs.value))
        return
    record = decode(type_, data)
    # The same values as the old path (the model) read, apart from unknown fields, which the
    # Struct does not keep (they travel in the raw bytes): its encoding read by the Struct.
    assert model.model_validate_json(msgspec.json.encode(record)).to_bytes() == \
        model.model_validate_json(msgspec.json.encode(
            msgspec.json.decode(expected.to_bytes(), type=type_))).to_bytes()
    if type_ is fast.FilterDecision:
        assert schemas.ScoredTrajectory.model_validate_json(record.record.raw) == \
            schemas.ScoredTrajectory.model_validate_json(expected.scored.to_bytes())


@pytest.mark.parametrize("name", list(BY_MODEL))
def test_the_golden_files_decode_to_the_same_values(name: str) -> None:
    model = getattr(schemas, name)
    data = (GOLDEN / f"{name}.json").read_bytes()
    _same(model, data)
    doc = json.loads(data)
    doc["from_a_newer_producer"] = {"kept": True}
    record = decode(BY_MODEL[name], json.dumps(doc).encode())
    assert json.loads(record.raw)["from_a_newer_producer"] == {"kept": True}  # forwarded


# Values a producer might write in place of any field: lax forms pydantic accepts, and wrong
# ones it refuses.
ODD = st.sampled_from([
    "3", 3.0, 3.5, "3.0", "1e2", True, 1, 0, -1, 2**70, "yes", "on", "", "x", None, [], {},
    "2026-01-01", "2026-01-01T00:00:00", "2026-01-01T00:00Z", "2026-01-01 00:00:00Z",
    "2026-01-01T00:00:00+01:00", 1700000000, 1700000000000, "1700000000",
    "D17B8746-61DE-40FB-B63B-53D0D8A59794", "{d17b8746-61de-40fb-b63b-53d0d8a59794}",
    "d17b874661de40fbb63b53d0d8a59794", "correct", "nan", "inf", 1e300, [1, "2", 3.0],
    {"a": 1}, "assistant", "User",
])


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [at] if at else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*at, i))
    return found


def _variant(doc: Any, path: tuple[Any, ...], value: Any, action: str) -> bytes:
    out = json.loads(json.dumps(doc))
    node = out
    for step in path[:-1]:
        node = node[step]
    if action == "delete" and isinstance(node, dict) and path[-1] not in ALWAYS_SET:
        # (a deleted event_id or created_at is filled in afresh: equal to nothing)
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(out, allow_nan=True).encode()


@pytest.mark.parametrize("name", list(BY_MODEL))
@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_varied_records_decode_the_same_or_are_refused_the_same(name: str, data: Any) -> None:
    model = getattr(schemas, name)
    doc = json.loads((GOLDEN / f"{name}.json").read_bytes())
    paths = _paths(doc)
    changes = data.draw(st.lists(st.tuples(st.sampled_from(paths), ODD,
                                           st.sampled_from(["set", "set", "delete"])),
                                 min_size=1, max_size=3))
    value = json.dumps(doc).encode()
    for path, odd, action in changes:
        try:
            value = _variant(json.loads(value), path, odd, action)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed the path
    _same(model, value)


@pytest.mark.parametrize("topic", list(RECORDS))
@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_hostile_record_gets_the_same_dead_letter_both_ways(topic: str, data: Any
                                                                   ) -> None:
    _kind, value = data.draw(hostile.hostile(topic))
    model = hostile.TYPES[topic]
    if not hostile.invalid(topic, value):
        _same(model, value)  # type: ignore[arg-type]  # hostile to the stage (an unknown environment), not the schema
        return
    with pytest.raises(DecodeFailure) as theirs:
        decode(model, value)
    with pytest.raises(DecodeFailure) as ours:
        decode(RECORDS[topic], value)
    assert (ours.value.kind, str(ours.value)) == (theirs.value.kind, str(theirs.value))


def test_lax_forms_take_the_models_path_and_come_out_canonical() -> None:
    doc = json.loads((GOLDEN / "ScoredTrajectory.json").read_bytes())
    doc["trajectory"]["policy_version"] = "3"
    doc["created_at"] = "2026-01-01"
    record = decode(fast.ScoredTrajectory, json.dumps(doc).encode())
    assert record.trajectory.policy_version == 3
    assert b'"policy_version":3' in record.raw  # what stages embed from here on
    assert fast.timestamp(record.created_at) == 1767225600.0  # a naive datetime is UTC


@settings(max_examples=200, derandomize=True, database=None)
@given(namespace=st.uuids(), name=st.text())
def test_uuid5_is_the_standard_librarys(namespace: Any, name: str) -> None:
    import uuid

    assert fast.uuid5(namespace, name) == str(uuid.uuid5(namespace, name))


def test_a_mirror_out_of_step_dead_letters_the_record_instead_of_stopping(monkeypatch: Any
                                                                          ) -> None:
    """Were a Struct to refuse what its model accepts and writes (a bug), the record becomes a
    'schema' dead letter naming both types; the service does not stop on it."""
    decoder = fast.Decoder(fast.ScoredTrajectory)
    failing = msgspec.json.Decoder(fast.FilterDecision).decode  # refuses every scored record
    monkeypatch.setattr(decoder, "_decode", failing)
    monkeypatch.setitem(fast._DECODERS, fast.ScoredTrajectory, decoder)
    data = (GOLDEN / "ScoredTrajectory.json").read_bytes()
    with pytest.raises(DecodeFailure) as refused:
        decode(fast.ScoredTrajectory, data)
    assert refused.value.kind == "schema"
    assert "ScoredTrajectory refuses what ScoredTrajectory accepts" in str(refused.value)


@settings(max_examples=300, derandomize=True, database=None)
@given(ids=st.none() | st.lists(st.integers(-2**40, 2**40)),
       spaces=st.sampled_from(["", " ", "\n "]))
def test_count_of_token_ids_kept_as_json_is_the_lists_length(ids: list[int] | None,
                                                             spaces: str) -> None:
    text = "null" if ids is None else \
        "[" + spaces + f"{spaces},{spaces}".join(map(str, ids)) + spaces + "]"
    doc = json.loads((GOLDEN / "Trajectory.json").read_bytes())
    doc["completion_token_ids"], doc["completion_logprobs"] = None, None
    data = json.dumps(doc).replace('"completion_token_ids": null',
                                   f'"completion_token_ids": {text}')
    record = decode(fast.TrajectoryRecord, data.encode())
    assert fast.count(record.completion_token_ids) == (None if ids is None else len(ids))
    assert fast.count(ids) == (None if ids is None else len(ids))  # a model's list
