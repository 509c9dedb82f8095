"""Feature extractors for FID and IS: Inception-v3 for natural images, an MLP for the 8x8 digits.

An extractor maps uint8 images [N, H, W, C] in [0, 255] to (features [N, F],
class probabilities [N, K]), both float64: the FID statistics are taken over
the features, the Inception Score over the probabilities.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from ddpm_jax import parallel
from ddpm_jax.evaluation import digits_classifier
from ddpm_jax.models import inception


class FeatureExtractor:
  """name, and __call__(images uint8 [N, H, W, C]) -> (features [N, F], probs [N, K]) float64."""

  name: str

  def __call__(self, images: np.ndarray):
    raise NotImplementedError


class DigitsExtractor(FeatureExtractor):
  """The digits MLP's hidden activations (features) and class probabilities (for IS)."""

  name = "digits_mlp128"

  def __call__(self, images):
    images = _to_8x8(np.asarray(images))
    return digits_classifier.features(images), digits_classifier.probs(images)


def _to_8x8(images: np.ndarray) -> np.ndarray:
  """Grayscale images [N, S, S, 1] at another size -> [N, 8, 8, 1] (block mean or bilinear)."""
  n, h, w, c = images.shape
  if c != 1:
    images = np.round(images.astype(np.float64).mean(axis=-1, keepdims=True)).astype(np.uint8)
  if (h, w) == (8, 8):
    return images
  if h % 8 == 0 and w % 8 == 0:
    x = images.astype(np.float64).reshape(n, 8, h // 8, 8, w // 8, 1).mean(axis=(2, 4))
    return x
  from PIL import Image  # pylint: disable=g-import-not-at-top

  return np.stack(
      [np.asarray(Image.fromarray(im[..., 0]).resize((8, 8), Image.BILINEAR)) for im in images]
  )[..., None]


class InceptionExtractor(FeatureExtractor):
  """Inception-v3 pool3 features and softmax probabilities, pmap-ed over local devices."""

  name = "inception"

  def __init__(self, weights_path: Optional[str] = None, batch_size: int = 256):
    self.variables = inception.load_inception_params(weights_path or None)
    self.model = inception.InceptionV3()
    d = jax.local_device_count()
    self.per_device = max(1, -(-batch_size // d))
    self.batch = self.per_device * d

    def apply(variables, x):
      pool3, logits = self.model.apply(variables, x)
      return pool3, jax.nn.softmax(logits, axis=-1)

    self._p_apply = parallel.pmap(apply)
    self._p_vars = None

  def __call__(self, images):
    images = np.asarray(images)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    if self._p_vars is None:
      self._p_vars = parallel.replicate(self.variables)
    d = jax.local_device_count()
    n = images.shape[0]

    def chunks():
      for lo in range(0, n, self.batch):
        x = images[lo : lo + self.batch].astype(np.float32)
        if x.shape[0] < self.batch:
          x = np.concatenate([x, np.zeros((self.batch - x.shape[0],) + x.shape[1:], x.dtype)])
        yield x.reshape((d, self.per_device) + x.shape[1:])

    feats, probs = [], []
    for x in parallel.prefetch_to_device(chunks(), 2):
      f, p = jax.device_get(self._p_apply(self._p_vars, x))
      feats.append(np.asarray(f, np.float64).reshape(-1, f.shape[-1]))
      probs.append(np.asarray(p, np.float64).reshape(-1, p.shape[-1]))
    return np.concatenate(feats)[:n], np.concatenate(probs)[:n]


def get_feature_extractor(config) -> FeatureExtractor:
  """The digits MLP for data.dataset='digits', else Inception-v3 (weights must exist)."""
  if config.data.dataset == "digits":
    return DigitsExtractor()
  return InceptionExtractor(config.eval.inception_weights or None, int(config.eval.batch_size))


def extractor_name(config) -> str:
  return DigitsExtractor.name if config.data.dataset == "digits" else InceptionExtractor.name
