"""The trainer's metrics (``flywheel_trainer_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LOSS = Gauge("flywheel_trainer_loss", "Mean loss of the last round, by stage.", ["stage"])
SAMPLES = Counter("flywheel_trainer_samples_total", "Samples trained, by stage.", ["stage"])
TOKENS = Counter("flywheel_trainer_tokens_total", "Target tokens trained, by stage.", ["stage"])
ROUND_SECONDS = Histogram("flywheel_trainer_round_seconds", "Training time of a round.",
                          buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
CHECKPOINT_BYTES = Gauge("flywheel_trainer_checkpoint_bytes", "Size of the last checkpoint.")
CHECKPOINT_SECONDS = Histogram(
    "flywheel_trainer_checkpoint_seconds", "Checkpoint write plus announce (commit) time.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
STORE_BYTES = Gauge("flywheel_trainer_store_bytes", "Bytes the checkpoint store holds, after "
                    "retention.")
PRUNED = Counter("flywheel_trainer_pruned_total", "Version folders and optimizer states the "
                 "store's retention deleted.", ["what"])
CANDIDATE_VERSION = Gauge("flywheel_trainer_candidate_version", "Last committed candidate.")
ROLLBACKS = Counter("flywheel_trainer_rollbacks_total", "Rollbacks to the promoted version "
                    "after the gate rejected the trainer's lineage.")
DISCARDED = Counter("flywheel_trainer_discarded_versions_total", "Candidates left behind by a "
                    "rollback (their lineage is not built on).")
RANKS = Gauge("flywheel_trainer_ranks", "Processes that train each round (torchrun's world "
              "size; 1 in one process).")
