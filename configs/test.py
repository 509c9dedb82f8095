"""A tiny setting for the test suite: digits, a two-level U-Net, 8 examples a step."""

from configs import default
from configs import digits


def get_config():
  config = digits.use_digits_data(default.get_config())  # only the data part of digits.py
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.1
  config.diffusion.num_timesteps = 100
  config.diffusion.beta_end = 0.2  # keeps alpha_bar_T ~ 0 with only 100 steps
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 2
  config.optim.ema_decay = 0.9
  config.training.batch_size = 8
  config.training.num_train_steps = 4
  config.training.log_every_steps = 2
  config.training.checkpoint_every_steps = 2
  config.training.keep_checkpoints = 2
  config.training.sample_every_steps = 0
  config.training.num_grid_samples = 4
  config.sampling.num_samples = 8
  config.sampling.batch_size = 8
  config.eval.batch_size = 16
  config.eval.num_examples = 32
  config.eval.num_fid_samples = 64
  return config
