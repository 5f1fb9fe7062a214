"""``flywheel run feeder``: keeps ``target_backlog`` tasks waiting for the generators.

Every ``interval_seconds`` it measures the backlog (tasks published but not yet committed by
the generators' consumer group) and publishes new tasks to bring it back to the target.
Generators never starve, and tasks never pile up. Tasks come from the user's task sets
(``tasksets``: cycled in shuffled epochs, drawn by the per-task curriculum,
``services.feeder.task_curriculum``) or else from a generated environment (``env``: a fixed
difficulty, the environment's mix, or the difficulty-level curriculum,
``services.feeder.level_curriculum``). Either way the gate's held-out tasks (``held_out``) never
reach ``tasks``.
"""

from __future__ import annotations

import json
import logging

from services.common.errors import FlywheelError
from services.common.logs import setup_logging
from services.common.service import serve_loop
from services.feeder.loop import Feeder
from services.feeder.settings import FeederSettings

log = logging.getLogger(__name__)


def run(settings: FeederSettings) -> int:
    setup_logging(settings.log_level)
    log.info("config: %s", json.dumps(settings.redacted(), sort_keys=True))
    try:
        feeder = Feeder(settings)
    except FlywheelError as exc:
        log.error("feeder cannot start: %s", exc)
        return 1
    return serve_loop(settings, feeder)
