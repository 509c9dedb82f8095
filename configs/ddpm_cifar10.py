"""The released DDPM CIFAR-10 model (hub: google/ddpm-cifar10-32, EMA: google/ddpm-ema-cifar10-32).

Import the weights with ``python -m ddpm_jax.convert --src=DIR --workdir=WORKDIR
--config_name=ddpm_cifar10`` (docs/pretrained.md). The architecture and process are
the paper's CIFAR-10 setting (configs/cifar10.py), written out here so that a
change of the defaults cannot silently break the converted checkpoint.
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  # The network the weights belong to (35,746,307 parameters); same as cifar10.py.
  config.model.ch = 128  # block_out_channels[0]
  config.model.ch_mult = (1, 2, 2, 2)  # block_out_channels (128, 256, 256, 256) / 128
  config.model.num_res_blocks = 2  # layers_per_block
  config.model.attn_resolutions = (16,)  # AttnDownBlock2D at level 1 of 32x32
  config.model.resamp_with_conv = True  # downsample/upsample with convs
  config.model.num_classes = 0  # unconditional
  # The process it was trained for (the paper's scripts/run_cifar.py); same as default.py.
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "linear"
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.model_mean_type = "eps"
  config.diffusion.model_var_type = "fixedlarge"  # run_cifar.py: model_var_type='fixedlarge'
  config.sampling.clip_denoised = True  # the paper's sampler clips x0_hat to [-1, 1]
  return config
