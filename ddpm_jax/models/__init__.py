"""Neural networks for ddpm_jax."""

from ddpm_jax.models.unet import UNet, count_params, get_timestep_embedding

__all__ = ["UNet", "count_params", "get_timestep_embedding"]
