"""Per-example dropout masks for XLA:CPU, the same bits as ``jax.random.bernoulli``.

``keep_mask(keys, keep_prob, shape)`` equals
``jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, shape))(keys)`` bit for
bit, for the default ``threefry2x32`` keys with ``jax_threefry_partitionable``
on (JAX's default since 0.5). It computes the same Threefry-2x32 hash of the
same counters, written out in ``jnp`` integer ops.

Why: on CPU, JAX lowers the Threefry hash as a rolled loop that XLA:CPU runs
op by op and cannot fuse with the mask's use. Written out, the hash is one
elementwise expression. Left alone, XLA:CPU would fuse that expression into
every use of the mask (the forward's ``where`` and the backward's), hashing
twice; so the mask is computed inside a ``lax.cond`` whose two branches are the
same function: XLA cannot fuse across a conditional, the hash runs once into a
bool array, and both passes read it. (Under ``vmap`` the predicate is batched
and both branches run: the same bits.)

With any other key implementation, with ``jax_threefry_partitionable`` off or
with ``jax_enable_x64`` on, ``keep_mask`` calls ``jax.random.bernoulli``
itself, so the result is always JAX's.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Salmon et al. 2011, Threefry-2x32
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
  """The Threefry-2x32 block cipher (20 rounds), unrolled; all arguments uint32, broadcastable.

  Returns the two uint32 output words.
  """
  ks = (k1, k2, k1 ^ k2 ^ _PARITY)
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = _rotl(x2, r) ^ x1
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _fast_path(keys: jax.Array) -> bool:
  # With x64 on, bernoulli of a Python float draws float64 uniforms from 64-bit words.
  if not jax.config.jax_threefry_partitionable or jax.config.jax_enable_x64:
    return False
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(keys)) == "threefry2x32"
  return keys.dtype == jnp.uint32 and jax.config.jax_default_prng_impl == "threefry2x32"


def keep_mask(
    keys: jax.Array, keep_prob: float, shape: Sequence[int], stored: bool = True
) -> jax.Array:
  """Bernoulli(keep_prob) masks, one per key.

  Args:
    keys: [B] typed PRNG keys, or [B, 2] raw uint32 keys.
    keep_prob: probability of True, in [0, 1].
    shape: the shape of one example's mask (fewer than 2**32 elements).
    stored: compute the mask once into memory rather than letting XLA fuse
      (and so recompute) the hash into each use (see the module doc). The
      bits are the same either way.
  Returns:
    bool [B, *shape]; row b is ``jax.random.bernoulli(keys[b], keep_prob, shape)``.
  """
  shape = tuple(int(s) for s in shape)
  if not shape or not _fast_path(keys) or int(np.prod(shape)) >= 2**32:
    return jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, shape))(keys)
  data = jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
  hashed = functools.partial(_hashed_mask, keep_prob=keep_prob, shape=shape)
  if not stored or data.shape[0] == 0:
    return hashed(data)
  # Any predicate the compiler cannot fold will do: both branches are the same.
  unknown = (data[0, 0] & np.uint32(1)) == 0
  return jax.lax.cond(unknown, hashed, hashed, data)


def _hashed_mask(data: jax.Array, keep_prob: float, shape: tuple) -> jax.Array:
  """``keep_mask`` of raw keys ``data`` ([B, 2] uint32) as one elementwise expression."""
  b = data.shape[0]
  k1 = data[:, 0].reshape((b,) + (1,) * len(shape))
  k2 = data[:, 1].reshape((b,) + (1,) * len(shape))
  # JAX's counters: the flat index of each element as a 64-bit number (high word 0 here).
  lo = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape((1,) + shape)
  w1, w2 = threefry2x32(k1, k2, np.uint32(0), lo)
  bits = w1 ^ w2
  # jax.random.uniform: 23 random mantissa bits in [1, 2), minus 1; bernoulli: u < p.
  u = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
  return (u - np.float32(1.0)) < jnp.float32(keep_prob)
