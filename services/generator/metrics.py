"""The generator's metrics: trajectories, tokens, engine time, and weight reloads."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRAJECTORIES = Counter("flywheel_generator_trajectories_total", "Trajectories produced.")
TOKENS = Counter("flywheel_generator_tokens_total", "Completion tokens sampled.")
GENERATION_SECONDS = Histogram(
    "flywheel_generator_generation_seconds", "Engine time per batch of episodes.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TRAJECTORY_TOKENS = Histogram(
    "flywheel_generator_trajectory_tokens", "Completion tokens of one trajectory (every "
    "assistant turn).", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                 16384, 32768),
)
ENGINE_BATCH = Histogram(
    "flywheel_generator_engine_batch_episodes", "Episodes per engine batch.",
    buckets=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
POLICY_VERSION = Gauge("flywheel_generator_policy_version", "Promoted version being served.")
RELOAD_SECONDS = Histogram(
    "flywheel_generator_reload_seconds", "Time to swap weights into the engine.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RELOAD_REFUSALS = Counter(
    "flywheel_generator_reload_refusals_total", "Checkpoints refused, by reason.", ["reason"]
)
RELOAD_SKIPPED = Counter(
    "flywheel_generator_versions_skipped_total", "Promoted versions never served: a newer one "
    "was promoted before the batch in flight ended, and only the newest is loaded.",
)
