"""The relay's pure stage: every input message goes to the output topic unchanged."""

from __future__ import annotations

from collections.abc import Sequence

from schemas import Message
from services.common.stage import Output


class RelayStage:
    """Forwards each message to ``output_topic``, keyed by its own partition key."""

    def __init__(self, input_type: type[Message], output_topic: str) -> None:
        self.input_type = input_type
        self.output_topic = output_topic

    def process(self, batch: Sequence[Message]) -> list[Output]:
        return [Output(self.output_topic, record, forward=True) for record in batch]
