"""Training: the state and its builders, the pmap-ed step, checkpoints and the loop."""
