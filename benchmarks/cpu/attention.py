"""The U-Net's self-attention block: ways of writing it, timed against each other.

  python benchmarks/cpu/attention.py [--shapes=16x16x16x64,16x8x8x64,4x16x16x256] [--reps=5]

Every variant computes the same function as ``unet.AttnBlock`` ('library':
GroupNorm, q/k/v projections, softmax(q k^T / sqrt(C)) v, proj_out, residual)
from the same parameters. Each is timed forward + gradients of the input and
of every parameter (as in a train step), pmap-ed over all local devices (one
per core), the variants taking turns; shapes are per device, and the speed-ups
are over the library's block. ``--cpu_kernels`` times the block as the U-Net
with ``model.cpu_kernels`` builds it (GroupNorm by ``unet.group_norm_channels_minor``),
and the variants with that GroupNorm; by default both use Flax's, as the plain
U-Net does. Before timing, each variant's output and
gradients are checked against the library's. Prints a table on stderr and one
JSON line per shape. Default shapes: the 16x16 and 8x8 attention of the
1.1M-parameter benchmark U-Net at 16 images per device, and the CIFAR-10
U-Net's 16x16 attention at 4.
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "shapes",
    "16x16x16x64,16x8x8x64,4x16x16x256",
    "Comma-separated BxHxWxC input shapes per device.",
)
flags.DEFINE_string("variants", "", "Comma-separated variants to time (default: all).")
flags.DEFINE_integer("reps", 5, "Alternating timed rounds per shape.")
flags.DEFINE_integer("calls", 3, "Calls per timed round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")
flags.DEFINE_bool("cpu_kernels", False, "The block (and variants) with the CPU kernels' GroupNorm.")


def variants(cpu_kernels: bool = False):
  """{name: fn(params, x) -> [B, H, W, C]}, params as ``AttnBlock``'s."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top

  def library(p, x):
    return unet.AttnBlock(cpu_kernels=cpu_kernels).apply({"params": p}, x)

  flax_norm = nn.GroupNorm(num_groups=unet.GN_GROUPS, epsilon=unet.GN_EPS, use_fast_variance=False)

  def group_norm(x, scale, bias):  # the library block's GroupNorm
    if cpu_kernels:
      return unet.group_norm_channels_minor(x, scale, bias, unet.GN_GROUPS, unet.GN_EPS)
    return flax_norm.apply({"params": {"scale": scale, "bias": bias}}, x)

  def dense(p, h):
    return h @ p["kernel"] + p["bias"]

  def rows(p, x):
    """GroupNorm(x) as [B*H*W, C] rows."""
    B, H, W, C = x.shape
    return group_norm(x, p["norm"]["scale"], p["norm"]["bias"]).reshape(B * H * W, C)

  def batched_rows(p, x):
    # The block before 2026-11-30: projections over [B, H*W, C], the scale on the logits.
    B, H, W, C = x.shape
    h = group_norm(x, p["norm"]["scale"], p["norm"]["bias"]).reshape(B, H * W, C)
    q, k, v = dense(p["q"], h), dense(p["k"], h), dense(p["v"], h)
    w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * (C**-0.5), axis=-1)
    o = jnp.einsum("bqk,bkc->bqc", w, v)
    return x + dense(p["proj_out"], o).reshape(B, H, W, C)

  def fused_qkv(p, x):
    # q, k and v from one [C, 3C] dot (the scale folded into q's columns).
    B, H, W, C = x.shape
    s = C**-0.5
    kernel = jnp.concatenate([p["q"]["kernel"] * s, p["k"]["kernel"], p["v"]["kernel"]], axis=1)
    bias = jnp.concatenate([p["q"]["bias"] * s, p["k"]["bias"], p["v"]["bias"]])
    qkv = (rows(p, x) @ kernel + bias).reshape(B, H * W, 3 * C)
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k), axis=-1)
    o = jnp.einsum("bqk,bkc->bqc", w, v).reshape(B * H * W, C)
    return x + dense(p["proj_out"], o).reshape(B, H, W, C)

  @jax.custom_vjp
  def core(q, k, v):
    w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k), axis=-1)
    return jnp.einsum("bqk,bkc->bqc", w, v)

  def core_fwd(q, k, v):
    s = jnp.einsum("bqc,bkc->bqk", q, k)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    w = e / jnp.sum(e, axis=-1, keepdims=True)
    return jnp.einsum("bqk,bkc->bqc", w, v), (q, k, v, w)

  def core_bwd(res, do):
    q, k, v, w = res
    dv = jnp.einsum("bqk,bqc->bkc", w, do)
    dw = jnp.einsum("bqc,bkc->bqk", do, v)
    ds = w * (dw - jnp.sum(dw * w, axis=-1, keepdims=True))
    return (jnp.einsum("bqk,bkc->bqc", ds, k), jnp.einsum("bqk,bqc->bkc", ds, q), dv)

  core.defvjp(core_fwd, core_bwd)

  def custom_vjp(p, x):
    # The softmax-attention core with a hand-written backward.
    B, H, W, C = x.shape
    h = rows(p, x)
    q = (dense(p["q"], h) * (C**-0.5)).reshape(B, H * W, C)
    k, v = dense(p["k"], h).reshape(B, H * W, C), dense(p["v"], h).reshape(B, H * W, C)
    o = core(q, k, v).reshape(B * H * W, C)
    return x + dense(p["proj_out"], o).reshape(B, H, W, C)

  def k_transposed(p, x):
    # k made as [B, C, H*W], so that q k^T is a plain [HW, C] x [C, HW] product.
    B, H, W, C = x.shape
    h = rows(p, x)
    q = (dense(p["q"], h) * (C**-0.5)).reshape(B, H * W, C)
    kt = (
        jnp.einsum("bpc,cd->bdp", h.reshape(B, H * W, C), p["k"]["kernel"])
        + p["k"]["bias"][:, None]
    )
    v = dense(p["v"], h).reshape(B, H * W, C)
    w = jax.nn.softmax(jnp.einsum("bqc,bck->bqk", q, kt), axis=-1)
    o = jnp.einsum("bqk,bkc->bqc", w, v).reshape(B * H * W, C)
    return x + dense(p["proj_out"], o).reshape(B, H, W, C)

  return {
      "library": library,
      "batched_rows": batched_rows,
      "fused_qkv": fused_qkv,
      "custom_vjp": custom_vjp,
      "k_transposed": k_transposed,
  }


def main(argv):
  del argv
  bench_setup.use_all_cores(FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top

  impls = variants(FLAGS.cpu_kernels)
  names = FLAGS.variants.split(",") if FLAGS.variants else list(impls)
  if "library" not in names:
    names = ["library"] + names
  d = jax.local_device_count()
  put = jax.pmap(lambda a: a)
  for spec in FLAGS.shapes.split(","):
    shape = tuple(int(s) for s in spec.split("x"))
    c = shape[-1]
    rng = np.random.default_rng(0)
    params = jax.eval_shape(
        unet.AttnBlock(cpu_kernels=FLAGS.cpu_kernels).init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct(shape, np.float32),
    )["params"]
    # Random parameters everywhere (init's proj_out is ~0, which would hide errors).
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape).astype(np.float32) / np.sqrt(c), params
    )
    params["norm"]["scale"] = 1 + 0.1 * params["norm"]["scale"]
    rep = lambda a: put(np.broadcast_to(a, (d,) + a.shape))  # pylint: disable=unnecessary-lambda-assignment
    p_params = jax.tree_util.tree_map(rep, params)
    x = put(rng.normal(size=(d,) + shape).astype(np.float32))
    dy = put(rng.normal(size=(d,) + shape).astype(np.float32))

    progs, outs = {}, {}
    for n in names:
      fn = impls[n]

      def train_like(p, x, dy, fn=fn):
        y, vjp = jax.vjp(fn, p, x)
        return y, vjp(dy)

      compiled = jax.pmap(train_like).lower(p_params, x, dy).compile()
      outs[n] = jax.device_get(compiled(p_params, x, dy))
      progs[n] = {"train": compiled}
    ref = jax.tree_util.tree_leaves_with_path(outs["library"])
    scale = max(float(np.max(np.abs(a))) for _, a in ref)
    for n in names:
      for (path, a), b in zip(ref, jax.tree_util.tree_leaves(outs[n])):
        # k's bias has a zero gradient in exact arithmetic (softmax ignores a
        # constant per row), so errors are relative to the largest leaf's scale.
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-3 * scale)
        if err > 1e-4:
          raise AssertionError(
              f"{n} differs from unet.AttnBlock at {spec} in "
              f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"
          )
    ms = bench_setup.median_ms_alternating(progs, (p_params, x, dy), FLAGS.reps, FLAGS.calls)
    base = ms["library_train_ms"]
    for n in names:
      v = ms[f"{n}_train_ms"]
      print(
          f"{spec:>16} {n:>14}: {v:8.2f} ms forward + gradients, {base / v:5.2f}x", file=sys.stderr
      )
    print(json.dumps(dict(shape=spec, devices=d, cpu_kernels=FLAGS.cpu_kernels, **ms)))


if __name__ == "__main__":
  app.run(main)
