"""Training (--mode=train): a fresh state, the pmap-ed step of Algorithm 1, timestep sampling, the loop."""
