"""The KFP v2 pipeline: its definition, the local demo run, the run report, and the compiled YAML."""
