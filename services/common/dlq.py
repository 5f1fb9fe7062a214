"""Dead letters: the original record, byte for byte, plus headers that say what went wrong.

A dead letter keeps the source key and value untouched, so an operator can fix the producer or
the stage and replay the ``dlq`` topic; the source record's own headers are kept after ours.

Headers (all UTF-8):

| header                      | value                                            |
| --------------------------- | ------------------------------------------------ |
| ``flywheel-error-type``     | ``decode`` / ``schema`` / ``stage``              |
| ``flywheel-error-class``    | the exception class, e.g. ``ValidationError``    |
| ``flywheel-error-message``  | the message, at most 4 KiB                       |
| ``flywheel-source-topic``   | topic the record was read from                   |
| ``flywheel-source-partition`` | its partition                                  |
| ``flywheel-source-offset``  | its offset                                       |
| ``flywheel-service``        | the service that gave up on it                   |
| ``flywheel-instance``       | that service's instance id                       |
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_MESSAGE_BYTES = 4096

Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A failed input record and why it failed."""

    kind: str
    error_class: str
    message: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    def record_headers(self, service: str, instance: str) -> Headers:
        text = self.message.encode("utf-8", "replace")
        if len(text) > MAX_MESSAGE_BYTES:
            # Cut on a character boundary so the header stays valid UTF-8.
            cut = text[: MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore").encode()
            text = cut + b"..."
        ours: Headers = [
            ("flywheel-error-type", self.kind.encode()),
            ("flywheel-error-class", self.error_class.encode()),
            ("flywheel-error-message", text),
            ("flywheel-source-topic", self.topic.encode()),
            ("flywheel-source-partition", str(self.partition).encode()),
            ("flywheel-source-offset", str(self.offset).encode()),
            ("flywheel-service", service.encode()),
            ("flywheel-instance", instance.encode()),
        ]
        # A record replayed from the DLQ that fails again: the newest failure wins each header.
        names = {name for name, _ in ours}
        return ours + [(k, v) for k, v in self.headers if k not in names]
