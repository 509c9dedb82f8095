"""Tests for ddpm_jax.cpu.dropout: Threefry-2x32 written out, and per-example keep masks.

References: the Threefry-2x32 (20 rounds) known-answer vectors of Random123
(Salmon et al., SC 2011, the ``kat_vectors`` file), and JAX's own
``jax.random.bernoulli``, which the masks must equal bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.cpu import dropout


def jax_bernoulli(keys, keep_prob, shape):
  """The reference: JAX's own bernoulli, one key per row."""
  return jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, shape))(keys)


# (key, counter, expected output) for threefry2x32_20 from Random123's kat_vectors.
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key,count,expected", KAT)
def test_threefry_known_answers(key, count, expected):
  u = lambda v: jnp.asarray(v, jnp.uint32)
  out = jax.jit(dropout.threefry2x32)(u(key[0]), u(key[1]), u(count[0]), u(count[1]))
  assert (int(out[0]), int(out[1])) == expected


@pytest.mark.parametrize("shape", [(4, 4, 8), (5, 3, 2), (7,), (2, 3, 5, 2)])
@pytest.mark.parametrize("keep_prob", [0.9, 0.5, 0.0, 1.0])
def test_keep_mask_is_jax_bernoulli(shape, keep_prob):
  keys = jax.random.split(jax.random.key(3), 6)
  ref = jax_bernoulli(keys, keep_prob, shape)
  got = jax.jit(lambda k: dropout.keep_mask(k, keep_prob, shape))(keys)
  assert got.dtype == jnp.bool_ and got.shape == (6,) + shape
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_keep_mask_raw_uint32_keys():
  keys = jax.random.split(jax.random.PRNGKey(11), 3)  # [3, 2] uint32
  assert keys.dtype == jnp.uint32
  ref = jax_bernoulli(keys, 0.9, (8, 8, 16))
  got = dropout.keep_mask(keys, 0.9, (8, 8, 16))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_keep_mask_rate_and_independence():
  """Binomial bounds: 4 x 64k draws at p = 0.9 (5 sigma), examples not copies of each other."""
  keys = jax.random.split(jax.random.key(0), 4)
  m = np.asarray(dropout.keep_mask(keys, 0.9, (64, 32, 32)))
  n = m[0].size
  for row in m:
    assert abs(row.mean() - 0.9) < 5 * np.sqrt(0.9 * 0.1 / n)
  # Two independent rows agree on a fraction 0.9^2 + 0.1^2 = 0.82 of the elements.
  agree = (m[0] == m[1]).mean()
  assert abs(agree - 0.82) < 5 * np.sqrt(0.82 * 0.18 / n)


def test_keep_mask_falls_back_to_jax_when_not_partitionable():
  keys = jax.random.split(jax.random.key(5), 2)
  shape = (4, 4, 8)
  with jax.threefry_partitionable(False):
    ref = jax_bernoulli(keys, 0.9, shape)
    got = dropout.keep_mask(keys, 0.9, shape)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  with jax.threefry_partitionable(True):
    other = jax_bernoulli(keys, 0.9, shape)
  assert not np.array_equal(np.asarray(ref), np.asarray(other))  # the setting matters


def test_keep_mask_under_x64_is_jax_bernoulli():
  """With x64 on, JAX's bernoulli of a Python float draws float64 uniforms (other bits)."""
  keys = jax.random.split(jax.random.key(3), 4)
  shape = (8, 8, 4)
  with jax.enable_x64(True):
    ref = jax_bernoulli(keys, 0.9, shape)
    got = dropout.keep_mask(keys, 0.9, shape)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_keep_mask_other_key_impl_falls_back():
  keys = jax.random.split(jax.random.key(5, impl="rbg"), 2)
  ref = jax_bernoulli(keys, 0.9, (4, 4, 8))
  np.testing.assert_array_equal(
      np.asarray(dropout.keep_mask(keys, 0.9, (4, 4, 8))), np.asarray(ref)
  )


def test_keep_mask_is_fused_on_cpu():
  """No loop left in the compiled program: the hash is one elementwise pass."""
  keys = jax.random.split(jax.random.key(0), 4)
  fast = jax.jit(lambda k: dropout.keep_mask(k, 0.9, (16, 16, 32))).lower(keys).compile().as_text()
  slow = jax.jit(lambda k: jax_bernoulli(k, 0.9, (16, 16, 32))).lower(keys).compile().as_text()
  if jax.default_backend() == "cpu":
    assert " while(" in slow  # JAX's CPU lowering: the rolled loop this module avoids
  assert " while(" not in fast


def _hash_computations(hlo: str) -> tuple:
  """(computations that run the 20-round hash, computations reachable only through a conditional).

  A computation runs the hash if it holds at least 20 ``shift-left`` ops (the
  hash has 20 rotations, each one shift-left).
  """
  import re  # pylint: disable=g-import-not-at-top

  bodies = dict(re.findall(r"\n(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
  hashing = {name for name, body in bodies.items() if body.count(" shift-left(") >= 20}
  branches = set()
  for names in re.findall(r"branch_computations=\{([^}]*)\}", hlo):
    todo = [n.strip().lstrip("%") for n in names.split(",")]
    while todo:  # everything a branch calls, transitively
      name = todo.pop()
      if name in branches or name not in bodies:
        continue
      branches.add(name)
      todo += re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", bodies[name])
  return hashing, branches


def test_stored_mask_is_hashed_once_in_forward_and_backward():
  """On CPU, the gradient program runs the hash only inside the conditional (once per
  call), where the fused mask is hashed both in the forward and in the backward."""
  keys = jax.random.split(jax.random.key(0), 4)
  h = jnp.ones((4, 8, 8, 16), jnp.float32)

  def loss(h, keys, stored):
    keep = dropout.keep_mask(keys, 0.9, h.shape[1:], stored=stored)
    return jnp.sum(jnp.where(keep, h / 0.9, 0.0) * jnp.sin(h))

  step = jax.jit(jax.value_and_grad(loss), static_argnums=2)  # loss and gradient, as in training
  texts = {s: step.lower(h, keys, s).compile().as_text() for s in (True, False)}
  hashing, branches = _hash_computations(texts[True])
  assert hashing and hashing <= branches  # every hash is in a branch: computed once, stored
  hashing, branches = _hash_computations(texts[False])
  assert len(hashing) == 2 and not branches  # forward and backward fusions each hash
  grads = {s: step(h, keys, s)[1] for s in (True, False)}
  ref = jnp.where(jax_bernoulli(keys, 0.9, h.shape[1:]), (jnp.sin(h) + h * jnp.cos(h)) / 0.9, 0.0)
  for s in (True, False):
    np.testing.assert_allclose(np.asarray(grads[s]), np.asarray(ref), rtol=1e-6)


def test_stored_mask_under_vmap_is_jax_bernoulli():
  """Under vmap the conditional's predicate is batched (both branches run); same bits."""
  keys = jax.random.split(jax.random.key(8), 6).reshape(3, 2)
  got = jax.jit(jax.vmap(lambda k: dropout.keep_mask(k, 0.8, (4, 4, 8))))(keys)
  ref = jax.vmap(lambda k: jax_bernoulli(k, 0.8, (4, 4, 8)))(keys)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
