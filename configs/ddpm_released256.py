"""What the released 256x256 DDPM models fix: their network and process.

The architecture is written out (not inherited) so that a change of the
defaults cannot silently break a converted checkpoint. Used by ddpm_*256.py.

Sampling variance: the paper's 256x256 runs (scripts/run_lsun.py,
run_celebahq.py) sample with ``diffusion_tf/diffusion_utils.py``, whose p_sample
uses the posterior variance beta~_t, i.e. 'fixedsmall' (only CIFAR-10 used
diffusion_utils_2 with 'fixedlarge'); the diffusers scheduler default
(variance_type='fixed_small') agrees. ``--config.diffusion.model_var_type=fixedlarge``
switches to sigma^2 = beta.
"""


def pin(config):
  """Sets the released models' architecture and process on ``config``; returns it."""
  # The network the weights belong to (113,673,219 parameters).
  config.model.ch = 128  # block_out_channels[0]
  config.model.ch_mult = (
      1,
      1,
      2,
      2,
      4,
      4,
  )  # block_out_channels (128, 128, 256, 256, 512, 512) / 128
  config.model.num_res_blocks = 2  # layers_per_block
  config.model.attn_resolutions = (16,)  # AttnDownBlock2D at level 4 of 256x256
  config.model.resamp_with_conv = True  # downsample/upsample with convs
  config.model.num_classes = 0  # unconditional
  config.model.dropout = 0.0  # the paper's 256x256 runs: no dropout (irrelevant for sampling)
  # The process it was trained for (scripts/run_lsun.py); same values as default.py.
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "linear"
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.model_mean_type = "eps"
  # the paper's 256x256 sampler: posterior variance (see above)
  config.diffusion.model_var_type = "fixedsmall"
  config.sampling.clip_denoised = True  # the paper's sampler clips x0_hat to [-1, 1]
  return config
