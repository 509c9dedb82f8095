"""The paper's qualitative figures from a trained model (Ho et al. 2020, Figs. 6 and 8/9).

run_figures(config, workdir) writes, for the EMA parameters of the newest
checkpoint (or ``sampling.checkpoint_step``):

* ``workdir/figures/progressive_step{S}.png`` -- progressive generation: the
  predicted x0 while ancestral sampling (Algorithm 2, all T steps) walks from
  x_T to x_0. One row per sample; the columns are t = T-1, then every
  T/K-th step down to t = 0 (``timesteps`` in the returned dict; array
  convention, index 0 is the paper's t = 1).
* ``workdir/figures/interpolation_step{S}.png`` -- interpolation (Sec. 4.3):
  two eval-split images x0, x0' are diffused to x_t, x_t' with the *same* noise
  (t = T/2 by default: the paper's 500 of 1000), the latents are mixed
  x_t(lambda) = (1 - lambda) x_t + lambda x_t', and each mixture is decoded by
  the reverse process from t down to 0 with the same fixed noise for every
  lambda. One row per pair; columns: x0, lambda = 0, 0.1, ..., 1, x0'.

Tiles are enlarged by pixel repetition to at least 32 pixels and separated by
1-pixel white lines (``images.save_grid``), so a grid of R x C tiles of side H
is (R*(H*u+1)+1, C*(H*u+1)+1) pixels, u = ceil(32 / H).

Config fields: ``eval.figure_rows`` (samples and pairs), ``eval.figure_columns``
(progressive steps), ``eval.interp_t`` (0: T/2; the paper's 1-based t),
``eval.interp_lambdas``, ``eval.seed``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import builders, errors
from ddpm_jax import images as image_lib
from ddpm_jax import workdirs
from ddpm_jax.data import sources
from ddpm_jax.diffusion import samplers
from ddpm_jax.diffusion.gaussian import GaussianDiffusion

FIGURES_DIR = "figures"


def _return_every(T: int, columns: int) -> int:
  """The largest K <= T / columns that divides T (so the trajectory has >= columns points)."""
  k = max(1, T // max(1, columns))
  while T % k:
    k -= 1
  return k


def progressive_generation(
    diffusion: GaussianDiffusion,
    model_fn,
    shape: Sequence[int],
    key: jax.Array,
    columns: int = 10,
    clip_denoised: bool = True,
):
  """Predicted x0 along one ancestral sampling run (the paper's Fig. 6).

  Args:
    diffusion: the process (all T steps for the paper's figure).
    model_fn: (x_t, t) -> network output.
    shape: (B, H, W, C).
    key: PRNG key of ``sampling.ancestral_sample_loop`` (x_T and step noise).
    columns: about how many points of the trajectory (besides t = T-1).
  Returns:
    (pred_x0 [B, 1 + T/K, H, W, C], timesteps [1 + T/K] int, x0 [B, H, W, C]):
    pred_x0[:, 0] is the prediction from x_T itself (t = T-1); then the
    predictions at the end of each chunk of K steps, down to t = 0.
  """
  T = diffusion.num_timesteps
  k = _return_every(T, columns)
  x0, traj = samplers.ancestral_sample_loop(
      diffusion, model_fn, shape, key, clip_denoised=clip_denoised, return_every=k
  )
  # x_T as the loop draws it, and the prediction from it.
  x_T = jax.random.normal(jax.random.fold_in(key, T), shape)
  t_last = jnp.full((shape[0],), T - 1, jnp.int32)
  first = diffusion.p_mean_variance(
      diffusion.call_model(model_fn, x_T, t_last), x_T, t_last, clip_denoised=clip_denoised
  )["pred_xstart"]
  preds = jnp.concatenate([first[None], traj["pred_xstart"]], axis=0)  # [1 + T/K, B, ...]
  ts = jnp.concatenate([jnp.array([T - 1], jnp.int32), traj["t"]])
  return jnp.swapaxes(preds, 0, 1), ts, x0


def interpolate(
    diffusion: GaussianDiffusion,
    model_fn,
    x0_a: jax.Array,
    x0_b: jax.Array,
    t: int,
    lambdas: jax.Array,
    key: jax.Array,
    clip_denoised: bool = True,
):
  """Latent interpolation of the paper's Sec. 4.3 (Figs. 8, 9).

  Args:
    x0_a, x0_b: [P, H, W, C] pairs of images in [-1, 1].
    t: array timestep of the latents (t = 499 is the paper's t = 500 of 1000).
    lambdas: [L] mixing weights in [0, 1].
    key: pair p uses fold_in(key, p): its diffusion noise eps (the same for x0
      and x0') and the reverse-process noise (the same for every lambda).
  Returns: [P, L, H, W, C] decoded images.
  """
  P = x0_a.shape[0]
  L = lambdas.shape[0]
  img_shape = x0_a.shape[1:]
  pair_keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(jnp.arange(P))
  eps = jax.vmap(
      lambda k: jax.random.normal(jax.random.fold_in(k, diffusion.num_timesteps), img_shape)
  )(pair_keys)
  tt = jnp.full((P,), t, jnp.int32)
  xt_a = diffusion.q_sample(x0_a, tt, eps)
  xt_b = diffusion.q_sample(x0_b, tt, eps)
  lam = lambdas.reshape((1, L) + (1,) * len(img_shape))
  mixed = (1.0 - lam) * xt_a[:, None] + lam * xt_b[:, None]  # [P, L, ...]

  def noise_fn(s):
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, s), img_shape))(pair_keys)
    return jnp.broadcast_to(z[:, None], (P, L) + img_shape).reshape((P * L,) + img_shape)

  out = samplers.ancestral_from(
      diffusion,
      model_fn,
      mixed.reshape((P * L,) + img_shape),
      t,
      noise_fn,
      clip_denoised=clip_denoised,
  )
  return out.reshape((P, L) + img_shape)


def save_tile_grid(path: str, tiles_uint8: np.ndarray) -> tuple[int, int]:
  """Saves [R, C, H, W, ch] uint8 tiles as a PNG grid (R rows, C columns); returns (R, C)."""
  r, c = tiles_uint8.shape[:2]
  image_lib.save_grid(path, tiles_uint8.reshape((r * c,) + tiles_uint8.shape[2:]), ncol=c)
  return r, c


def run_figures(config, workdir: str, num_rows: Optional[int] = None) -> dict:
  """Writes the progressive-generation and interpolation PNGs; returns what it wrote.

  Returns a dict: step, progressive (path), progressive_timesteps (array
  timesteps of the columns), interpolation (path), interp_t (array timestep
  of the latents), lambdas, rows, tile_size.
  """
  ev = config.eval
  rows = int(num_rows or ev.figure_rows)
  columns, num_lambdas, seed = int(ev.figure_columns), int(ev.interp_lambdas), int(ev.seed)
  clip = bool(config.sampling.clip_denoised)
  model, params, step = builders.ema_params(config, workdir)
  workdirs.write_record(config, workdir, "figures")
  diffusion = builders.build_diffusion(config)  # the full T-step process, as in the paper
  T = diffusion.num_timesteps
  interp_t = int(ev.interp_t) or max(1, round(T / 2))  # the paper's 1-based t
  interp_t = min(interp_t, T) - 1  # array index
  out_dir = os.path.join(workdir, FIGURES_DIR)
  shape = (rows, config.data.image_size, config.data.image_size, config.data.channels)
  key = jax.random.PRNGKey(seed)

  k = config.model.num_classes
  row_labels = jnp.arange(rows, dtype=jnp.int32) % k if k else None  # classes in turn

  @jax.jit
  def progressive(params, key):
    model_fn = builders.make_model_fn(model, params, labels=row_labels)
    return progressive_generation(diffusion, model_fn, shape, key, columns, clip)

  preds, ts, _ = jax.device_get(progressive(params, jax.random.fold_in(key, 0)))
  prog_path = os.path.join(out_dir, f"progressive_step{step}.png")
  save_tile_grid(prog_path, image_lib.to_uint8(preds))
  ts = [int(t) for t in ts]  # plain ints in the log, not np.int32(99)
  logging.info("Wrote %s (%d samples x %d timesteps %s)", prog_path, rows, len(ts), ts)

  split = sources.load_split(config.data, config.data.eval_split, max_examples=2 * rows)
  images = split.images[: 2 * rows]
  if images.shape[0] < 2 * rows:
    raise errors.DataError(
        f"the eval split has {images.shape[0]} images, {2 * rows} needed for "
        f"{rows} interpolation pairs"
    )
  x = image_lib.scale_images(images)
  lambdas = np.linspace(0.0, 1.0, num_lambdas, dtype=np.float32)

  # A conditional model decodes each pair's mixtures with the first image's label.
  pair_labels = None
  if k:
    pair_labels = np.repeat(np.asarray(split.labels[: 2 * rows : 2], np.int32), num_lambdas)

  @jax.jit
  def interp(params, xa, xb, lambdas, key):
    model_fn = builders.make_model_fn(model, params, labels=pair_labels)
    return interpolate(diffusion, model_fn, xa, xb, interp_t, lambdas, key, clip)

  mixed = np.asarray(
      jax.device_get(interp(params, x[0::2], x[1::2], lambdas, jax.random.fold_in(key, 1)))
  )
  tiles = np.concatenate(
      [images[0::2, None], image_lib.to_uint8(mixed), images[1::2, None]], axis=1
  )  # [P, 1 + L + 1, H, W, C]
  interp_path = os.path.join(out_dir, f"interpolation_step{step}.png")
  save_tile_grid(interp_path, tiles)
  logging.info(
      "Wrote %s (%d pairs; x0, lambda=%s, x0'; latents at t=%d of %d)",
      interp_path,
      rows,
      [round(float(v), 3) for v in lambdas],
      interp_t + 1,
      T,
  )
  return dict(
      step=step,
      progressive=prog_path,
      progressive_timesteps=ts,
      interpolation=interp_path,
      interp_t=interp_t,
      lambdas=[float(v) for v in lambdas],
      rows=rows,
      tile_size=int(config.data.image_size),
  )
