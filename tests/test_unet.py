"""Tests for ddpm_jax.models.unet (the paper's U-Net).

Every test compares against a number from the paper / released code or against an
independent implementation (plain numpy, float64; TensorFlow where the paper's exact
TF op matters). Shape-only checks use ``jax.eval_shape`` so nothing is allocated.
"""

from __future__ import annotations

import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import UNet, count_params, get_timestep_embedding
from ddpm_jax.models import unet as unet_lib
from ddpm_jax.models.unet import Downsample, Upsample

KEY = jax.random.PRNGKey(0)

# A tiny model that still has every kind of block: a channel change (nin_shortcut),
# attention on the down path, in the middle and on the up path, a Downsample, an
# Upsample, and skip concatenations. Its dropout is only active with train=True.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.3)
TINY_HW = 8


def _shape_init(model, hw, c=3, batch=1):
  """``model.init`` by ``jax.eval_shape``: a tree of ShapeDtypeStructs, nothing allocated."""
  x = jax.ShapeDtypeStruct((batch, hw, hw, c), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  y = None if model.num_classes is None else jax.ShapeDtypeStruct((batch,), jnp.int32)
  return jax.eval_shape(model.init, KEY, x, t, y)


def _fwd(model):
  """Jitted ``model.apply`` (eager op-by-op dispatch is much slower on CPU)."""
  return jax.jit(model.apply, static_argnames=("train",))


def _randomize(params, seed=0):
  """Random O(1)-output values for every leaf of a (shape) tree, drawn with numpy.

  The paper's init makes conv2/proj_out/conv_out ~1e-10, which would make the
  output ~0 and every comparison trivially pass; random params make the tests bite.
  (Also much faster on CPU than a real ``model.init``.)
  """
  rng = np.random.RandomState(seed)
  out = {}
  for path, leaf in sorted(flax.traverse_util.flatten_dict(params).items()):
    noise = rng.standard_normal(leaf.shape)
    if path[-1] == "kernel":
      val = noise / math.sqrt(np.prod(leaf.shape[:-1]))
    elif path[-1] == "scale":
      val = 1.0 + 0.1 * noise
    elif path[-1] == "embedding":
      val = noise
    else:  # biases
      val = 0.1 * noise
    out[path] = jnp.asarray(val, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def _inputs(batch, hw, c=3, seed=1, T=1000):
  rng = np.random.RandomState(seed)
  x = rng.uniform(-1, 1, size=(batch, hw, hw, c)).astype(np.float32)
  t = rng.randint(0, T, size=(batch,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(t)


def _tiny_params(model, hw=TINY_HW, seed=0):
  return _randomize(_shape_init(model, hw)["params"], seed)


@pytest.fixture(scope="module")
def tiny():
  """The TINY model, random params and one jitted forward shared by several tests."""
  model = UNet(**TINY)
  return model, {"params": _tiny_params(model)}, _fwd(model)


# ----------------------------------------------------------------------------------
# Independent float64 numpy reference of the paper's diffusion_tf/models/unet.py.
# ----------------------------------------------------------------------------------


def np_timestep_embedding(t, dim):
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - 1))
  args = np.asarray(t, np.float64)[:, None] * freqs[None, :]
  return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def _np(p):
  return {k: (_np(v) if isinstance(v, dict) else np.asarray(v, np.float64)) for k, v in p.items()}


def np_swish(x):
  return x / (1.0 + np.exp(-x))


def np_group_norm(x, p, groups=32, eps=1e-6):
  B, H, W, C = x.shape
  g = x.reshape(B, H, W, groups, C // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(B, H, W, C) * p["scale"] + p["bias"]


def np_conv3x3(x, p, stride=1):
  """3x3 conv; stride 1 pads 1 on each side, stride 2 (even sizes) pads (0, 1) like TF SAME."""
  pad = (1, 1) if stride == 1 else (0, 1)
  xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
  B, H, W, _ = x.shape
  Ho, Wo = H // stride, W // stride
  out = np.zeros((B, Ho, Wo, p["kernel"].shape[-1]))
  for a in range(3):
    for b in range(3):
      patch = xp[:, a : a + stride * Ho : stride, b : b + stride * Wo : stride, :]
      out += patch @ p["kernel"][a, b]
  return out + p["bias"]


def np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


def np_resnet_block(x, temb, p, out_ch):
  h = np_swish(np_group_norm(x, p["norm1"]))
  h = np_conv3x3(h, p["conv1"])
  h = h + np_dense(np_swish(temb), p["temb_proj"])[:, None, None, :]
  h = np_swish(np_group_norm(h, p["norm2"]))
  h = np_conv3x3(h, p["conv2"])
  if x.shape[-1] != out_ch:
    x = np_dense(x, p["nin_shortcut"])
  return x + h


def np_attn_block(x, p):
  B, H, W, C = x.shape
  h = np_group_norm(x, p["norm"])
  q, k, v = (np_dense(h, p[n]).reshape(B, H * W, C) for n in ("q", "k", "v"))
  w = np.einsum("bqc,bkc->bqk", q, k) / math.sqrt(C)
  w = np.exp(w - w.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  h = np.einsum("bqk,bkc->bqc", w, v).reshape(B, H, W, C)
  return x + np_dense(h, p["proj_out"])


def np_unet(
    p, x, t, y, *, ch, ch_mult, num_res_blocks, attn_resolutions, resamp_with_conv=True, **_
):
  p = _np(p)
  x = np.asarray(x, np.float64)
  temb = np_timestep_embedding(t, ch)
  temb = np_dense(np_swish(np_dense(temb, p["temb_dense0"])), p["temb_dense1"])
  if y is not None:
    temb = temb + p["class_emb"]["embedding"][np.asarray(y)]
  hs = [np_conv3x3(x, p["conv_in"])]
  L = len(ch_mult)
  for i in range(L):
    for j in range(num_res_blocks):
      h = np_resnet_block(hs[-1], temb, p[f"down_{i}_block_{j}"], ch * ch_mult[i])
      if h.shape[1] in attn_resolutions:
        h = np_attn_block(h, p[f"down_{i}_attn_{j}"])
      hs.append(h)
    if i != L - 1:
      h = hs[-1]
      if resamp_with_conv:
        h = np_conv3x3(h, p[f"down_{i}_downsample"]["conv"], stride=2)
      else:
        B, H, W, C = h.shape
        h = h.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
      hs.append(h)
  h = hs[-1]
  h = np_resnet_block(h, temb, p["mid_block_1"], h.shape[-1])
  h = np_attn_block(h, p["mid_attn_1"])
  h = np_resnet_block(h, temb, p["mid_block_2"], h.shape[-1])
  for i in reversed(range(L)):
    for j in range(num_res_blocks + 1):
      h = np_resnet_block(
          np.concatenate([h, hs.pop()], -1), temb, p[f"up_{i}_block_{j}"], ch * ch_mult[i]
      )
      if h.shape[1] in attn_resolutions:
        h = np_attn_block(h, p[f"up_{i}_attn_{j}"])
    if i != 0:
      h = h.repeat(2, axis=1).repeat(2, axis=2)
      if resamp_with_conv:
        h = np_conv3x3(h, p[f"up_{i}_upsample"]["conv"])
  assert not hs
  h = np_swish(np_group_norm(h, p["norm_out"]))
  return np_conv3x3(h, p["conv_out"])


# ----------------------------------------------------------------------------------
# Parameter counts and names.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, hw, expected",
    [
        (dict(), 32, 35_746_307),  # CIFAR-10 model of the paper
        (dict(out_ch=6), 32, 35_749_766),  # CIFAR-10 with learned variances
        (dict(ch_mult=(1, 1, 2, 2, 4, 4)), 256, 113_673_219),  # LSUN / CelebA-HQ 256 model
    ],
)
def test_param_counts_match_paper(kwargs, hw, expected):
  variables = _shape_init(UNet(**kwargs), hw)
  assert set(variables) == {"params"}
  assert count_params(variables["params"]) == expected


def test_param_tree_names_mirror_tf_checkpoint():
  params = _shape_init(UNet(), 32)["params"]
  expected = {
      "temb_dense0",
      "temb_dense1",
      "conv_in",
      "norm_out",
      "conv_out",
      "mid_block_1",
      "mid_attn_1",
      "mid_block_2",
  }
  for i in range(4):
    expected |= {f"down_{i}_block_{j}" for j in range(2)}
    expected |= {f"up_{i}_block_{j}" for j in range(3)}
    if i == 1:  # 16x16 level
      expected |= {f"down_1_attn_{j}" for j in range(2)} | {f"up_1_attn_{j}" for j in range(3)}
    if i != 3:
      expected.add(f"down_{i}_downsample")
    if i != 0:
      expected.add(f"up_{i}_upsample")
  assert set(params) == expected
  shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), params)
  assert shapes["down_1_block_0"] == {
      "norm1": {"scale": (128,), "bias": (128,)},
      "conv1": {"kernel": (3, 3, 128, 256), "bias": (256,)},
      "temb_proj": {"kernel": (512, 256), "bias": (256,)},
      "norm2": {"scale": (256,), "bias": (256,)},
      "conv2": {"kernel": (3, 3, 256, 256), "bias": (256,)},
      "nin_shortcut": {"kernel": (128, 256), "bias": (256,)},
  }
  assert "nin_shortcut" not in shapes["down_1_block_1"]
  assert shapes["mid_attn_1"] == {
      "norm": {"scale": (256,), "bias": (256,)},
      **{n: {"kernel": (256, 256), "bias": (256,)} for n in ("q", "k", "v", "proj_out")},
  }
  assert shapes["down_0_downsample"] == {"conv": {"kernel": (3, 3, 128, 128), "bias": (128,)}}
  assert shapes["up_1_upsample"] == {"conv": {"kernel": (3, 3, 256, 256), "bias": (256,)}}
  assert shapes["temb_dense0"] == {"kernel": (128, 512), "bias": (512,)}
  assert shapes["conv_out"] == {"kernel": (3, 3, 128, 3), "bias": (3,)}
  # Without resampling convs the resample modules hold no params.
  params_nc = _shape_init(UNet(resamp_with_conv=False), 32)["params"]
  assert not any("sample" in k for k in params_nc)


def test_init_follows_paper_default_init():
  """default_init(1) = variance_scaling(1, fan_avg, uniform); init_scale=0 layers get 1e-10; biases 0."""
  from ddpm_jax.models.unet import AttnBlock, ResnetBlock

  x = jnp.ones((1, 4, 4, 32))
  temb = jnp.ones((1, 64))
  rb = ResnetBlock(out_ch=64).init(KEY, x, temb)["params"]
  at = AttnBlock().init(KEY, x)["params"]
  w = np.asarray(rb["conv1"]["kernel"])  # [3, 3, 32, 64]
  bound = math.sqrt(3.0 / ((9 * 32 + 9 * 64) / 2))  # U(-a, a), a = sqrt(3 / fan_avg)
  assert 0.9 * bound < np.abs(w).max() <= bound
  np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05)
  wn = np.asarray(rb["nin_shortcut"]["kernel"])  # [32, 64] dense: fan_avg = 48
  assert 0.9 * math.sqrt(3 / 48) < np.abs(wn).max() <= math.sqrt(3 / 48)
  for leaf in (rb["conv2"]["kernel"], at["proj_out"]["kernel"]):
    assert 0 < np.abs(np.asarray(leaf)).max() < 1e-4  # scale 1e-10 -> |w| <~ 1e-6
  for tree in (rb, at):
    for path, leaf in flax.traverse_util.flatten_dict(tree).items():
      if path[-1] == "bias":
        assert np.all(np.asarray(leaf) == 0), path
      if path[-1] == "scale":
        assert np.all(np.asarray(leaf) == 1), path


# ----------------------------------------------------------------------------------
# Shapes and validation.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, hw, batch",
    [
        (dict(), 32, 2),
        (dict(ch=32, ch_mult=(1, 2, 2, 2)), 64, 3),
        (dict(ch_mult=(1, 1, 2, 2, 4, 4), out_ch=6), 256, 1),
        (dict(dtype=jnp.bfloat16), 32, 2),
    ],
)
def test_output_shapes(kwargs, hw, batch):
  model = UNet(**kwargs)
  variables = _shape_init(model, hw, batch=batch)
  x = jax.ShapeDtypeStruct((batch, hw, hw, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  out = jax.eval_shape(model.apply, variables, x, t)
  assert out.shape == (batch, hw, hw, model.out_ch)
  assert out.dtype == jnp.float32


def test_indivisible_image_size_raises():
  with pytest.raises(
      ValueError,
      match=r"image size 30 is not divisible by 2\*\*\(len\(ch_mult\)-1\)=8 \(model.ch_mult=\(1, 2, 2, 2\)\)",
  ):
    _shape_init(UNet(), 30)
  with pytest.raises(ValueError, match=r"image size 20 is not divisible .*=8"):
    jax.eval_shape(lambda: UNet().init(KEY, jnp.zeros((1, 32, 20, 3)), jnp.zeros((1,), jnp.int32)))
  _shape_init(UNet(ch=32, ch_mult=(1, 2)), 30)  # 30 is divisible by 2: fine


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(ch=48), r"model.ch=48 must be a positive multiple of 32"),
        (dict(ch_mult=()), r"model.ch_mult=\(\) must be"),
        (dict(num_res_blocks=0), r"model.num_res_blocks=0"),
        (dict(dropout=1.0), r"model.dropout=1.0"),
        (dict(out_ch=0), r"model.out_ch=0"),
        (dict(num_classes=0), r"model.num_classes=0"),
    ],
)
def test_bad_config_raises(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    _shape_init(UNet(**kwargs), 32)


def test_bad_inputs_raise():
  model = UNet(ch=32, ch_mult=(1, 2))
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
    jax.eval_shape(lambda: model.init(KEY, x, jnp.zeros((3,), jnp.int32)))
  with pytest.raises(ValueError, match=r"num_classes is None"):
    jax.eval_shape(
        lambda: model.init(KEY, x, jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32))
    )
  with pytest.raises(ValueError, match=r"requires class labels"):
    jax.eval_shape(
        lambda: UNet(ch=32, ch_mult=(1, 2), num_classes=10).init(KEY, x, jnp.zeros((2,), jnp.int32))
    )
  with pytest.raises(ValueError, match=r"NHWC"):
    jax.eval_shape(lambda: model.init(KEY, x[0], jnp.zeros((2,), jnp.int32)))


# ----------------------------------------------------------------------------------
# Numerics against independent references.
# ----------------------------------------------------------------------------------


def test_timestep_embedding_matches_numpy():
  t = np.array([0, 1, 7, 250, 999], np.int32)
  for dim in (32, 128):
    got = np.asarray(get_timestep_embedding(jnp.asarray(t), dim))
    ref = np_timestep_embedding(t, dim)
    assert got.shape == (5, dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)  # float32 sin of args up to ~1e3
  # sin comes first: t=0 gives [0]*half + [1]*half.
  np.testing.assert_array_equal(
      np.asarray(get_timestep_embedding(jnp.zeros((1,), jnp.int32), 8)), [[0, 0, 0, 0, 1, 1, 1, 1]]
  )


def test_forward_matches_numpy_reference(tiny):
  model, variables, fwd = tiny
  x, t = _inputs(2, TINY_HW)
  got = np.asarray(fwd(variables, x, t))
  ref = np_unet(variables["params"], x, t, None, **TINY)
  assert np.abs(ref).max() > 0.5  # random params give O(1) outputs
  np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
  # The CPU kernels compute the same function with the same parameters.
  got = np.asarray(_fwd(model.clone(cpu_kernels=True))(variables, x, t))
  np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)


def test_default_model_is_plain_flax_and_forward_mode_differentiable(tiny):
  """Built with the class's defaults (cpu_kernels=False: what ``build_model`` gives a GPU or TPU
  program) the U-Net is standard Flax (no custom_vjp, no conditional), and jax.jvp matches a
  central finite difference in float64 numpy terms."""
  model, variables, _ = tiny
  assert not model.cpu_kernels
  x, t = _inputs(2, TINY_HW)
  jaxpr = str(jax.make_jaxpr(lambda x: model.apply(variables, x, t))(x))
  assert "custom_vjp" not in jaxpr and "cond[" not in jaxpr and "platform_index" not in jaxpr
  v = jnp.asarray(np.random.RandomState(3).randn(*x.shape), jnp.float32)
  f = lambda x: model.apply(variables, x, t)
  _, tangent = jax.jit(lambda x, v: jax.jvp(f, (x,), (v,)))(x, v)
  h = 1e-4  # float64 central difference: truncation and rounding both far below float32's
  fd = (
      np_unet(variables["params"], x + h * v, t, None, **TINY)
      - np_unet(variables["params"], x - h * v, t, None, **TINY)
  ) / (2 * h)
  np.testing.assert_allclose(np.asarray(tangent), fd, atol=2e-3 * np.abs(fd).max(), rtol=0)


def test_default_cpu_model_is_forward_mode_differentiable(monkeypatch):
  """The default config's U-Net on a CPU, the CPU kernels on, differentiated forward: jax.jvp in
  the parameters and the image together matches a central finite difference of the float64
  numpy reference, and jax.linearize gives the same tangent. At 16x16 down to 2x2 every kernel
  is in it: Winograd (the up path's 96 -> 32 and 64 -> 32 convs at 16x16), the matrix-product
  conv (2x2 outputs), conv2d with its weight gradient chunked one example at a time (the other
  convs, the Upsample conv's phases) and GroupNorm."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import conv as cpu_conv  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import winograd  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top

  config = test_config.get_config()
  config.data.image_size, config.model.ch_mult = 16, (1, 2, 2, 2)
  model = builders.build_model(config)
  assert model.cpu_kernels  # the default, on this CPU backend
  arch = dict(
      ch=model.ch,
      ch_mult=model.ch_mult,
      num_res_blocks=model.num_res_blocks,
      attn_resolutions=model.attn_resolutions,
  )
  monkeypatch.setattr(cpu_conv, "WEIGHT_GRAD_CHUNK_BYTES", 1)
  used = {"winograd": 0, "matmul": 0, "chunked": 0}

  def counted(name, fn):
    def wrapper(*args, **kwargs):
      used[name] += 1
      return fn(*args, **kwargs)

    return wrapper

  monkeypatch.setattr(winograd, "conv3x3", counted("winograd", winograd.conv3x3))
  monkeypatch.setattr(cpu_conv, "conv_as_matmul", counted("matmul", cpu_conv.conv_as_matmul))
  monkeypatch.setattr(
      cpu_conv, "chunked_weight_grad", counted("chunked", cpu_conv.chunked_weight_grad)
  )

  params = _randomize(_shape_init(model, 16, c=1)["params"])  # random O(1)-output values
  x, t = _inputs(2, 16, c=1)
  rng = np.random.RandomState(4)
  v_params = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32), params)
  v_x = jnp.asarray(rng.randn(*x.shape), jnp.float32)
  f = lambda p, x: model.apply({"params": p}, x, t)
  # One program (compiling is most of this test's time): jax.jvp's tangent, and the linear map
  # of jax.linearize applied to the same direction.
  tangent, linearized = jax.jit(
      lambda p, x, vp, vx: (jax.jvp(f, (p, x), (vp, vx))[1], jax.linearize(f, p, x)[1](vp, vx))
  )(params, x, v_params, v_x)
  assert used["winograd"] > 0 and used["matmul"] > 0 and used["chunked"] > 0, used

  h = 1e-4  # float64 central difference: truncation and rounding both far below float32's
  step = lambda sign: jax.tree.map(
      lambda p, v: np.float64(p) + sign * h * np.float64(v), params, v_params
  )
  fd = (
      np_unet(step(1), x + h * np.float64(v_x), t, None, **arch)
      - np_unet(step(-1), x - h * np.float64(v_x), t, None, **arch)
  ) / (2 * h)
  scale = np.abs(fd).max()
  assert scale > 1.0  # random parameters: an O(1) tangent, so the tolerance bites
  # The float32 tangents are within 2e-4 of the scale here; with Winograd's kernel term dropped
  # they were 0.35 off, with only the first of the weight gradient's chunks 0.78.
  np.testing.assert_allclose(np.asarray(tangent), fd, atol=1e-3 * scale, rtol=0)
  np.testing.assert_allclose(np.asarray(linearized), fd, atol=1e-3 * scale, rtol=0)


def test_forward_without_resampling_convs_matches_numpy_reference():
  cfg = dict(TINY, resamp_with_conv=False)
  model = UNet(**cfg)
  params = _tiny_params(model)
  x, t = _inputs(2, TINY_HW)
  got = np.asarray(_fwd(model)({"params": params}, x, t))
  ref = np_unet(params, x, t, None, **cfg)
  np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_group_norm_two_pass_variance(cpu_kernels):
  """GroupNorm matches numpy even when |mean| >> std (E[x^2]-mean^2 would be off by ~1e-3 here)."""
  from ddpm_jax.models.unet import _group_norm

  class GN(flax.linen.Module):

    @flax.linen.compact
    def __call__(self, x):
      return _group_norm(x, "norm", jnp.float32, cpu_kernels)

  x = (30.0 + np.random.RandomState(0).randn(2, 8, 8, 64)).astype(np.float32)
  p = {"scale": np.linspace(0.5, 1.5, 64), "bias": np.linspace(-1, 1, 64)}
  got = np.asarray(GN().apply({"params": {"norm": p}}, x))
  np.testing.assert_allclose(got, np_group_norm(x.astype(np.float64), p), atol=1e-4, rtol=0)


def test_bfloat16_models_reduce_group_norm_statistics_per_channel_float32_ones_as_flax():
  """A bfloat16 U-Net never splits activations into [..., 32 groups, C/32] (the layout that made
  its TPU program slower than float32's, docs/tpu.md); a float32 plain one is Flax's GroupNorm,
  so float32 results are unchanged; both normalise like numpy."""
  x = (3.0 + np.random.RandomState(1).randn(2, 8, 8, 64)).astype(np.float32)
  p = {"scale": np.linspace(0.5, 1.5, 64), "bias": np.linspace(-1, 1, 64)}
  split = re.compile(r"tensor<2x8x8x32x2x")  # Flax's reshape of [2, 8, 8, 64] into groups

  for dtype, splits in ((jnp.float32, True), (jnp.bfloat16, False)):

    class GN(flax.linen.Module):

      @flax.linen.compact
      def __call__(self, x):
        return unet_lib._group_norm(x, "norm", dtype, False)  # pylint: disable=protected-access

    f = jax.jit(lambda p, x: GN().apply({"params": {"norm": p}}, x))
    assert bool(split.search(f.lower(p, x).as_text())) == splits, dtype
    got = np.asarray(f(p, x).astype(jnp.float32))
    tol = 1e-4 if dtype == jnp.float32 else 2e-2 * np.abs(got).max()
    np.testing.assert_allclose(got, np_group_norm(x.astype(np.float64), p), atol=tol, rtol=0)


def np_group_norm_grads(x, scale, w, groups=32, eps=1e-6):
  """Closed-form gradients of sum(w * GroupNorm(x)) with respect to x, scale and bias."""
  B, H, W, C = x.shape
  n = H * W * (C // groups)
  g5 = lambda a: a.reshape(B, H, W, groups, C // groups)
  mean = g5(x).mean(axis=(1, 2, 4), keepdims=True)
  sigma = np.sqrt(g5(x).var(axis=(1, 2, 4), keepdims=True) + eps)
  xhat = (g5(x) - mean) / sigma
  gy = g5(w * scale)  # dL/dxhat
  dx = (
      gy
      - gy.sum(axis=(1, 2, 4), keepdims=True) / n
      - xhat * (gy * xhat).sum(axis=(1, 2, 4), keepdims=True) / n
  ) / sigma
  return dx.reshape(x.shape), (w * xhat.reshape(x.shape)).sum(axis=(0, 1, 2)), w.sum(axis=(0, 1, 2))


@pytest.mark.parametrize("channels", [32, 64])
def test_group_norm_gradients_match_closed_form(channels):
  """Training differentiates GroupNorm: d/dx, d/dscale, d/dbias against the textbook formulas."""
  group_norm = lambda x, s, b: unet_lib.group_norm_channels_minor(x, s, b, 32, 1e-6)
  rng = np.random.RandomState(channels)
  x = (3.0 + 2.0 * rng.randn(2, 8, 8, channels)).astype(np.float32)
  w = rng.randn(2, 8, 8, channels).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  bias = rng.randn(channels).astype(np.float32)
  got = jax.grad(lambda x, s, b: jnp.sum(w * group_norm(x, s, b)), argnums=(0, 1, 2))(
      x, scale, bias
  )
  ref = np_group_norm_grads(x.astype(np.float64), scale.astype(np.float64), w.astype(np.float64))
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), r, atol=2e-4 * np.abs(r).max(), rtol=0)


def test_channels_minor_group_norm_params_are_named_like_flax():
  """The channels-minor GroupNorm has flax.linen.GroupNorm's names, shapes and initial values."""
  from ddpm_jax.models.unet import _ChannelsMinorGroupNorm, _group_norm

  x = jnp.ones((1, 4, 4, 64))
  ours = _ChannelsMinorGroupNorm().init(KEY, x)
  theirs = flax.linen.GroupNorm(num_groups=32).init(KEY, x)
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
    assert a.shape == b.shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)

  class GN(flax.linen.Module):

    @flax.linen.compact
    def __call__(self, x):
      return _group_norm(x, "norm", jnp.float32, False)

  with pytest.raises(ValueError, match="48 channels are not divisible by 32"):
    GN().init(KEY, jnp.ones((1, 4, 4, 48)))


@pytest.mark.parametrize("strides", [1, 2])
def test_cpu_conv3x3_is_flax_conv(strides):
  """The CPU kernel's 3x3 conv has nn.Conv's parameters (names, shapes, initial values) and outputs."""
  x = jax.random.normal(jax.random.PRNGKey(8), (2, 8, 6, 32))
  ours = unet_lib._CPUConv3x3(64, strides=strides, init_scale=0.5)
  theirs = flax.linen.Conv(
      64, (3, 3), strides=strides, padding="SAME", kernel_init=unet_lib.default_init(0.5)
  )
  p_ours, p_theirs = ours.init(KEY, x), theirs.init(KEY, x)
  assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(p_theirs)
  for a, b in zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(p_theirs)):
    np.testing.assert_array_equal(a, b)
  p = _randomize(p_theirs["params"], 9)
  np.testing.assert_allclose(
      np.asarray(ours.apply({"params": p}, x)),
      np.asarray(theirs.apply({"params": p}, x)),
      atol=1e-5,
  )


def test_downsample_pads_like_tf_same():
  """Stride-2 conv on an even size pads 0 top/left and 1 bottom/right (TF 'SAME')."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
  mod = Downsample(with_conv=True)
  params = _randomize(mod.init(KEY, x)["params"], jax.random.PRNGKey(2))
  got = np.asarray(mod.apply({"params": params}, x))
  w = params["conv"]["kernel"]
  dn = ("NHWC", "HWIO", "NHWC")
  ref = (
      jax.lax.conv_general_dilated(x, w, (2, 2), ((0, 1), (0, 1)), dimension_numbers=dn)
      + params["conv"]["bias"]
  )
  assert got.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(got, np.asarray(ref), atol=1e-5)
  np.testing.assert_allclose(
      got, np_conv3x3(np.asarray(x, np.float64), _np(params["conv"]), stride=2), atol=1e-5
  )
  # The other asymmetric padding gives a different result, so this test can fail.
  other = (
      jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 0), (1, 0)), dimension_numbers=dn)
      + params["conv"]["bias"]
  )
  assert not np.allclose(got, np.asarray(other), atol=1e-3)


def test_resampling_matches_paper_tf_ops():
  """Downsample == tf.nn.conv2d(SAME, stride 2); Upsample == TF1 nearest resize (align_corners=True)."""
  tf = pytest.importorskip("tensorflow")
  x = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
  down = Downsample(with_conv=True)
  p = _randomize(down.init(KEY, x)["params"], jax.random.PRNGKey(3))
  ref = tf.nn.conv2d(
      x, np.asarray(p["conv"]["kernel"]), strides=2, padding="SAME"
  ).numpy() + np.asarray(p["conv"]["bias"])
  np.testing.assert_allclose(np.asarray(down.apply({"params": p}, x)), ref, atol=1e-5)
  ref_pool = tf.nn.avg_pool(x, 2, 2, "SAME").numpy()
  np.testing.assert_allclose(
      np.asarray(Downsample(with_conv=False).apply({}, x)), ref_pool, atol=1e-6
  )
  ref_up = tf.compat.v1.image.resize_nearest_neighbor(x, [16, 16], align_corners=True).numpy()
  np.testing.assert_array_equal(np.asarray(Upsample(with_conv=False).apply({}, x)), ref_up)
  # With the conv: TF's conv2d(SAME) of that resize (computed here without resizing).
  up = Upsample(with_conv=True)
  p = _randomize(up.init(KEY, x)["params"], jax.random.PRNGKey(4))
  ref = tf.nn.conv2d(ref_up, np.asarray(p["conv"]["kernel"]), strides=1, padding="SAME").numpy()
  np.testing.assert_allclose(
      np.asarray(up.apply({"params": p}, x)), ref + np.asarray(p["conv"]["bias"]), atol=1e-5
  )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_upsample_conv_matches_conv_of_repeated_input(dtype, cpu_kernels):
  """Upsample (with the CPU kernels: phase-wise 2x2 convs) == repeat, then 3x3 conv: values,
  gradients, init, dtype."""
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 5, 7, 32))  # odd, non-square sizes
  up = Upsample(with_conv=True, dtype=dtype, cpu_kernels=cpu_kernels)
  init = up.init(KEY, x)["params"]

  class ConvAfterRepeat(flax.linen.Module):  # what Upsample's parameters used to belong to

    @flax.linen.compact
    def __call__(self, x):
      return flax.linen.Conv(32, (3, 3), kernel_init=unet_lib.default_init(), name="conv")(x)

  # Same names, shapes and initial values (from the same key) as that nn.Conv.
  conv_init = ConvAfterRepeat().init(KEY, x)["params"]
  assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(conv_init)
  for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(conv_init)):
    np.testing.assert_array_equal(a, b)

  p = _randomize(init, 6)

  def naive(p, x):
    xx = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2).astype(dtype)
    y = jax.lax.conv_general_dilated(
        xx,
        p["conv"]["kernel"].astype(dtype),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + p["conv"]["bias"].astype(dtype)

  got, ref = up.apply({"params": p}, x), naive(p, x)
  assert got.shape == (2, 10, 14, 32) and got.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 0.03
  np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=tol * np.abs(ref).max()
  )
  w = jax.random.normal(jax.random.PRNGKey(7), got.shape)
  loss = lambda f: lambda p, x: jnp.sum(w * f(p, x).astype(jnp.float32))
  g_got = jax.grad(loss(lambda p, x: up.apply({"params": p}, x)), argnums=(0, 1))(p, x)
  g_ref = jax.grad(loss(naive), argnums=(0, 1))(p, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol * np.abs(b).max())


def test_batch_independence(tiny):
  """With dropout off, each example's output does not depend on the rest of the batch."""
  model, variables, fwd = tiny
  x, t = _inputs(2, TINY_HW)
  batched = np.asarray(fwd(variables, x, t))
  for i in range(2):
    single = np.asarray(fwd(variables, x[i : i + 1], t[i : i + 1]))
    np.testing.assert_allclose(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)
  # Replacing the other example leaves this one's output unchanged ...
  x2, t2 = x.at[1].set(-x[1]), t.at[1].set((t[1] + 300) % 1000)
  np.testing.assert_allclose(
      np.asarray(fwd(variables, x2, t2))[0], batched[0], atol=1e-5, rtol=1e-5
  )
  # ... while a different timestep for the same image does change it (not vacuous).
  other = np.asarray(fwd(variables, x, (t + 500) % 1000))
  assert not np.allclose(other[0], batched[0], atol=1e-3)


# Measured relative RMS error (||out16 - out32|| / ||out32||) of bf16 compute vs float32
# on the tiny random-param model: 1.5e-2 .. 1.9e-2 over 4 param/input seeds (each bf16
# ResnetBlock/AttnBlock adds ~0.3-0.4%; bf16 eps is 2**-8 = 3.9e-3). Asserted bound: 5e-2.
BF16_REL_RMS_TOL = 5e-2


def test_bfloat16_close_to_float32(tiny):
  """bf16 compute on the same float32 params: relative RMS error < 5e-2 (measured 1.5e-2..1.9e-2)."""
  m32, variables, fwd32 = tiny
  m16 = UNet(**TINY, dtype=jnp.bfloat16)
  shapes16 = _shape_init(m16, TINY_HW)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes16))
  assert jax.tree_util.tree_structure(shapes16) == jax.tree_util.tree_structure(
      _shape_init(m32, TINY_HW)
  )
  x, t = _inputs(2, TINY_HW)
  out32 = np.asarray(fwd32(variables, x, t))
  out16 = _fwd(m16)(variables, x, t)
  assert out16.dtype == jnp.float32
  out16 = np.asarray(out16)
  rel = np.sqrt(np.mean((out16 - out32) ** 2) / np.mean(out32**2))
  print(f"bf16 vs f32 relative RMS error: {rel:.3g}")
  assert 0 < rel < BF16_REL_RMS_TOL, rel


def test_dropout_only_in_training(tiny):
  model, variables, fwd = tiny
  x, t = _inputs(2, TINY_HW)
  ev1 = np.asarray(fwd(variables, x, t, train=False))
  ev2 = np.asarray(fwd(variables, x, t, train=False, rngs={"dropout": jax.random.PRNGKey(5)}))
  np.testing.assert_array_equal(ev1, ev2)
  # Eval mode equals the numpy reference, which has no dropout at all.
  ref = np_unet(variables["params"], x, t, None, **TINY)
  np.testing.assert_allclose(ev1, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
  tr1 = np.asarray(fwd(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))
  tr1b = np.asarray(fwd(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))
  tr2 = np.asarray(fwd(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)}))
  np.testing.assert_array_equal(tr1, tr1b)
  assert not np.allclose(tr1, tr2, atol=1e-3)
  assert not np.allclose(tr1, ev1, atol=1e-3)


@pytest.mark.slow
def test_per_example_dropout_keys_make_examples_independent(tiny):
  """With one dropout key per example, an example's output (dropout on) does not depend
  on the batch it is in; different keys give different masks."""
  model, variables, _ = tiny
  x, t = _inputs(2, TINY_HW)
  keys = jax.random.split(jax.random.PRNGKey(11), 2)
  f = jax.jit(lambda v, x, t, k: model.apply(v, x, t, train=True, dropout_keys=k))
  batched = np.asarray(f(variables, x, t, keys))
  for i in range(2):
    single = np.asarray(f(variables, x[i : i + 1], t[i : i + 1], keys[i : i + 1]))
    np.testing.assert_allclose(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)
  other = np.asarray(f(variables, x, t, jax.random.split(jax.random.PRNGKey(12), 2)))
  assert not np.allclose(other, batched, atol=1e-3)
  evaluated = np.asarray(model.apply(variables, x, t, train=False, dropout_keys=keys))
  assert not np.allclose(evaluated, batched, atol=1e-3)  # dropout was really on


@pytest.mark.slow
def test_remat_same_params_outputs_and_grads():
  cfg = dict(TINY, num_res_blocks=1)  # fewer blocks: two gradient compiles are the slow part
  plain, remat = UNet(**cfg), UNet(**cfg, remat=True)
  s_plain, s_remat = _shape_init(plain, TINY_HW), _shape_init(remat, TINY_HW)
  assert jax.tree_util.tree_structure(s_plain) == jax.tree_util.tree_structure(s_remat)
  assert jax.tree_util.tree_leaves(s_plain) == jax.tree_util.tree_leaves(s_remat)  # shapes, dtypes
  variables = {"params": _randomize(s_plain["params"])}
  x, t = _inputs(2, TINY_HW)
  rngs = {"dropout": jax.random.PRNGKey(7)}
  ref = np_unet(variables["params"], x, t, None, **cfg)
  got = np.asarray(_fwd(remat)(variables, x, t))  # eval mode
  np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)

  def out_and_grad(model):
    """Training-mode outputs and the grads of 0.5 * sum(out**2), in one jitted call."""

    def f(p):
      out, vjp = jax.vjp(lambda q: model.apply({"params": q}, x, t, train=True, rngs=rngs), p)
      return out, vjp(out)[0]

    return jax.jit(f)(variables["params"])

  o_plain, g_plain = out_and_grad(plain)
  o_remat, g_remat = out_and_grad(remat)
  np.testing.assert_allclose(
      np.asarray(o_plain), np.asarray(o_remat), atol=1e-5, rtol=1e-5
  )  # same dropout masks
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3), g_plain, g_remat
  )
  assert float(jnp.abs(g_plain["down_0_block_0"]["conv1"]["kernel"]).max()) > 0


def test_class_conditional():
  cfg = dict(TINY, num_classes=10)
  model = UNet(**cfg)
  x, t = _inputs(2, TINY_HW)
  params = _tiny_params(model)
  assert params["class_emb"]["embedding"].shape == (10, 4 * TINY["ch"])
  n_uncond = count_params(_shape_init(UNet(**TINY), TINY_HW)["params"])
  assert count_params(params) == n_uncond + 10 * 4 * TINY["ch"]
  y = jnp.array([3, 7], jnp.int32)
  fwd = _fwd(model)
  out = np.asarray(fwd({"params": params}, x, t, y))
  np.testing.assert_allclose(
      out, np_unet(params, x, t, y, **cfg), atol=1e-4 * np.abs(out).max(), rtol=1e-4
  )
  out_other = np.asarray(fwd({"params": params}, x, t, jnp.array([4, 7], jnp.int32)))
  assert not np.allclose(out[0], out_other[0], atol=1e-3)  # label changed
  np.testing.assert_allclose(out[1], out_other[1], atol=1e-5)  # label unchanged
