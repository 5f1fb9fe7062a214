"""Scorer: attaches rewards and verdicts to raw trajectories (raw -> scored)."""
