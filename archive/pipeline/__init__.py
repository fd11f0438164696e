"""Orchestration: the only place that joins process and catalog."""
