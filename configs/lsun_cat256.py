"""LSUN Cat 256x256 (Ho et al. 2020, App. B)."""

from configs import paper256


def get_config():
  # eval split: LSUN's held-out split; steps: paper: 1.8M steps
  return paper256.get_config(
      "lsun/cat", eval_split="validation", num_train_steps=1_800_000, random_flip=False
  )  # run_lsun.py --randflip 0 for cat
