"""Deterministic Temporal workflows: no I/O, no clock, no random."""
