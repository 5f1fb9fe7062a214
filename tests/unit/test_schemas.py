"""Message schemas: round trips, compatibility in both directions, keys, invariants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas import MESSAGE_TYPES, SCHEMA_VERSION, FilterDecision, OffsetRange, Trajectory
from schemas.export import JSON_DIR, stale
from tests import factories

COMPAT = Path(__file__).resolve().parents[2] / "schemas" / "compat"


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_round_trip(name: str) -> None:
    message = factories.EXAMPLES[name]()
    data = message.to_bytes()
    assert json.loads(data.decode("utf-8"))["schema_version"] == SCHEMA_VERSION
    again = MESSAGE_TYPES[name].from_bytes(data)
    assert again == message
    assert again.to_bytes() == data


def test_every_message_type_has_an_example() -> None:
    assert set(factories.EXAMPLES) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_unknown_fields_from_a_newer_producer_are_kept(name: str) -> None:
    doc = json.loads(factories.EXAMPLES[name]().to_bytes())
    doc["field_from_the_future"] = {"nested": [1, 2]}
    parsed = MESSAGE_TYPES[name].from_bytes(json.dumps(doc))
    forwarded = json.loads(parsed.to_bytes())
    assert forwarded["field_from_the_future"] == {"nested": [1, 2]}
    assert forwarded["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_a_newer_schema_version_is_refused(name: str) -> None:
    # Additions keep the version; a new version renamed or retyped a field, which this code
    # would misread: the record is refused (the runtime dead-letters it as 'schema').
    doc = json.loads(factories.EXAMPLES[name]().to_bytes())
    doc["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValidationError, match="schema_version"):
        MESSAGE_TYPES[name].from_bytes(json.dumps(doc))


def test_unknown_nested_fields_survive_a_forward() -> None:
    doc = json.loads(factories.scored().to_bytes())
    doc["trajectory"]["task"]["curriculum_bucket"] = 7
    parsed = MESSAGE_TYPES["ScoredTrajectory"].from_bytes(json.dumps(doc))
    assert json.loads(parsed.to_bytes())["trajectory"]["task"]["curriculum_bucket"] == 7


def _golden_versions() -> list[Path]:
    return sorted(COMPAT.glob("v*"), key=lambda p: int(p.name[1:]))


def test_goldens_exist_for_every_version_up_to_the_current_one() -> None:
    versions = [int(p.name[1:]) for p in _golden_versions()]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    for folder in _golden_versions():
        assert {p.stem for p in folder.glob("*.json")} <= set(MESSAGE_TYPES)


@pytest.mark.parametrize(
    "path", sorted(COMPAT.glob("v*/*.json")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_messages_written_by_earlier_versions_still_parse(path: Path) -> None:
    model = MESSAGE_TYPES[path.stem]
    parsed = model.from_bytes(path.read_bytes())
    assert parsed.schema_version == int(path.parent.name[1:])


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_no_field_became_required_after_the_oldest_golden(name: str) -> None:
    """A field added later must have a default, or old history stops parsing."""
    oldest = next(p / f"{name}.json" for p in _golden_versions() if (p / f"{name}.json").exists())
    old_doc = json.loads(oldest.read_text())
    schema = MESSAGE_TYPES[name].model_json_schema()

    def check(doc: dict, node: dict, where: str) -> None:
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
        for field in node.get("required", []):
            assert field in doc, f"{where}.{field} is required but {oldest} lacks it"
        for field, sub in node.get("properties", {}).items():
            value = doc.get(field)
            if isinstance(value, dict) and ("$ref" in sub or "properties" in sub):
                check(value, sub, f"{where}.{field}")

    check(old_doc, schema, name)


def test_json_schema_files_are_current() -> None:
    assert stale() == [], "run `python -m schemas.export` and commit schemas/json/"


def test_stale_detects_a_drifted_file(tmp_path: Path) -> None:
    for p in JSON_DIR.glob("*.json"):
        (tmp_path / p.name).write_text(p.read_text())
    assert stale(tmp_path) == []
    (tmp_path / "Task.json").write_text("{}\n")
    (tmp_path / "Removed.json").write_text("{}\n")
    assert stale(tmp_path) == ["Removed.json", "Task.json"]


def test_every_sample_of_a_task_shares_its_key_down_to_the_filter() -> None:
    a = factories.trajectory(5, sample_index=0)
    b = factories.trajectory(5, sample_index=1)
    assert a.partition_key() == b.partition_key() == "arith-5"
    assert factories.scored(5).partition_key() == "arith-5"
    assert factories.decision(5).partition_key() == "arith-5"
    assert factories.routed(5).partition_key() == "g-5"
    assert factories.task(5).partition_key() == "arith-5"
    assert factories.checkpoint().partition_key() == "tiny"
    assert a.event_id != b.event_id


def test_invariants_are_enforced() -> None:
    doc = json.loads(factories.decision().to_bytes())
    doc.update(accepted=False, reasons=[])
    with pytest.raises(ValidationError, match="at least one reason"):
        FilterDecision.model_validate(doc)
    doc = json.loads(factories.trajectory().to_bytes())
    doc["completion_logprobs"] = [-0.1]
    with pytest.raises(ValidationError, match="same length"):
        Trajectory.model_validate(doc)
    doc = json.loads(factories.trajectory().to_bytes())
    doc["sample_index"] = 2
    with pytest.raises(ValidationError, match="group_size"):
        Trajectory.model_validate(doc)
    with pytest.raises(ValidationError, match="end"):
        OffsetRange(topic="t", partition=0, start=5, end=4)
    doc = json.loads(factories.checkpoint().to_bytes())
    doc["manifest"][0]["sha256"] = "not-a-digest"
    with pytest.raises(ValidationError):
        MESSAGE_TYPES["CheckpointEvent"].model_validate(doc)


def test_created_at_is_timezone_aware_utc() -> None:
    t = factories.task()
    assert t.created_at.utcoffset() is not None
    assert t.created_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
