"""The released DDPM CelebA-HQ 256x256 model (hub: google/ddpm-celebahq-256, EMA: google/ddpm-ema-celebahq-256).

Import the weights with ``python -m ddpm_jax.convert --src=DIR --workdir=WORKDIR
--config_name=ddpm_celebahq256`` (docs/pretrained.md). Starts from configs/celeba_hq256.py;
configs/ddpm_released256.py pins the network and the sampling variance.
"""

from configs import ddpm_released256, celeba_hq256


def get_config():
  return ddpm_released256.pin(celeba_hq256.get_config())
