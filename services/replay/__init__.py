"""Replay: a chain of stages (scorer, filter, router) re-run over history under new policies,
into topics of its own (``run``: the manifest of bounds and policy digests, and the run that
resumes from it), in worker processes (``workers``), reported against the live decisions
(``report``) and, on request, published into the live ``accepted.*`` (``publish``)."""
