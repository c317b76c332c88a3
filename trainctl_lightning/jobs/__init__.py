"""Jobs: what a launch puts in the run store for the agent (spec, code bundle, logs, state)."""
