"""The step-derived order of the in-memory sources: which examples, flipped or not, at each step.

The global batch at step s is a pure function of (shuffle_seed, s, B, N): its
row j holds the global example counter g = s * B + j, which is example
``perm_e[g % N]`` of the split, where e = g // N is the epoch and ``perm_e`` a
permutation of range(N) drawn from ``Philox(key=[shuffle_seed, e])``. Every
epoch thus visits each example exactly once (batches may straddle an epoch
boundary). Whether example g is flipped is a hash of (shuffle_seed, g).
Process p of P takes rows [p*B/P, (p+1)*B/P) of the global batch, so a run
resumed at step s sees bitwise the same data as an uninterrupted one, for any
number of processes and devices. Labels travel with their images.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from ddpm_jax import images as image_lib


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """Permutation int64 [n] of range(n) for an epoch; pure in (seed, epoch)."""
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed={seed} and epoch={epoch} must be >= 0.")
  key = np.array([seed, epoch], dtype=np.uint64)
  perm = np.random.Generator(np.random.Philox(key=key)).permutation(n)
  perm = perm.astype(np.int64)
  perm.setflags(write=False)
  return perm


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def flip_mask(seed: int, example_counters: np.ndarray) -> np.ndarray:
  """bool [...]: whether global example counter g is flipped (p = 1/2).

  A pure function of (seed, g); the counter g = step * B + row.
  """
  g = np.asarray(example_counters, dtype=np.uint64)
  key = _splitmix64(np.full(g.shape, seed, dtype=np.uint64))
  return (_splitmix64(key ^ g) >> np.uint64(63)).astype(bool)


def batch_example_indices(
    seed: int, step: int, batch_size: int, n: int, rows: Optional[slice] = None
) -> tuple[np.ndarray, np.ndarray]:
  """Which examples make up the global batch at ``step``.

  Args:
    seed: shuffle seed (>= 0).
    step: training step (>= 0).
    batch_size: global batch size B.
    n: number of examples N in the array.
    rows: optional slice of the batch rows to compute (default all B).

  Returns:
    indices: int64 [R] in [0, N), row j -> array index perm_e[g % N] with
      g = step * B + j and e = g // N.
    counters: int64 [R], the global example counters g.
  """
  if step < 0:
    raise ValueError(f"step={step} must be >= 0.")
  start, stop, _ = (rows or slice(None)).indices(batch_size)
  counters = step * batch_size + np.arange(start, stop, dtype=np.int64)
  epochs = counters // n
  positions = counters % n
  indices = np.empty_like(counters)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    indices[sel] = epoch_permutation(seed, int(epoch), n)[positions[sel]]
  return indices, counters


def global_batch(
    images: np.ndarray,
    labels: Optional[np.ndarray],
    step: int,
    batch_size: int,
    seed: int,
    random_flip: bool,
    rows: Optional[slice] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """The global batch at ``step`` (or its ``rows``): uint8 [R, H, W, C] and int32 labels [R] or None.

  ``images`` is uint8 [N, H, W, C] and ``labels`` int32 [N] (or None); flipped
  rows are reversed along W.
  """
  indices, counters = batch_example_indices(seed, step, batch_size, images.shape[0], rows)
  batch = images[indices]
  if random_flip:
    flips = flip_mask(seed, counters)
    batch[flips] = batch[flips][:, :, ::-1, :]
  return batch, None if labels is None else labels[indices]


def get_batch(
    images: np.ndarray, step: int, batch_size: int, seed: int, random_flip: bool
) -> np.ndarray:
  """The global batch's images at ``step``: float32 [B, H, W, C] in [-1, 1]."""
  batch, _ = global_batch(images, None, step, batch_size, seed, random_flip)
  return image_lib.scale_images(batch)


def check_divisible(
    batch_size: int, process_count: int, local_device_count: int, field: str
) -> int:
  """The per-device batch size; ValueError naming ``field`` when it does not divide."""
  parts = process_count * local_device_count
  if batch_size <= 0 or batch_size % parts:
    raise ValueError(
        f"{field}={batch_size} must be a positive multiple of process_count * "
        f"local_device_count = {process_count} * {local_device_count} = {parts}"
    )
  return batch_size // parts


def local_batch(
    images: np.ndarray,
    labels: Optional[np.ndarray],
    step: int,
    global_batch_size: int,
    seed: int,
    random_flip: bool,
    process_index: int,
    process_count: int,
    local_device_count: int,
) -> dict:
  """This process's part of the global batch at ``step``, split over its devices.

  Returns {'image': float32 [D, B / (P * D), H, W, C] in [-1, 1]} and, with
  ``labels``, 'label': int32 [D, B / (P * D)]: rows [p * B/P, (p+1) * B/P) of
  the global batch, in order.
  """
  per_device = check_divisible(
      global_batch_size, process_count, local_device_count, "training.batch_size"
  )
  per_process = global_batch_size // process_count
  rows = slice(process_index * per_process, (process_index + 1) * per_process)
  x, y = global_batch(images, labels, step, global_batch_size, seed, random_flip, rows)
  out = {"image": image_lib.scale_images(x.reshape((local_device_count, per_device) + x.shape[1:]))}
  if y is not None:
    out["label"] = y.reshape(local_device_count, per_device)
  return out
