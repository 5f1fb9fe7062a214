"""The project's exception types. Catch them at named boundaries only: per record (to the
dead-letter topic, with the reason), in the producer's delivery callback, and at a service's
top level (``services.common.service``: log, exit non-zero). Elsewhere errors propagate."""

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


class BrokerUnreachable(FatalRuntimeError):
    """No broker answered a request in time. Fatal to a caller that cannot wait; a loop that
    tracks its broker (the feeder) reports not-ready and retries until its own limit."""


class AccessDenied(FatalRuntimeError):
    """The cluster refused this client: its credentials, or an ACL it needs. Retrying cannot
    help; the message says what to fix."""


class Interrupted(FlywheelError):
    """Raised by a stage whose work in flight was cut short because the service is stopping
    (an evaluation of minutes: :data:`~services.common.stage.INTERRUPT`). Nothing of the batch
    is committed; it is processed again after the restart."""


class DependencyError(FlywheelError):
    """Raised by a stage when something it depends on is down (a model server, a sandbox pool):
    the failure is not about the records, so they must not be dead-lettered. The runtime stops
    the service with a non-zero exit; the uncommitted batch is processed again after restart.
    """
