"""The stage-agnostic trainer: state and optimizer, the loop, checkpoints, metrics."""
