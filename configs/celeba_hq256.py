"""CelebA-HQ 256x256 (Ho et al. 2020, App. B)."""

from configs import paper256


def get_config():
  # eval split: celeb_a_hq has only a train split; steps: paper: 0.5M steps
  return paper256.get_config("celeb_a_hq/256", eval_split="train", num_train_steps=500_000)
