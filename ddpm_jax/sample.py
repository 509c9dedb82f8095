"""Sampling sharded over the local devices: ``--mode=sample``, the training grids and FID's samples.

``--mode=sample`` writes ``workdir/samples/samples_{tag}_n{N}_bs{B}.npz`` (key
'images': uint8 [N, H, W, C]; key 'settings': JSON of how they were drawn; key
'draw': JSON of the count, the batch and the devices) and ``grid_{tag}_n{N}_bs{B}.png``
from the EMA parameters of a checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import builders, errors, files, images, parallel, progress, workdirs
from ddpm_jax.cpu import compile_options
from ddpm_jax.diffusion import guidance, samplers

SAMPLES_DIR = "samples"


def sampling_model_fn(model, params, labels, config, diffusion):
  """The network as the sampler calls it: model_fn(x_t [b, H, W, C], t [b]) -> output.

  labels: [b] int class labels of a conditional model (None otherwise); it is
  guided with ``sampling.guidance_scale`` (one batched call of both branches).
  """
  num_classes = config.model.num_classes
  if not num_classes:
    return builders.make_model_fn(model, params)
  labelled = lambda x, t, y: model.apply({"params": params}, x, t, y)
  return guidance.guided_model_fn(
      labelled, labels, num_classes, config.sampling.guidance_scale, diffusion.learned_variance
  )


def make_p_sample(model, diffusion, config, per_device_batch: int, devices=None):
  """pmap-ed sampler: (params [D...], key [D, 2], labels [D, b] or None) -> images [D, b, H, W, C].

  Images in [-1, 1]. One call walks all steps of ``diffusion`` in a single
  ``lax.scan``, with ``sampling.sampler``; a class-conditional model is guided
  with ``sampling.guidance_scale`` (one batched call of both branches per step).
  With the CPU kernels active it is compiled with
  ``cpu.compile_options.forward_options``. ``devices``: default the local ones.
  """
  s = config.sampling
  shape = (per_device_batch,) + builders.image_shape(config)

  def sample(params, key, labels):
    key = jax.random.fold_in(key, parallel.device_index())
    model_fn = sampling_model_fn(model, params, labels, config, diffusion)
    if s.sampler in builders.DPM_SOLVERS:
      loop = {
          "dpm_solver++": samplers.dpm_solver_sample_loop,
          "dpm_solver++_sde": samplers.dpm_solver_sde_sample_loop,
      }[s.sampler]
      return loop(
          diffusion,
          model_fn,
          shape,
          key,
          num_steps=builders.sampling_steps(config),
          spacing=s.timestep_spacing,
          thresholding=s.thresholding,
      )
    if s.sampler == "ddim":
      return samplers.ddim_sample_loop(
          diffusion, model_fn, shape, key, eta=s.eta, clip_denoised=s.clip_denoised
      )
    return samplers.ancestral_sample_loop(
        diffusion, model_fn, shape, key, clip_denoised=s.clip_denoised
    )

  options = compile_options.forward_options() if model.cpu_kernels else None
  return compile_options.CompiledWithOptions(parallel.pmap(sample, devices), options)


def labels_in_turn(config) -> Optional[Callable[[np.ndarray], np.ndarray]]:
  """Sample index -> label: ``sampling.class_label``, or with -1 the classes in turn (i % K).

  None for an unconditional model.
  """
  k, c = config.model.num_classes, config.sampling.class_label
  if not k:
    return None
  return lambda index: (np.full(index.shape, c) if c >= 0 else index % k).astype(np.int32)


def uniform_labels(config, seed: int) -> Optional[Callable[[np.ndarray], np.ndarray]]:
  """Sample index -> a label drawn uniformly (a pure function of (seed, index)); None if unconditional."""
  k = config.model.num_classes
  if not k:
    return None
  return (
      lambda index: np.random.Generator(np.random.Philox(key=[seed, 1]))
      .integers(0, k, size=int(index.max()) + 1)[index]
      .astype(np.int32)
  )


def generate(
    p_sample,
    replicated_params,
    num_samples: int,
    per_call: int,
    seed: int,
    first_call: int = 0,
    log_progress: bool = True,
    labels: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Draws ``num_samples`` images, ``per_call`` per pmap call: (uint8 [N, H, W, C], labels [N] or None).

  Call i uses key fold_in(PRNGKey(seed), i) (one key per device inside), and
  its row r is sample i * per_call + r, whose label is ``labels(index)``; so
  the images do not depend on how many are drawn in total. Logs images done,
  images/s and the ETA after each call (the first call's rate includes
  compilation, later ones do not).
  """
  d = jax.local_device_count()
  out, out_labels = [], []
  calls = -(-num_samples // per_call)
  drawn = progress.Progress(num_samples, "images", skip_first=True)
  for i in range(first_call, first_call + calls):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    keys = jnp.broadcast_to(key, (d,) + key.shape)
    y = None
    if labels is not None:
      y = labels(i * per_call + np.arange(per_call))
      out_labels.append(y)
      y = y.reshape(d, per_call // d)
    imgs = p_sample(replicated_params, keys, y)
    imgs = np.asarray(jax.device_get(imgs)).reshape((-1,) + imgs.shape[2:])
    out.append(images.to_uint8(imgs))
    if log_progress:
      logging.info("sampled %s", drawn.report(min((i - first_call + 1) * per_call, num_samples)))
  y = np.concatenate(out_labels)[:num_samples] if labels is not None else None
  return np.concatenate(out)[:num_samples], y


def sampler_settings(config) -> dict:
  """What decides the images besides the weights: sampler, steps and its options, guidance, seed.

  Stored in every samples file (key 'settings', JSON) so that eval_fid reuses
  only samples drawn the way the config asks.
  """
  s = config.sampling
  out = dict(sampler=s.sampler, num_timesteps=builders.sampling_steps(config), seed=int(s.seed))
  if s.sampler in builders.DPM_SOLVERS:
    out.update(timestep_spacing=s.timestep_spacing, thresholding=bool(s.thresholding))
  else:
    out.update(
        eta=float(s.eta) if s.sampler == "ddim" else 0.0, clip_denoised=bool(s.clip_denoised)
    )
  if config.model.num_classes:
    out.update(guidance_scale=float(s.guidance_scale), class_label=int(s.class_label))
  return out


def sample_tag(config, step: int) -> str:
  """The name part of a samples file, e.g. ``step{S}_{sampler}{steps}[_eta{e}][_noclip]_seed{s}``.

  Every setting of ``sampler_settings`` that differs from its default is in
  the name (``_logsnr``, ``_thresholded``, ``_w{w}``, ``_class{c}``), so
  samples drawn another way get another file instead of overwriting earlier ones.
  """
  got = sampler_settings(config)
  name = {"dpm_solver++": "dpmpp", "dpm_solver++_sde": "dpmppsde"}.get(
      got["sampler"], got["sampler"]
  )
  tag = f"step{step}_{name}{got['num_timesteps']}"
  if got["sampler"] == "ddim":
    tag += f"_eta{got['eta']:g}"
  if got.get("clip_denoised") is False:
    tag += "_noclip"
  if got.get("timestep_spacing") == "logsnr":
    tag += "_logsnr"
  if got.get("thresholding"):
    tag += "_thresholded"
  if got.get("guidance_scale"):
    tag += f"_w{got['guidance_scale']:g}"
  if got.get("class_label", -1) >= 0:
    tag += f"_class{got['class_label']}"
  return tag + f"_seed{got['seed']}"


def read_settings(npz_file) -> Optional[dict]:
  """The 'settings' dict of an open samples .npz, or None for files without one."""
  if "settings" not in npz_file:
    return None
  return json.loads(str(npz_file["settings"]))


def class_rows(
    imgs: np.ndarray, labels: np.ndarray, max_per_row: int = 16
) -> tuple[np.ndarray, int]:
  """Images regrouped one row per class present: ([R * m, H, W, C], m).

  m is the rarest class's count, at most ``max_per_row``; imgs: [N, H, W, C], labels: [N].
  """
  classes = np.unique(labels)
  m = min([int(np.sum(labels == c)) for c in classes] + [max_per_row])
  rows = [imgs[labels == c][:m] for c in classes]
  return np.concatenate(rows), m


def check_not_replacing(path: str, draw: dict) -> None:
  """Refuses to replace the samples file ``path`` with images drawn another way.

  ``draw`` (count, batch, devices, processes) decides the images together with
  the settings in the file's name; a file drawn the same way holds the same
  images, so only that one may be written again. Raises WorkdirError otherwise.
  """
  if not os.path.exists(path):
    return
  try:
    with np.load(path, allow_pickle=False) as z:
      old = json.loads(str(z["draw"])) if "draw" in z.files else None
  except Exception:  # pylint: disable=broad-except
    old = None
  if old == draw:
    return
  how = lambda d: (
      f"over {d['devices']} devices and {d['processes']} process(es)" if d else "another way"
  )
  raise errors.WorkdirError(
      f"{path} exists, drawn {how(old)}; this run draws {how(draw)}, which gives other "
      "images: move the file away, or draw with its device count (--cpu_devices)"
  )


def write_samples(
    directory: str,
    imgs: np.ndarray,
    tag: str,
    settings: Optional[dict] = None,
    labels: Optional[np.ndarray] = None,
    draw: Optional[dict] = None,
) -> tuple[str, str]:
  """Writes samples_{tag}.npz and grid_{tag}.png; returns their paths.

  The npz holds 'images' (uint8 [N, H, W, C]), 'settings' (JSON), 'draw' (JSON,
  when given) and, for a class-conditional model, 'labels' (int32 [N]); its
  grid then has one row per class.
  """
  npz = os.path.join(directory, f"samples_{tag}.npz")
  png = os.path.join(directory, f"grid_{tag}.png")
  extra = {} if settings is None else {"settings": np.asarray(json.dumps(settings, sort_keys=True))}
  if draw is not None:
    extra["draw"] = np.asarray(json.dumps(draw, sort_keys=True))
  if labels is not None:
    extra["labels"] = np.asarray(labels, np.int32)
  files.savez(npz, images=imgs, **extra)
  if labels is None:
    images.save_grid(png, imgs[:256])
  else:
    grid, per_row = class_rows(imgs, labels)
    images.save_grid(png, grid, ncol=per_row)
  return npz, png


def run_sample(config, workdir: str) -> str:
  """--mode=sample: EMA params of a checkpoint -> workdir/samples/samples_*.npz and grid_*.png.

  The name holds every setting the images depend on (``sample_tag``, the count
  N and the batch B: ``samples_{tag}_n{N}_bs{B}.npz``); a file of that name
  drawn over another number of devices is not replaced (``check_not_replacing``).
  Returns the path of the .npz file (keys 'images', 'settings', 'draw', and
  'labels' for a class-conditional model: ``sampling.class_label`` or the
  classes in turn).
  """
  model, params, step = builders.ema_params(config, workdir)
  s = config.sampling
  d = jax.local_device_count()
  per_call = s.batch_size
  tag = f"{sample_tag(config, step)}_n{s.num_samples}_bs{per_call}"
  if jax.process_count() > 1:
    tag += f"_process{jax.process_index()}"
  draw = dict(
      num_samples=int(s.num_samples),
      batch_size=int(per_call),
      devices=d,
      processes=jax.process_count(),
  )
  check_not_replacing(os.path.join(workdir, SAMPLES_DIR, f"samples_{tag}.npz"), draw)
  workdirs.write_record(config, workdir, "sample")
  diffusion = builders.build_sampling_diffusion(config)
  logging.info(
      "Sampling %d images from the EMA parameters of step %d: %s sampler, %d steps, "
      "%d per call over %d devices",
      s.num_samples,
      step,
      s.sampler,
      builders.sampling_steps(config),
      per_call,
      d,
  )
  p_sample = make_p_sample(model, diffusion, config, per_call // d)
  start = time.time()
  # Each process draws its own share with its own calls (call index offset by process).
  num_local = -(-s.num_samples // jax.process_count())
  calls_per_process = -(-num_local // per_call)
  imgs, labels = generate(
      p_sample,
      parallel.replicate(params),
      num_local,
      per_call,
      s.seed,
      first_call=jax.process_index() * calls_per_process,
      labels=labels_in_turn(config),
  )
  elapsed = time.time() - start
  logging.info(
      "%d images in %.1f s (%.2f images/s, compilation included)",
      len(imgs),
      elapsed,
      len(imgs) / elapsed,
  )
  npz, png = write_samples(
      os.path.join(workdir, SAMPLES_DIR), imgs, tag, sampler_settings(config), labels, draw
  )
  logging.info("Wrote %s and %s", npz, png)
  return npz
