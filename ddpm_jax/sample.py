"""Sampling sharded over the local devices: ``--mode=sample``, the training grids and FID's samples.

``--mode=sample`` writes ``workdir/samples/samples_{tag}.npz`` (key 'images':
uint8 [N, H, W, C]; key 'settings': JSON of how they were drawn) and
``grid_{tag}.png`` from the EMA parameters of a checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import files, images, workdirs
from ddpm_jax.cpu import compile_options
from ddpm_jax.diffusion import samplers
from ddpm_jax.training import checkpoint
from ddpm_jax.training import state as state_lib
from ddpm_jax.training.state import AXIS

SAMPLES_DIR = "samples"


def make_p_sample(model, diffusion, config, per_device_batch: int):
  """pmap-ed sampler: (params [D...], key [D, 2]) -> images [D, b, H, W, C] in [-1, 1].

  One call walks all steps of ``diffusion`` in a single ``lax.scan``. With the
  CPU kernels active it is compiled with ``cpu.compile_options.forward_options``.
  """
  s = config.sampling
  shape = (per_device_batch,) + state_lib.image_shape(config)

  def sample(params, key):
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
    model_fn = state_lib.make_model_fn(model, params)
    if s.sampler == "ddim":
      return samplers.ddim_sample_loop(
          diffusion, model_fn, shape, key, eta=s.eta, clip_denoised=s.clip_denoised
      )
    return samplers.ancestral_sample_loop(
        diffusion, model_fn, shape, key, clip_denoised=s.clip_denoised
    )

  options = compile_options.forward_options() if model.cpu_kernels else None
  return compile_options.CompiledWithOptions(jax.pmap(sample, axis_name=AXIS), options)


def generate(
    p_sample,
    replicated_params,
    num_samples: int,
    per_call: int,
    seed: int,
    first_call: int = 0,
    log_progress: bool = True,
) -> np.ndarray:
  """Draws ``num_samples`` images as uint8 [N, H, W, C], ``per_call`` per pmap call.

  Call i uses key fold_in(PRNGKey(seed), i) (one key per device inside), so the
  images do not depend on how many are drawn in total. Logs images done,
  images/s and the ETA after each call (the first includes compilation).
  """
  d = jax.local_device_count()
  out = []
  calls = -(-num_samples // per_call)
  start = time.time()
  for i in range(first_call, first_call + calls):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    keys = jnp.broadcast_to(key, (d,) + key.shape)
    imgs = p_sample(replicated_params, keys)
    imgs = np.asarray(jax.device_get(imgs)).reshape((-1,) + imgs.shape[2:])
    out.append(images.to_uint8(imgs))
    if log_progress:
      done = (i - first_call + 1) * per_call
      rate = done / (time.time() - start)
      logging.info(
          "sampled %d/%d images (%.2f images/s, ETA %.0f s)",
          min(done, num_samples),
          num_samples,
          rate,
          max(num_samples - done, 0) / rate,
      )
  return np.concatenate(out)[:num_samples]


def sampler_settings(config, num_timesteps: int) -> dict:
  """What decides the images besides the weights: sampler, steps, eta, clipping, seed.

  Stored in every samples file (key 'settings', JSON) so that eval_fid reuses
  only samples drawn the way the config asks.
  """
  s = config.sampling
  return dict(
      sampler=s.sampler,
      num_timesteps=int(num_timesteps),
      eta=float(s.eta) if s.sampler == "ddim" else 0.0,
      clip_denoised=bool(s.clip_denoised),
      seed=int(s.seed),
  )


def sample_tag(config, step: int, num_timesteps: int) -> str:
  """The name part of a samples file: ``step{S}_{sampler}{steps}[_eta{e}][_noclip]_seed{s}``.

  Every setting of ``sampler_settings`` is in the name (eta only for DDIM,
  ``_noclip`` only when clipping is off), so samples drawn another way get
  another file instead of overwriting the earlier ones.
  """
  s = sampler_settings(config, num_timesteps)
  tag = f"step{step}_{s['sampler']}{s['num_timesteps']}"
  if s["sampler"] == "ddim":
    tag += f"_eta{s['eta']:g}"
  if not s["clip_denoised"]:
    tag += "_noclip"
  return tag + f"_seed{s['seed']}"


def read_settings(npz_file) -> Optional[dict]:
  """The 'settings' dict of an open samples .npz, or None for files without one."""
  if "settings" not in npz_file:
    return None
  return json.loads(str(npz_file["settings"]))


def write_samples(
    directory: str, imgs: np.ndarray, tag: str, settings: Optional[dict] = None
) -> tuple[str, str]:
  """Writes samples_{tag}.npz (key 'images', uint8 NHWC; 'settings', JSON) and grid_{tag}.png."""
  npz = os.path.join(directory, f"samples_{tag}.npz")
  png = os.path.join(directory, f"grid_{tag}.png")
  extra = {} if settings is None else {"settings": np.asarray(json.dumps(settings, sort_keys=True))}
  files.savez(npz, images=imgs, **extra)
  images.save_grid(png, imgs[:256])
  return npz, png


def run_sample(config, workdir: str) -> str:
  """--mode=sample: EMA params of a checkpoint -> workdir/samples/samples_*.npz and grid_*.png.

  Returns the path of the .npz file (key 'images': uint8 [N, H, W, C]).
  """
  model, params, step = checkpoint.restore_ema(config, workdir)
  workdirs.write_record(config, workdir, "sample")
  diffusion = state_lib.build_sampling_diffusion(config)
  s = config.sampling
  d = jax.local_device_count()
  per_call = s.batch_size
  logging.info(
      "Sampling %d images from the EMA parameters of step %d: %s sampler, %d steps, "
      "%d per call over %d devices",
      s.num_samples,
      step,
      s.sampler,
      diffusion.num_timesteps,
      per_call,
      d,
  )
  p_sample = make_p_sample(model, diffusion, config, per_call // d)
  start = time.time()
  # Each process draws its own share with its own calls (call index offset by process).
  num_local = -(-s.num_samples // jax.process_count())
  calls_per_process = -(-num_local // per_call)
  imgs = generate(
      p_sample,
      state_lib.replicate(params),
      num_local,
      per_call,
      s.seed,
      first_call=jax.process_index() * calls_per_process,
  )
  elapsed = time.time() - start
  logging.info(
      "%d images in %.1f s (%.2f images/s, compilation included)",
      len(imgs),
      elapsed,
      len(imgs) / elapsed,
  )
  tag = sample_tag(config, step, diffusion.num_timesteps)
  if jax.process_count() > 1:
    tag += f"_process{jax.process_index()}"
  npz, png = write_samples(
      os.path.join(workdir, SAMPLES_DIR),
      imgs,
      tag,
      sampler_settings(config, diffusion.num_timesteps),
  )
  logging.info("Wrote %s and %s", npz, png)
  return npz
