"""Sample-quality metrics: Frechet distance (FID) and Inception Score (IS).

Pure numpy/scipy; the feature extractors live elsewhere:

* ``ddpm_jax.models.inception`` -- the Inception-v3 FID graph (pool3 features
  ``[N, 2048]`` and logits ``[N, 1008]``) for natural-image data sets;
* ``ddpm_jax.evaluation.digits_classifier`` -- a small MLP (features
  ``[N, 128]``, probabilities ``[N, 10]``) for the 8x8 digits data set.

Typical use::

    mu_r, sigma_r = feature_statistics(real_features)   # [N, D] -> [D], [D, D]
    mu_g, sigma_g = feature_statistics(sample_features)
    fid = frechet_distance(mu_r, sigma_r, mu_g, sigma_g)
    is_mean, is_std = inception_score(sample_probs, num_splits=10)

The Frechet distance follows the reference implementation of Heusel et al.
(TTUR ``fid.py``): float64 throughout, ``scipy.linalg.sqrtm`` of the product of
the covariances, ``eps * I`` added to both covariances when that product is
numerically singular, and imaginary parts from round-off discarded (an error
when they are large).  The Inception Score follows Salimans et al. (2016): the
samples are cut into ``num_splits`` consecutive chunks and each chunk scores
``exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y)`` the chunk's mean prediction.
"""

from __future__ import annotations

import os
import warnings
from typing import Tuple

import numpy as np
import scipy.linalg
from scipy.special import rel_entr

__all__ = [
    "frechet_distance",
    "feature_statistics",
    "inception_score",
    "save_statistics",
    "load_statistics",
]

# sqrtm results whose relative residual ||X X - A||_F / ||A||_F exceeds this
# are treated like a failed (non-finite) square root: retry with eps * I.
_SQRTM_RESIDUAL_TOL = 1e-3
# TTUR's tolerance on the imaginary part of diag(sqrtm(S1 S2)).
_IMAG_ATOL = 1e-3


def _sqrtm(a: np.ndarray) -> np.ndarray:
  """scipy.linalg.sqrtm without its singular-matrix warnings (we check ourselves)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.asarray(scipy.linalg.sqrtm(a))


def _sqrtm_ok(root: np.ndarray, a: np.ndarray) -> bool:
  if not np.all(np.isfinite(root)):
    return False
  norm_a = np.linalg.norm(a)
  if norm_a == 0.0:
    return True
  residual = np.linalg.norm(root @ root - a) / norm_a
  return bool(residual <= _SQRTM_RESIDUAL_TOL)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
  """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  ``d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 @ sigma2))``,
  computed in float64.  This is FID when the statistics are those of
  Inception pool3 features (see :func:`feature_statistics`).

  Args:
    mu1: ``[D]`` mean of the first feature set (any real values).
    sigma1: ``[D, D]`` covariance of the first set (symmetric PSD).
    mu2: ``[D]`` mean of the second set.
    sigma2: ``[D, D]`` covariance of the second set (symmetric PSD).
    eps: if ``sqrtm(sigma1 @ sigma2)`` is not finite or inaccurate (a
      numerically singular product, e.g. fewer samples than dimensions),
      ``eps * I`` is added to both covariances and the square root retried.

  Returns:
    The squared Frechet distance, a Python float ``>= 0`` up to round-off
    (it is *not* square-rooted, following the FID convention).

  Raises:
    ValueError: on shape mismatches, or when the square root has an
      imaginary diagonal component larger than 1e-3 (TTUR's check), which
      means the inputs are not valid covariance matrices.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))

  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(
        f"mean vectors must be 1-D of the same length, got {mu1.shape} and {mu2.shape}"
    )
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
        f"covariances must be [{d}, {d}] to match the means, got "
        f"{sigma1.shape} and {sigma2.shape}"
    )

  diff = mu1 - mu2
  product = sigma1 @ sigma2
  covmean = _sqrtm(product)
  if not _sqrtm_ok(covmean, product):
    offset = np.eye(d, dtype=np.float64) * eps
    shifted = (sigma1 + offset) @ (sigma2 + offset)
    covmean = _sqrtm(shifted)
    if not np.all(np.isfinite(covmean)):
      raise ValueError(
          "sqrtm(sigma1 @ sigma2) is not finite even after adding "
          f"eps={eps} to the diagonals; are the covariances finite and PSD?"
      )

  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=_IMAG_ATOL):
      max_imag = float(np.max(np.abs(covmean.imag)))
      raise ValueError(
          f"sqrtm(sigma1 @ sigma2) has a large imaginary component ({max_imag:g}); "
          "the covariances are probably not symmetric positive semi-definite"
      )
    covmean = covmean.real

  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a feature set, in float64.

  Args:
    features: ``[N, D]`` features (any real values), one row per sample,
      ``N >= 2``.

  Returns:
    ``(mu, sigma)``: ``mu [D]`` the mean, ``sigma [D, D]`` the unbiased
    sample covariance (``np.cov(features, rowvar=False)``, divisor ``N - 1``),
    both float64.
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}")
  if features.shape[0] < 2:
    raise ValueError(f"need at least 2 samples for a covariance, got {features.shape[0]}")
  mu = features.mean(axis=0)
  sigma = np.atleast_2d(np.cov(features, rowvar=False))
  return mu, sigma


def inception_score(probs: np.ndarray, num_splits: int = 10) -> Tuple[float, float]:
  """Inception Score of a set of class-probability vectors.

  The ``N`` rows are cut into ``num_splits`` consecutive chunks (sizes differ
  by at most one when ``num_splits`` does not divide ``N``); each chunk scores
  ``exp(mean_i KL(p(y|x_i) || p_chunk(y)))`` with ``p_chunk(y)`` the chunk's
  mean row.  ``0 log 0`` is taken as 0.  The score lies in ``[1, K]``: 1 when
  all predictions are identical, ``K`` for confident one-hot predictions
  spread uniformly over the ``K`` classes.

  Args:
    probs: ``[N, K]`` class probabilities, rows non-negative and summing to 1
      (e.g. the softmax of Inception's 1008 logits, or the digits
      classifier's 10 probabilities).  Computed in float64.
    num_splits: number of chunks, ``1 <= num_splits <= N``.

  Returns:
    ``(mean, std)`` over the chunks' scores (``np.std``, ddof 0), as floats.
  """
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim != 2:
    raise ValueError(f"probs must be [N, K], got shape {probs.shape}")
  n = probs.shape[0]
  if not 1 <= num_splits <= n:
    raise ValueError(f"num_splits must be in [1, N={n}], got {num_splits}")
  if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
    raise ValueError("rows of probs must be non-negative and sum to 1")

  scores = []
  for part in np.array_split(probs, num_splits, axis=0):
    marginal = part.mean(axis=0, keepdims=True)
    kl = rel_entr(part, marginal).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  scores = np.asarray(scores)
  return float(scores.mean()), float(scores.std())


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Write feature statistics to an ``.npz`` file with keys ``mu`` and ``sigma``.

  Args:
    path: destination file; numpy appends ``.npz`` if it has no such suffix.
    mu: ``[D]`` feature mean.
    sigma: ``[D, D]`` feature covariance.
  """
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  _check_statistics(mu, sigma, str(path))
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike) -> Tuple[np.ndarray, np.ndarray]:
  """Read statistics written by :func:`save_statistics` (or TTUR/pytorch-fid ``.npz``).

  Args:
    path: an ``.npz`` file holding ``mu [D]`` and ``sigma [D, D]``.

  Returns:
    ``(mu [D], sigma [D, D])`` as float64 arrays.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file is not a readable ``.npz``, lacks ``mu``/``sigma``,
      or their shapes do not fit together.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no feature-statistics file at {path!r}; create one with "
        "python -m ddpm_jax.evaluation.fid --config=CONFIG --stats_only, or with "
        "ddpm_jax.evaluation.metrics.save_statistics(path, *feature_statistics(features))"
    )
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: np.asarray(data[k]) for k in data.files}
  except Exception as err:  # not a zip, pickled objects, truncated file, ...
    raise ValueError(f"could not read feature statistics from {path!r}: {err}") from err
  if not {"mu", "sigma"} <= set(arrays):
    raise ValueError(
        f"{path!r} is not a feature-statistics file: expected keys 'mu' and "
        f"'sigma', found {sorted(arrays)}"
    )
  try:
    mu = arrays["mu"].astype(np.float64)
    sigma = arrays["sigma"].astype(np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(f"malformed feature statistics in {path!r}: {err}") from err
  _check_statistics(mu, sigma, path)
  return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(
        f"malformed feature statistics in {where!r}: mu must be [D] and sigma [D, D], "
        f"got {mu.shape} and {sigma.shape}"
    )
