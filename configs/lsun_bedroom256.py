"""LSUN Bedroom 256x256 (Ho et al. 2020, App. B)."""

from configs import paper256


def get_config():
  # eval split: LSUN's held-out split; steps: paper: 2.4M steps (the released checkpoint)
  return paper256.get_config("lsun/bedroom", eval_split="validation", num_train_steps=2_400_000)
