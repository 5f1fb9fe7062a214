"""Gate: evaluates candidate checkpoints on held-out tasks; only its promotions reach generators."""
