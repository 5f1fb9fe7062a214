"""Filter: quality control of scored trajectories (scored -> filtered | rejected)."""
