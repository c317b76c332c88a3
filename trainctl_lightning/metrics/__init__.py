"""Metrics and live status of a run, in the same store as its checkpoints.

``MetricsReporter`` (a Lightning logger) writes them; :mod:`.read` reads them back.
"""
