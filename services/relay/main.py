"""``flywheel run relay``: entry point. Parses settings and serves the stage."""

from __future__ import annotations

from pydantic import Field, field_validator

from schemas import MESSAGE_TYPES
from services.common.config import ServiceSettings
from services.common.service import serve
from services.relay.stage import RelayStage


class RelaySettings(ServiceSettings):
    """Relay settings; its own fields sit at the top level of the environment, e.g.
    ``FLYWHEEL_INPUT_TOPICS='["flywheel.raw"]' FLYWHEEL_OUTPUT_TOPIC=flywheel.raw.copy``."""

    service: str = "relay"
    input_topics: list[str] = Field(min_length=1, description="Full topic names to read.")
    output_topic: str = Field(min_length=1, description="Full topic name to write.")
    message_type: str = Field(default="Task", description="Schema every input must satisfy.")

    @field_validator("message_type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in MESSAGE_TYPES:
            raise ValueError(f"unknown message type {value!r}; one of {sorted(MESSAGE_TYPES)}")
        return value


def run(settings: RelaySettings) -> int:
    stage = RelayStage(MESSAGE_TYPES[settings.message_type], settings.output_topic)
    return serve(settings, stage, settings.input_topics)
