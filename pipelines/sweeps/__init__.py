"""Katib sweeps: the Experiment's settings, its generated trial spec, and the local search that mirrors Katib."""
