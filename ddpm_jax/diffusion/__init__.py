"""The diffusion process, pure JAX: schedules, the Gaussian process and its samplers.

Nothing here knows about Flax or the network: a model is a function
``model_fn(x_t [B, H, W, C], t [B]) -> output``.
"""
