"""The envelope every message on a flywheel topic carries, and the wire encoding.

Wire format: one UTF-8 JSON object per Kafka record value. Every message type subclasses
:class:`Message`, which adds the envelope fields (``event_id``, ``schema_version``,
``created_at``, ``producer``) to its own.

Compatibility rules (a test enforces the first two):

- Unknown fields are kept, not rejected (``extra="allow"``): a service built against an older
  schema reads messages from a newer producer and, when it forwards them, does not strip what it
  does not know.
- A field added after version 1 has a default, so messages written by older producers still
  parse. Golden messages of every released version live in ``schemas/compat/v<N>/``.
- Renaming or retyping a field is a new ``SCHEMA_VERSION``, and readers must keep parsing the
  previous version until no topic holds it any more (history topics are kept forever).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
"""The version this code writes. Readers accept this version and every earlier one."""


class WireModel(BaseModel):
    """Base of every model that appears on the wire, nested or not: tolerant of new fields."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ProducerInfo(WireModel):
    """Which service and which instance of it wrote a message."""

    service: str = Field(description="Service name, e.g. 'generator'.")
    instance: str = Field(description="Instance id, stable across restarts of that instance.")


def _now() -> datetime:
    return datetime.now(UTC)


class Message(WireModel):
    """Envelope fields shared by every top-level message."""

    event_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Identity of this record. Deterministic where replays must deduplicate.",
    )
    schema_version: int = Field(
        default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION,
        description="A newer version than this code knows is refused (dead-lettered).")
    created_at: datetime = Field(default_factory=_now, description="UTC time of creation.")
    producer: ProducerInfo | None = Field(
        default=None,
        description="The writing service; the runtime stamps it on outputs that leave it unset.",
    )

    message_type: ClassVar[str]
    """The type's name, as used for its JSON Schema file and in ``MESSAGE_TYPES``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.message_type = cls.__name__

    def partition_key(self) -> str:
        """Kafka record key: records that must stay together share it (overridden per type)."""
        return str(self.event_id)

    def to_bytes(self) -> bytes:
        """UTF-8 JSON, as written to Kafka."""
        return self.__pydantic_serializer__.to_json(self)

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Self:
        """Parse and validate one record value; raises ``pydantic.ValidationError``."""
        return cls.model_validate_json(data)
