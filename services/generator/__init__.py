"""Generator: turns tasks into trajectories with the current policy; hot-reloads promoted
checkpoints in place."""
