"""Dead-letter headers and the topics declaration."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.cluster import topics
from services.common.dlq import MAX_MESSAGE_BYTES, DeadLetter
from services.common.errors import ConfigError
from services.registry import TOPICS

HISTORY = ["raw", "scored", "filtered", "rejected", "accepted.cpt", "accepted.sft",
           "accepted.rl", "checkpoints"]


def _letter(message: str = "bad", headers: list[tuple[str, bytes]] | None = None) -> DeadLetter:
    return DeadLetter(
        kind="schema", error_class="ValidationError", message=message, topic="flywheel.raw",
        partition=3, offset=1234, key=b"g-1", value=b"{}", headers=headers or [],
    )


def test_dead_letter_headers_name_the_error_and_its_origin() -> None:
    headers = dict(_letter().record_headers("scorer", "scorer-0"))
    assert headers == {
        "flywheel-error-type": b"schema",
        "flywheel-error-class": b"ValidationError",
        "flywheel-error-message": b"bad",
        "flywheel-source-topic": b"flywheel.raw",
        "flywheel-source-partition": b"3",
        "flywheel-source-offset": b"1234",
        "flywheel-service": b"scorer",
        "flywheel-instance": b"scorer-0",
    }


def test_dead_letter_message_is_bounded_and_source_headers_kept() -> None:
    letter = _letter("x" * 10_000, [("trace-id", b"abc"), ("flywheel-error-type", b"decode")])
    headers = letter.record_headers("filter", "f-0")
    as_dict = dict(headers)
    assert len(as_dict["flywheel-error-message"]) == MAX_MESSAGE_BYTES
    assert as_dict["trace-id"] == b"abc"
    assert [v for k, v in headers if k == "flywheel-error-type"] == [b"schema"]


def test_default_topics_file_declares_every_topic_with_history_kept_forever() -> None:
    specs = {s.name: s for s in topics.load(prefix="flywheel.")}
    assert set(specs) == {f"flywheel.{n}" for n in TOPICS}
    for name in HISTORY:
        assert specs[f"flywheel.{name}"].config["retention.ms"] == "-1", name
    assert specs["flywheel.tasks"].config["retention.ms"] != "-1"
    assert specs["flywheel.dlq"].config["retention.ms"] == "-1"
    assert all(s.partitions >= 1 for s in specs.values())


def test_prefix_is_configuration() -> None:
    names = {s.name for s in topics.load(prefix="staging-")}
    assert "staging-accepted.rl" in names and not any(n.startswith("flywheel.") for n in names)


def test_topics_file_must_declare_every_topic(tmp_path: Path) -> None:
    f = tmp_path / "topics.yaml"
    f.write_text("topics:\n  raw: {}\n")
    with pytest.raises(ConfigError, match="does not declare"):
        topics.load(f)


def test_topics_file_rejects_unknown_keys_and_coerces_values(tmp_path: Path) -> None:
    body = "".join(f"  {n}: {{}}\n" for n in TOPICS)
    f = tmp_path / "topics.yaml"
    defaults = "defaults:\n  partitions: 2\n  config: {retention.ms: -1, x: true}\n"
    f.write_text(defaults + "topics:\n" + body)
    spec = topics.load(f)[0]
    assert spec.config == {"retention.ms": "-1", "x": "true"} and spec.partitions == 2
    f.write_text("topics:\n" + body + "  raw: {partitons: 3}\n")
    with pytest.raises(ValidationError):
        topics.load(f)


def test_a_truncated_error_message_stays_valid_utf8() -> None:
    headers = dict(_letter("é" * 3000).record_headers("s", "i"))
    text = headers["flywheel-error-message"]
    assert isinstance(text, bytes) and len(text) <= MAX_MESSAGE_BYTES
    assert text.decode("utf-8").endswith("...")


def test_kraft_cluster_ids_never_start_with_a_dash() -> None:
    from services.cluster.local_broker import _cluster_id

    ids = [_cluster_id() for _ in range(2000)]  # a leading '-' would show up ~30 times
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
