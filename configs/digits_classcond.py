"""The digits default, class-conditional: labels 0..9, classifier-free guidance (Ho & Salimans 2022).

  python main.py --config=configs/digits_classcond.py --workdir=workdir/digits_classcond
  python main.py --config=configs/digits_classcond.py --workdir=workdir/digits_classcond \
      --mode=sample --config.sampling.guidance_scale=1

The network, schedule and optimisation are the digits default's; 10% of the
labels are dropped in training (the "no class" embedding that guidance needs).
Samples come in class order (one row per class in the grid).
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.num_classes = 10
  config.training.p_uncond = 0.1
  return config
