"""Inception-v3 "FID graph" in Flax linen: pool3 features for FID, logits for IS.

This is the network of TensorFlow's ``inception-2015-12-05`` release
(``classify_image_graph_def.pb``), which TTUR's ``fid.py``, TF-GAN and the
improved-GAN Inception Score code all evaluate, and which pytorch-fid re-creates
as ``FIDInceptionV3`` (torchvision's ``Inception3`` with ``num_classes=1008``,
``aux_logits=False`` and the blocks patched as ``FIDInceptionA/C/E_1/E_2``).
It differs from the torchvision / Keras ImageNet Inception-v3 in ways that
change the features, so all of them are reproduced here:

* the average-pool branch of the A, C and first E blocks (Mixed_5b-d,
  Mixed_6b-e, Mixed_7b) excludes the zero padding from the average
  (``count_include_pad=False``, TF's ``AvgPool`` with SAME padding);
* the pool branch of the last E block (Mixed_7c) is a 3x3/1 *max* pool;
* the classifier has 1008 outputs, not 1000 (see "Logits" below);
* every conv is bias-free and followed by BatchNorm with ``epsilon = 1e-3``
  and a ReLU (pytorch-fid's ``BasicConv2d``).

Inputs and preprocessing
------------------------
``InceptionV3()(images)`` takes ``images [B, H, W, 3]``, RGB, uint8 or float
with values in ``[0, 255]``.  Unless ``resize_input=False`` they are resized
bilinearly to ``[B, 299, 299, 3]`` and mapped to about ``[-1, 1]``, in one of
two ways (``preprocess``):

* ``"tf"`` (default; TTUR and TF-GAN, the TensorFlow evaluation code behind
  published FID/IS numbers such as the DDPM paper's):
  TF1 ``resize_bilinear`` (``align_corners=False, half_pixel_centers=False``:
  output pixel ``i`` samples input position ``i * in/out``) and then
  ``(x - 128) / 128``, i.e. the graph's own ``ResizeBilinear``/``Sub``/``Mul``;
* ``"pytorch_fid"``: ``F.interpolate(mode="bilinear", align_corners=False)``
  (half-pixel centres: position ``(i + 0.5) * in/out - 0.5``, clamped at 0)
  of ``x / 255``, then ``2 x - 1``; this reproduces pytorch-fid.

Both resizes are plain two-tap bilinear interpolation (no anti-aliasing),
exactly like the reference implementations, also when shrinking.  The two
modes give slightly different FIDs; compare numbers only within one mode.
With ``resize_input=False`` the input is only rescaled and must be at least
75x75 (the smallest size the stride-2 stages accept).

Outputs
-------
``(pool3, logits)``: ``pool3 [B, 2048]`` float32 -- the global average of the
last ``Mixed_7c`` feature map (the graph's ``pool_3:0``, the FID features);
``logits [B, 1008]`` float32 -- ``pool3 @ fc.kernel + fc.bias`` (the graph's
``softmax/logits``).  ``jax.nn.softmax(logits)`` are the class probabilities
used for the Inception Score.

Logits: 1008 vs 1000 classes.  The 2015 graph was trained with 1008 output
units, not ImageNet's 1000: the label map shipped with it
(``imagenet_2012_challenge_label_map_proto.pbtxt``) assigns ImageNet synsets
to indices 1..1000 only; index 0 is a background/"other" unit and 1001..1007
are unused padding (their probabilities are ~0 with the real weights).  So
index ``k`` here is *not* torchvision's class ``k``.  The IS reference code
(improved-GAN / TTUR / TF-GAN) takes the softmax over all 1008 units and so
should callers of this module: drop nothing.  (The original improved-GAN
script multiplies pool3 by the ``softmax/logits`` weight matrix without adding
the bias; use ``pool3 @ params["fc"]["kernel"]`` to reproduce that variant.)

Variables layout
----------------
``variables = {"params": ..., "batch_stats": ...}`` with, for every conv
layer ``<L>`` (e.g. ``Conv2d_1a_3x3`` or ``Mixed_6b/branch7x7_2``)::

    params[<L>]["conv"]["kernel"]  [kh, kw, c_in, c_out]   (torch weight.transpose(2, 3, 1, 0))
    params[<L>]["bn"]["scale"]     [c_out]                 (torch bn.weight; gamma)
    params[<L>]["bn"]["bias"]      [c_out]                 (torch bn.bias; beta)
    batch_stats[<L>]["bn"]["mean"] [c_out]                 (torch bn.running_mean)
    batch_stats[<L>]["bn"]["var"]  [c_out]                 (torch bn.running_var)
    params["fc"]["kernel"]         [2048, 1008]            (torch fc.weight.T)
    params["fc"]["bias"]           [1008]                  (torch fc.bias)

Layer names are pytorch-fid's / torchvision's (which follow the TF graph):
``Conv2d_1a_3x3, Conv2d_2a_3x3, Conv2d_2b_3x3, Conv2d_3b_1x1, Conv2d_4a_3x3,
Mixed_5b, Mixed_5c, Mixed_5d, Mixed_6a .. Mixed_6e, Mixed_7a, Mixed_7b,
Mixed_7c, fc``, and inside the Mixed blocks ``branch1x1, branch5x5_1, ...``.
BatchNorm always runs in inference mode: ``y = (x - mean) / sqrt(var + 1e-3)
* scale + bias``.

Parameter count: 23,850,960 trainable numbers (conv kernels + BN scale/bias +
fc), which is torchvision's ``inception_v3`` (27,161,264 with the auxiliary
classifier and 1000 classes) minus the auxiliary classifier (3,326,696) plus
the 8 extra classes (8 * 2048 + 8 = 16,392); plus 2 * 17,216 = 34,432
BatchNorm running statistics (94 conv layers with 17,216 output channels in
all), 23,885,392 numbers in 472 tensors, as in pytorch-fid's state dict.  ``tests/test_metrics.py`` checks these numbers.

Weights
-------
No weights ship with this repository.  :func:`load_inception_params` reads a
converted ``.npz`` whose keys are the ``/``-joined paths of the tree above,
e.g. ``params/Mixed_5b/branch1x1/conv/kernel`` or
``batch_stats/Conv2d_1a_3x3/bn/mean``.  To make one, download pytorch-fid's
port of the TF weights, ``pt_inception-2015-12-05-6726825d.pth``, and run, in
an environment that has torch::

    python -m ddpm_jax.models.inception --convert pt_inception-2015-12-05-6726825d.pth \
        inception_fid.npz

(see :data:`PYTORCH_FID_WEIGHTS_URL`; :func:`convert_pytorch_fid_state_dict`
does the conversion from a dict of numpy arrays).  The default location that
:func:`load_inception_params` looks at is ``$DDPM_JAX_INCEPTION_WEIGHTS`` or
``~/.cache/ddpm_jax/inception_fid_2015-12-05.npz``.

Checked against pytorch-fid: with random weights converted from a
torchvision ``Inception3(num_classes=1008, aux_logits=False)`` patched with
pytorch-fid's FID blocks, ``InceptionV3(preprocess="pytorch_fid")`` gives the
same pool3 features and logits as pytorch-fid's forward pass (max relative
error 2e-5 for 8x8, 32x32, 299x299 and 350x420 inputs, float32 on CPU).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util

from ddpm_jax import errors

__all__ = [
    "InceptionV3",
    "INCEPTION_SIZE",
    "NUM_LOGITS",
    "POOL3_DIM",
    "LAYER_NAMES",
    "PYTORCH_FID_WEIGHTS_URL",
    "TF_INCEPTION_URL",
    "DEFAULT_WEIGHTS_PATH",
    "InceptionWeightsNotFoundError",
    "inception_variable_shapes",
    "load_inception_params",
    "save_inception_params",
    "convert_pytorch_fid_state_dict",
    "bilinear_resize",
]

INCEPTION_SIZE = 299
NUM_LOGITS = 1008
POOL3_DIM = 2048
BN_EPSILON = 1e-3
MIN_INPUT_SIZE = 75

LAYER_NAMES = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "fc",
)

PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
TF_INCEPTION_URL = "http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz"
WEIGHTS_ENV_VAR = "DDPM_JAX_INCEPTION_WEIGHTS"
DEFAULT_WEIGHTS_PATH = os.path.join(
    os.path.expanduser("~"), ".cache", "ddpm_jax", "inception_fid_2015-12-05.npz"
)

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------- #
def _interp_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
  """``[out_size, in_size]`` two-tap bilinear interpolation weights (float32).

  ``half_pixel=False``: TF1 ``resize_bilinear(align_corners=False)``,
  source position ``i * in/out``.  ``half_pixel=True``: torch
  ``interpolate(align_corners=False)``, source ``(i + 0.5) * in/out - 0.5``
  clamped below at 0.  Both clamp the upper neighbour to ``in_size - 1``.
  """
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  if half_pixel:
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  else:
    src = dst * scale
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size), dtype=np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights.astype(np.float32)


def bilinear_resize(images: jnp.ndarray, size: Tuple[int, int], half_pixel: bool) -> jnp.ndarray:
  """Resize ``[B, H, W, C]`` float images to ``[B, size[0], size[1], C]``.

  Separable two-tap bilinear interpolation without anti-aliasing, values kept
  in their input range.  ``half_pixel=False`` reproduces TF1
  ``tf.compat.v1.image.resize_bilinear(align_corners=False)`` (TTUR/TF-GAN);
  ``half_pixel=True`` reproduces ``torch.nn.functional.interpolate(
  mode="bilinear", align_corners=False)`` (pytorch-fid).
  """
  _, h, w, _ = images.shape
  out_h, out_w = size
  if (h, w) == (out_h, out_w):
    return images
  wy = jnp.asarray(_interp_matrix(h, out_h, half_pixel))
  wx = jnp.asarray(_interp_matrix(w, out_w, half_pixel))
  images = jnp.einsum("oh,bhwc->bowc", wy, images, precision=_HIGHEST)
  return jnp.einsum("pw,bowc->bopc", wx, images, precision=_HIGHEST)


def _preprocess(images: jnp.ndarray, mode: str, resize: bool) -> jnp.ndarray:
  """``[B, H, W, 3]`` in [0, 255] -> ``[B, 299, 299, 3]`` (or unresized) in ~[-1, 1]."""
  x = images.astype(jnp.float32)
  if mode == "tf":
    if resize:
      x = bilinear_resize(x, (INCEPTION_SIZE, INCEPTION_SIZE), half_pixel=False)
    return (x - 128.0) / 128.0
  if mode == "pytorch_fid":
    x = x / 255.0
    if resize:
      x = bilinear_resize(x, (INCEPTION_SIZE, INCEPTION_SIZE), half_pixel=True)
    return 2.0 * x - 1.0
  raise ValueError(f"preprocess must be 'tf' or 'pytorch_fid', got {mode!r}")


# --------------------------------------------------------------------------- #
# Network
# --------------------------------------------------------------------------- #
def _pad(p: Union[int, Tuple[int, int]]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  ph, pw = (p, p) if isinstance(p, int) else p
  return ((ph, ph), (pw, pw))


def _avg_pool_3x3_same(x: jnp.ndarray) -> jnp.ndarray:
  """3x3/1 average pool, padding 1, padded zeros *not* counted (TF AvgPool SAME)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jnp.ndarray) -> jnp.ndarray:
  """3x3/1 max pool, padding 1 with -inf (TF MaxPool SAME)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """3x3/2 max pool without padding."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv2d(nn.Module):
  """Bias-free conv -> inference BatchNorm (eps 1e-3) -> ReLU; NHWC in and out."""

  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Union[int, Tuple[int, int]] = 0
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nn.Conv(
        self.features,
        self.kernel_size,
        strides=self.strides,
        padding=_pad(self.padding),
        use_bias=False,
        precision=self.precision,
        name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b/c/d); output channels 224 + pool_features."""

  pool_features: int
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
    b1 = conv(64, (1, 1), 0, "branch1x1")(x)
    b5 = conv(48, (1, 1), 0, "branch5x5_1")(x)
    b5 = conv(64, (5, 5), 2, "branch5x5_2")(b5)
    b3 = conv(64, (1, 1), 0, "branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), 1, "branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), 1, "branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), 0, "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a); output channels 480 + C_in = 768."""

  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), (2, 2), precision=self.precision, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), precision=self.precision, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=1, precision=self.precision, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), (2, 2), precision=self.precision, name="branch3x3dbl_3")(bd)
    bp = _max_pool_3x3_s2(x)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convs (Mixed_6b-e); 768 channels out."""

  channels_7x7: int
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
    b1 = conv(192, (1, 1), 0, "branch1x1")(x)
    b7 = conv(c7, (1, 1), 0, "branch7x7_1")(x)
    b7 = conv(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
    b7 = conv(192, (7, 1), (3, 0), "branch7x7_3")(b7)
    bd = conv(c7, (1, 1), 0, "branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), 0, "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a); output channels 512 + C_in = 1280."""

  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, p, name: BasicConv2d(
        f, k, strides=s, padding=p, precision=self.precision, name=name
    )
    b3 = conv(192, (1, 1), (1, 1), 0, "branch3x3_1")(x)
    b3 = conv(320, (3, 3), (2, 2), 0, "branch3x3_2")(b3)
    b7 = conv(192, (1, 1), (1, 1), 0, "branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), (1, 1), (0, 3), "branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), (1, 1), (3, 0), "branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), (2, 2), 0, "branch7x7x3_4")(b7)
    bp = _max_pool_3x3_s2(x)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with expanded filter bank (Mixed_7b/c); 2048 channels out.

  ``pool="avg"`` (Mixed_7b, FIDInceptionE_1) or ``pool="max"`` (Mixed_7c,
  FIDInceptionE_2: the FID graph max-pools here).
  """

  pool: str = "avg"
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
    b1 = conv(320, (1, 1), 0, "branch1x1")(x)
    b3 = conv(384, (1, 1), 0, "branch3x3_1")(x)
    b3 = jnp.concatenate(
        [
            conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
            conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3),
        ],
        axis=-1,
    )
    bd = conv(448, (1, 1), 0, "branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), 1, "branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
        [
            conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
            conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd),
        ],
        axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      pooled = _max_pool_3x3_same(x)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, (1, 1), 0, "branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The Inception-v3 FID graph (see the module docstring).

  Attributes:
    resize_input: resize to 299x299 first (True for FID/IS comparability).
    preprocess: ``"tf"`` (TTUR/TF-GAN, default) or ``"pytorch_fid"``.
    precision: ``jax.lax.Precision`` of convs and the fc layer; ``HIGHEST``
      by default so that GPUs/TPUs do not silently use TF32/bf16 passes.

  Call: ``pool3, logits = model.apply(variables, images)`` with
  ``images [B, H, W, 3]`` uint8 or float in [0, 255], ``pool3 [B, 2048]``
  (float32, >= 0) and ``logits [B, 1008]`` (float32).
  """

  resize_input: bool = True
  preprocess: str = "tf"
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    if not self.resize_input and min(images.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(
          f"with resize_input=False the images must be at least {MIN_INPUT_SIZE}x"
          f"{MIN_INPUT_SIZE}, got {images.shape[1]}x{images.shape[2]}"
      )
    p = self.precision
    x = _preprocess(images, self.preprocess, self.resize_input)  # [B, 299, 299, 3]
    x = BasicConv2d(32, (3, 3), (2, 2), precision=p, name="Conv2d_1a_3x3")(x)  # 149x149x32
    x = BasicConv2d(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)  # 147x147x32
    x = BasicConv2d(64, (3, 3), padding=1, precision=p, name="Conv2d_2b_3x3")(x)  # 147x147x64
    x = _max_pool_3x3_s2(x)  # 73x73x64
    x = BasicConv2d(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)  # 73x73x80
    x = BasicConv2d(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)  # 71x71x192
    x = _max_pool_3x3_s2(x)  # 35x35x192
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # 35x35x256
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # 35x35x288
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # 35x35x288
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # 17x17x768
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)  # 17x17x768
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)  # 17x17x768
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # 8x8x1280
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)  # 8x8x2048
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)  # 8x8x2048
    pool3 = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    logits = nn.Dense(NUM_LOGITS, precision=p, name="fc")(pool3)  # [B, 1008]
    return pool3, logits


# --------------------------------------------------------------------------- #
# Weights
# --------------------------------------------------------------------------- #
class InceptionWeightsNotFoundError(errors.WeightsNotFoundError):
  """The converted Inception weights file is missing."""


def _missing_weights_message(path: str) -> str:
  return (
      f"Inception FID weights not found at {path!r}.\n"
      "No weights ship with ddpm_jax; they are the published TensorFlow "
      "'inception-2015-12-05' weights (the graph that TTUR/TF-GAN use for FID/IS, "
      f"{TF_INCEPTION_URL}), which pytorch-fid distributes as a PyTorch file:\n"
      f"  1. download {PYTORCH_FID_WEIGHTS_URL}\n"
      "  2. in any environment with torch, numpy, jax and flax installed, convert it:\n"
      "       python -m ddpm_jax.models.inception --convert "
      f"pt_inception-2015-12-05-6726825d.pth {DEFAULT_WEIGHTS_PATH}\n"
      "     (or call ddpm_jax.models.inception.convert_pytorch_fid_state_dict on a dict of "
      "numpy arrays and save_inception_params)\n"
      f"  3. pass the .npz path, set ${WEIGHTS_ENV_VAR}, or put it at {DEFAULT_WEIGHTS_PATH}."
  )


@functools.lru_cache(maxsize=None)
def _variable_shapes() -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  model = InceptionV3(resize_input=False)
  dummy = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), dummy)
  flat = traverse_util.flatten_dict(_to_dict(shapes), sep="/")
  return tuple((k, tuple(v.shape)) for k, v in flat.items())


def inception_variable_shapes() -> Dict[str, Tuple[int, ...]]:
  """Flat ``{"params/<layer>/.../kernel": shape, "batch_stats/...": shape}`` of the model.

  Computed once with ``jax.eval_shape`` (no arrays are allocated).
  """
  return dict(_variable_shapes())


def _unflatten(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _validate_flat(flat: Mapping[str, np.ndarray], source: str) -> None:
  expected = inception_variable_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = sorted(k for k in expected if k in flat and tuple(np.shape(flat[k])) != expected[k])
  if missing or unexpected or wrong:
    lines = [f"{source} does not match the Inception FID graph:"]
    if missing:
      lines.append(f"  {len(missing)} missing, e.g. {missing[:5]}")
    if unexpected:
      lines.append(f"  {len(unexpected)} unexpected, e.g. {unexpected[:5]}")
    for k in wrong[:5]:
      lines.append(f"  {k}: shape {tuple(np.shape(flat[k]))}, expected {expected[k]}")
    raise errors.WeightsError("\n".join(lines))


def save_inception_params(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Write ``{"params", "batch_stats"}`` to an ``.npz`` of ``/``-joined keys (float32)."""
  flat = traverse_util.flatten_dict(_to_dict(variables), sep="/")
  flat = {k: np.asarray(v, dtype=np.float32) for k, v in flat.items()}
  _validate_flat(flat, "the variables to save")
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  np.savez(path, **flat)


def load_inception_params(path: str | os.PathLike | None = None) -> Dict[str, Any]:
  """Load converted Inception FID weights.

  Args:
    path: an ``.npz`` written by :func:`save_inception_params` / the
      ``--convert`` CLI: one float32 array per ``/``-joined variable path
      (``params/Conv2d_1a_3x3/conv/kernel``, ``batch_stats/fc``... see the
      module docstring).  Default: ``$DDPM_JAX_INCEPTION_WEIGHTS`` or
      :data:`DEFAULT_WEIGHTS_PATH`.

  Returns:
    ``{"params": ..., "batch_stats": ...}``, nested dicts of ``jnp`` float32
    arrays, ready for ``InceptionV3().apply(variables, images)``.

  Raises:
    InceptionWeightsNotFoundError: (a ``FileNotFoundError``) no file there;
      the message says where to download the published weights and how to
      convert them.
    ValueError: the file is unreadable or its names/shapes do not match.
  """
  if path is None:
    path = os.environ.get(WEIGHTS_ENV_VAR) or DEFAULT_WEIGHTS_PATH
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InceptionWeightsNotFoundError(_missing_weights_message(path))
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
  except Exception as err:
    raise errors.WeightsError(f"could not read Inception weights from {path!r}: {err}") from err
  _validate_flat(flat, repr(path))
  return jax.tree_util.tree_map(jnp.asarray, _unflatten(flat))


def _to_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def convert_pytorch_fid_state_dict(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """Convert pytorch-fid's ``FIDInceptionV3`` state dict to Flax variables.

  Args:
    state_dict: ``{torch name: numpy array}``, e.g. from
      ``{k: v.numpy() for k, v in torch.load("pt_inception-2015-12-05-6726825d.pth").items()}``.
      Names are ``<layer>.conv.weight [out, in, kh, kw]``,
      ``<layer>.bn.{weight,bias,running_mean,running_var} [out]``,
      ``fc.weight [1008, 2048]``, ``fc.bias [1008]``; ``num_batches_tracked``
      entries are ignored.  A ``module.`` prefix (DataParallel) is stripped.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays (layout in
    the module docstring); save with :func:`save_inception_params`.

  Raises:
    ValueError: missing, unexpected or mis-shaped entries (e.g. a torchvision
      ImageNet checkpoint with 1000 classes / aux logits, which is a
      different network).
  """
  flat: Dict[str, np.ndarray] = {}
  unknown = []
  for name, value in state_dict.items():
    if name.startswith("module."):
      name = name[len("module.") :]
    if name.endswith("num_batches_tracked"):
      continue
    value = np.asarray(value, dtype=np.float32)
    parts = name.split(".")
    layer, leaf = "/".join(parts[:-1]), parts[-1]
    if parts[0] == "fc" and len(parts) == 2:
      if leaf == "weight":
        flat["params/fc/kernel"] = value.T
      elif leaf == "bias":
        flat["params/fc/bias"] = value
      else:
        unknown.append(name)
    elif len(parts) >= 3 and parts[-2] == "conv" and leaf == "weight":
      flat[f"params/{layer}/kernel"] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    elif len(parts) >= 3 and parts[-2] == "bn":
      target = {
          "weight": f"params/{layer}/scale",
          "bias": f"params/{layer}/bias",
          "running_mean": f"batch_stats/{layer}/mean",
          "running_var": f"batch_stats/{layer}/var",
      }.get(leaf)
      if target is None:
        unknown.append(name)
      else:
        flat[target] = value
    else:
      unknown.append(name)
  if unknown:
    raise ValueError(
        f"{len(unknown)} state-dict entries are not part of pytorch-fid's FIDInceptionV3, "
        f"e.g. {unknown[:5]}"
    )
  _validate_flat(flat, "the converted state dict")
  return _unflatten(flat)


def _read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # lazily: only the converter needs it
  except ImportError as err:
    raise SystemExit(
        "reading a .pth needs PyTorch (pip install torch, in any environment that also "
        "has numpy/jax/flax), or load it yourself and call convert_pytorch_fid_state_dict"
    ) from err
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ddpm_jax.models.inception",
      description="Convert pytorch-fid's Inception FID weights (.pth) to a ddpm_jax .npz.",
  )
  parser.add_argument(
      "--convert",
      nargs=2,
      metavar=("IN_PTH", "OUT_NPZ"),
      required=True,
      help=f"input pt_inception-2015-12-05-6726825d.pth ({PYTORCH_FID_WEIGHTS_URL}) and output .npz",
  )
  args = parser.parse_args(argv)
  src, dst = args.convert
  variables = convert_pytorch_fid_state_dict(_read_torch_state_dict(src))
  save_inception_params(dst, variables)
  n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
  print(f"wrote {dst}: {n:,} numbers", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
