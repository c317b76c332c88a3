"""Differential conformance tests: Lightning with and without trainctl's plugins."""
