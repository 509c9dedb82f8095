"""The paper's 256x256 setting (Ho et al. 2020, App. B), shared by CelebA-HQ and LSUN.

Not an experiment itself: celeba_hq256.py and lsun_*256.py call ``get_config``
with what differs between data sets.
"""

from configs import default


def get_config(dataset: str, eval_split: str, num_train_steps: int, random_flip: bool = True):
  """The 256x256 config for a TFDS ``dataset``."""
  config = default.get_config()
  config.data.dataset = dataset
  config.data.image_size = 256
  config.data.channels = 3
  config.data.random_flip = random_flip  # the paper's code flips (randflip=True) except LSUN cat
  config.data.in_memory = False  # too large for host memory: tf.data streaming
  config.data.eval_split = eval_split
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)  # 256 -> 8 over six levels (113,673,219 parameters)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0  # paper: no dropout at 256x256
  config.diffusion.model_var_type = "fixedsmall"  # the paper's 256x256 code samples with beta~_t
  config.optim.lr = 2e-5  # paper: 2e-5 at 256x256
  config.training.batch_size = 64  # paper: 64 at 256x256
  config.training.num_train_steps = num_train_steps
  config.sampling.batch_size = 64
  config.eval.batch_size = 64
  return config
