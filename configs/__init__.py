"""The run configs, one file per stage (and the demo's), each with `get_config(arg)`."""
