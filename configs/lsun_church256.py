"""LSUN Church 256x256 (Ho et al. 2020, App. B)."""

from configs import paper256


def get_config():
  # eval split: LSUN's held-out split; steps: paper: 1.2M steps
  return paper256.get_config(
      "lsun/church_outdoor", eval_split="validation", num_train_steps=1_200_000
  )
