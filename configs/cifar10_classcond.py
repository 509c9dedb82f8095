"""CIFAR-10 32x32, class-conditional with classifier-free guidance: the paper's model and training.

TFDS cifar10's 'label' (10 classes) conditions the U-Net through its class
embedding; 10% of the labels are dropped in training (Ho & Salimans 2022's
p_uncond), so samples can be guided (``sampling.guidance_scale``).
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.num_classes = 10
  config.training.p_uncond = 0.1
  return config
