"""Relay: copy validated messages of one type from input topics to an output topic.

The simplest stage there is, and the reference for the runtime: it is what the exactly-once
crash test and ``bench runtime`` run. Operators use it to move records between topics with the
runtime's guarantees, e.g. to re-inject repaired records from a quarantine topic.
"""
