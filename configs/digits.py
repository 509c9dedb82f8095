"""The embedded default: scikit-learn's 8x8 handwritten digits, trained in minutes on a CPU.

No download: the 1,797 digits ship inside scikit-learn (1,500 train / 297 test).
The diffusion is the paper's (T = 1000, linear betas, eps prediction, L_simple);
the network and the schedule of optimisation are scaled down to fit a laptop.
"""

from configs import default


def use_digits_data(config):
  """Points ``config.data`` at the embedded digits; shared with configs/test.py."""
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.random_flip = False  # digits are not mirror-symmetric
  config.data.eval_split = "test"  # the last 297 digits
  return config


def get_config():
  config = use_digits_data(default.get_config())
  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)  # 8x8 -> 4x4 -> 2x2
  config.model.num_res_blocks = 1  # 1.1M parameters (the paper: 2 blocks, 35.7M)
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0  # short runs do not overfit; dropout costs ~40% time here
  config.optim.lr = 2e-3  # a short run needs a larger step than the paper's 2e-4
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995  # averages over ~200 steps instead of ~10k
  config.training.batch_size = 128
  # with the default sampler: about 5 minutes on 2 CPU cores, nearly all of it training
  config.training.num_train_steps = 2000
  config.training.log_every_steps = 100
  config.training.checkpoint_every_steps = 500
  config.training.sample_every_steps = 2000  # one grid, at the end
  config.training.num_grid_samples = 64
  # SDE-DPM-Solver++(2M), 50 calls uniform in log-SNR: Algorithm 2's FID and IS with all
  # 1000 steps (within 1.1x and 2%, means over sampling seeds) in a twentieth of its network
  # calls; docs/digits.md, "The digits default". Algorithm 2 as in the paper:
  # --config.sampling.sampler=ancestral --config.sampling.num_steps=0.
  config.sampling.sampler = "dpm_solver++_sde"
  config.sampling.num_steps = 50
  config.sampling.timestep_spacing = "logsnr"
  config.sampling.num_samples = 512  # FID/IS need n >= 512 to rise above estimation noise
  config.sampling.batch_size = 512
  config.eval.batch_size = 64
  config.eval.num_fid_samples = 512
  return config
