"""Differential conformance tests: each scenario runs with and without our plugins, and what
Lightning and the user can observe must be the same."""
