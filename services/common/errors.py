"""The project's exception types. Catch them at named boundaries only (see STYLE.md)."""

from __future__ import annotations


class FlywheelError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(FlywheelError):
    """Configuration that cannot work: a missing file, a contradiction between settings."""


class BrokerError(FlywheelError):
    """The local Kafka broker could not be installed, started or stopped."""


class FatalRuntimeError(FlywheelError):
    """A failure that is not about one record: the service must stop with a non-zero exit.

    Examples: the producer was fenced by a newer instance with the same transactional id, the
    broker has been unreachable past the configured limit, a produced record could not be
    delivered (unknown topic, authorisation).
    """


class DependencyError(FlywheelError):
    """Raised by a stage when something it depends on is down (a model server, a sandbox pool):
    the failure is not about the records, so they must not be dead-lettered. The runtime stops
    the service with a non-zero exit; the uncommitted batch is processed again after restart.
    """


class RecordError(FlywheelError):
    """One input record could not be handled; it goes to the dead-letter topic.

    ``kind`` is the value of the ``flywheel-error-type`` header: ``decode`` (not UTF-8 JSON),
    ``schema`` (JSON that fails its schema) or ``stage`` (the stage raised on it).
    """

    def __init__(
        self, kind: str, message: str, *, topic: str, partition: int, offset: int,
        exception_type: str,
    ) -> None:
        super().__init__(f"{kind} error at {topic}[{partition}]@{offset}: {message}")
        self.kind = kind
        self.message = message
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.exception_type = exception_type
