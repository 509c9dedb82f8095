"""Import of the released DDPM weights (diffusers format): ``python -m ddpm_jax.convert``."""
