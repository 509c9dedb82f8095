"""CIFAR-10 32x32, the paper's exact setting (Ho et al. 2020, Sec. 4 and App. B)."""

from configs import default


def get_config():
  config = default.get_config()  # the defaults are the paper's CIFAR-10 values
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  config.data.eval_split = "test"
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.dropout = 0.1
  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  return config
