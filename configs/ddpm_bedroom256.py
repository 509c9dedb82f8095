"""The released DDPM LSUN Bedroom 256x256 model (hub: google/ddpm-bedroom-256, EMA: google/ddpm-ema-bedroom-256).

Import the weights with ``python -m ddpm_jax.convert --src=DIR --workdir=WORKDIR
--config_name=ddpm_bedroom256`` (docs/pretrained.md). Starts from configs/lsun_bedroom256.py;
configs/ddpm_released256.py pins the network and the sampling variance.
"""

from configs import ddpm_released256, lsun_bedroom256


def get_config():
  return ddpm_released256.pin(lsun_bedroom256.get_config())
