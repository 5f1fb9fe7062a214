"""Trainer: CPT, SFT and RL on the accepted streams, checkpoints with exact data lineage."""
