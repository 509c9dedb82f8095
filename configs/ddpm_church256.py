"""The released DDPM LSUN Church 256x256 model (hub: google/ddpm-church-256, EMA: google/ddpm-ema-church-256).

Import the weights with ``python -m ddpm_jax.convert --src=DIR --workdir=WORKDIR
--config_name=ddpm_church256`` (docs/pretrained.md). Starts from configs/lsun_church256.py;
configs/ddpm_released256.py pins the network and the sampling variance.
"""

from configs import ddpm_released256, lsun_church256


def get_config():
  return ddpm_released256.pin(lsun_church256.get_config())
