"""The released DDPM LSUN Cat 256x256 model (hub: google/ddpm-cat-256, EMA: google/ddpm-ema-cat-256).

Import the weights with ``python -m ddpm_jax.convert --src=DIR --workdir=WORKDIR
--config_name=ddpm_cat256`` (docs/pretrained.md). Starts from configs/lsun_cat256.py;
configs/ddpm_released256.py pins the network and the sampling variance.
"""

from configs import ddpm_released256, lsun_cat256


def get_config():
  return ddpm_released256.pin(lsun_cat256.get_config())
