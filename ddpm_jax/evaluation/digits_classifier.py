"""A small digits classifier: the FID/IS feature extractor for the 8x8 digits data.

Inception features mean nothing on 8x8 grey-scale digits, so FID and IS for
the digits are computed with a two-hidden-layer MLP instead:

* data: ``sklearn.datasets.load_digits()`` (1797 images, 8x8, integer
  intensities 0..16, labels 0..9), shipped with scikit-learn, no download; the
  first 1500 are the training split, the other 297 are held out (``data/sources.py``);
* image format everywhere in this module: ``uint8 [N, 8, 8, 1]`` in
  ``[0, 255]``; float arrays in ``[0, 255]`` are accepted too (generated
  samples need not be quantised);
* model: ``sklearn.neural_network.MLPClassifier(hidden_layer_sizes=(256, 128),
  alpha=0.1, random_state=0, max_iter=1000)`` on the 64 pixels scaled to
  ``[-1, 1]``, fitted on all 1797 digits (a fixed feature network, as
  Inception-v3 is for natural images); fitted once per process (about 10 s)
  and cached in memory (:func:`get_classifier`), on one BLAS thread (the same
  weights as with more threads, and no oversubscription when XLA keeps the
  cores busy).

API: :func:`features` gives the last hidden layer's ReLU activations ``[N, 128]``
(the FID features), :func:`probs` the class probabilities ``[N, 10]`` (for IS),
and :func:`heldout_accuracy` the held-out accuracy of the same recipe fitted on
the training split alone.

Why fitted on all digits, with weight decay: fitted on the training split
alone, the features separate the two halves of the real data (real training
digits against the held-out ones: FID several times that of this extractor,
IS 9% apart), so they could not judge a model of the training data against
held-out digits (docs/digits.md, "Digits metrics").
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

from ddpm_jax.data import sources

__all__ = [
    "NUM_TRAIN",
    "NUM_CLASSES",
    "FEATURE_DIM",
    "load_digits_images",
    "get_classifier",
    "features",
    "probs",
    "predict",
    "heldout_accuracy",
]

NUM_TRAIN = sources.DIGITS_NUM_TRAIN
NUM_CLASSES = 10
FEATURE_DIM = 128
HIDDEN_LAYERS = (256, FEATURE_DIM)  # the last one gives the FID features
ALPHA = 0.1  # L2 weight decay


def load_digits_images(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
  """The digits data set as ``(images uint8 [N, 8, 8, 1], labels int32 [N] in 0..9)``.

  Args:
    split: ``"train"`` (first 1500), ``"heldout"`` or ``"test"`` (last 297) or ``"all"``.
  """
  data = sources.load_digits("test" if split == "heldout" else split)
  return data.images, data.labels


def _to_inputs(images: np.ndarray) -> np.ndarray:
  """``[N, 8, 8, 1]`` / ``[N, 8, 8]`` / ``[N, 64]`` in [0, 255] -> float64 ``[N, 64]`` in [-1, 1]."""
  x = np.asarray(images)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim == 3 and x.shape[1:] == (8, 8):
    x = x.reshape(x.shape[0], 64)
  if x.ndim != 2 or x.shape[1] != 64:
    raise ValueError(
        f"digits images must be [N, 8, 8, 1] in [0, 255], got shape {np.shape(images)}"
    )
  return x.astype(np.float64) / 127.5 - 1.0


@functools.lru_cache(maxsize=None)
def get_classifier(split: str = "all"):
  """The ``MLPClassifier`` fitted on ``split`` ('all': the extractor), fitted once and cached."""
  import warnings

  from sklearn.exceptions import ConvergenceWarning
  from sklearn.neural_network import MLPClassifier
  from threadpoolctl import threadpool_limits

  images, labels = load_digits_images(split)
  clf = MLPClassifier(hidden_layer_sizes=HIDDEN_LAYERS, alpha=ALPHA, random_state=0, max_iter=1000)
  with warnings.catch_warnings(), threadpool_limits(1):
    warnings.simplefilter("ignore", ConvergenceWarning)
    clf.fit(_to_inputs(images), labels)
  return clf


def features(images: np.ndarray) -> np.ndarray:
  """The last hidden layer's ReLU activations, the digits "pool3" for FID.

  Args:
    images: ``[N, 8, 8, 1]`` uint8 or float in ``[0, 255]``.

  Returns:
    float64 ``[N, 128]``, values ``>= 0``.
  """
  clf = get_classifier()
  hidden = _to_inputs(images)
  for weights, bias in zip(clf.coefs_[:-1], clf.intercepts_[:-1]):
    hidden = np.maximum(hidden @ weights + bias, 0.0)
  return hidden


def probs(images: np.ndarray) -> np.ndarray:
  """Class probabilities ``p(y | x)`` for the Inception Score.

  Args:
    images: ``[N, 8, 8, 1]`` uint8 or float in ``[0, 255]``.

  Returns:
    float64 ``[N, 10]``, rows non-negative and summing to 1 (column ``k`` is digit ``k``).
  """
  return get_classifier().predict_proba(_to_inputs(images))


def predict(images: np.ndarray) -> np.ndarray:
  """Predicted digit, int64 ``[N]`` in ``0..9``, for ``[N, 8, 8, 1]`` images in ``[0, 255]``."""
  return np.argmax(probs(images), axis=1).astype(np.int64)


def heldout_accuracy() -> float:
  """Accuracy on the 297 held-out images of the same recipe fitted on the training split alone."""
  images, labels = load_digits_images("heldout")
  return float(np.mean(get_classifier("train").predict(_to_inputs(images)) == labels))
