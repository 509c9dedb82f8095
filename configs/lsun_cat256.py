"""LSUN Cat 256x256 (Ho et al. 2020, App. B: the 256x256 models)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "lsun/cat"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.random_flip = False  # the paper trained LSUN cat without flips (run_lsun.py --randflip 0)
  config.data.in_memory = False  # too large for host memory: tf.data streaming
  config.data.eval_split = "validation"
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)  # 256 -> 8 over six levels
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0  # paper: no dropout at 256x256
  config.optim.lr = 2e-5  # paper: 2e-5 at 256x256
  config.training.batch_size = 64  # paper: 64 at 256x256
  config.training.num_train_steps = 1_800_000  # paper: 1.8M steps
  config.sampling.batch_size = 64
  config.eval.batch_size = 64
  return config
