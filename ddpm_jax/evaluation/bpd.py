"""``--mode=eval_bpd``: the variational bound in bits/dim (Ho et al. 2020, Table 2 and Fig. 5).

Evaluates the EMA parameters of the newest checkpoint (or of
``sampling.checkpoint_step``) on ``data.eval_split`` and writes into
``workdir/eval``:

  bpd_step{S}.json        the summary (keys: see ``run_eval_bpd``)
  bpd_step{S}_terms.npz   per-timestep mean terms of the bound, the MSE of the
                          predicted x0 (the rate/distortion view), and the
                          per-example results
  bpd_step{S}_partial.npz while it runs: the results so far; a restarted run
                          continues after the last finished batch, and the
                          file is deleted at the end.

Randomness: example ``i`` of the split (its row in the evaluated prefix) uses
the key ``fold_in(PRNGKey(eval.seed), i)`` for all its q(x_t|x0) draws, so the
numbers do not depend on the batch size, the number of devices, or where a run
was interrupted. A class-conditional model is evaluated on each example's label.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import time
from typing import Optional

from absl import logging
import jax
import numpy as np

from ddpm_jax import builders, errors, files, parallel, progress, workdirs
from ddpm_jax.cpu import compile_options
from ddpm_jax.data import pipeline, sources

EVAL_DIR = "eval"
_EXAMPLE_FIELDS = ("index", "total", "prior", "decoder", "kl")


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR)


def example_bpd_key(seed: int, index) -> jax.Array:
  """The key of example ``index`` of the evaluated split for ``calc_bpd_loop``."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def make_p_bpd(model, diffusion, seed: int, clip_denoised: bool, devices=None):
  """pmap-ed bound: (params [D...], batch, index [D, b] int32) -> dict of [D, b, ...].

  batch: {'image': x0 [D, b, H, W, C]} (+ 'label' [D, b]). Each example runs
  ``diffusion.calc_bpd_loop`` on its own with the key ``example_bpd_key(seed,
  index)`` (vmapped, so the network still sees batches of b). Returns
  total_bpd, prior_bpd [D, b] and terms_bpd, xstart_mse [D, b, T].
  ``devices``: default the local ones.
  """
  base_key = jax.random.PRNGKey(seed)

  def one_device(params, batch, index):
    def one(xi, yi, i):
      labels = None if yi is None else yi[None]
      model_fn = builders.make_model_fn(model, params, labels=labels)
      out = diffusion.calc_bpd_loop(
          model_fn, xi[None], jax.random.fold_in(base_key, i), clip_denoised=clip_denoised
      )
      return jax.tree.map(lambda a: a[0], out)

    return jax.vmap(one)(batch["image"], batch.get("label"), index)

  options = compile_options.forward_options() if model.cpu_kernels else None
  return compile_options.CompiledWithOptions(parallel.pmap(one_device, devices), options)


class _Totals:
  """The per-example results and the per-timestep sums of the examples evaluated so far."""

  def __init__(self, T: int, partial: Optional[dict] = None):
    if partial is None:
      self.examples = {k: [] for k in _EXAMPLE_FIELDS}
      self.terms_sum, self.mse_sum = np.zeros(T), np.zeros(T)
    else:
      self.examples = {k: [partial[k]] for k in _EXAMPLE_FIELDS}
      self.terms_sum = partial["terms_sum"].astype(np.float64)
      self.mse_sum = partial["mse_sum"].astype(np.float64)

  def add(self, flat: dict) -> None:
    """Adds one gathered batch (leaves [N, ...]; the mask picks the real examples)."""
    keep = flat["mask"].astype(bool)
    terms = flat["terms_bpd"][keep].astype(np.float64)
    self.examples["index"].append(flat["index"][keep].astype(np.int64))
    self.examples["total"].append(flat["total_bpd"][keep].astype(np.float64))
    self.examples["prior"].append(flat["prior_bpd"][keep].astype(np.float64))
    self.examples["decoder"].append(terms[:, 0])
    self.examples["kl"].append(terms[:, 1:].sum(axis=1))
    self.terms_sum = self.terms_sum + terms.sum(axis=0)
    self.mse_sum = self.mse_sum + flat["xstart_mse"][keep].astype(np.float64).sum(axis=0)

  def arrays(self) -> dict:
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in self.examples.items()}

  def save_partial(self, path: str, fingerprint: str, next_batch: int) -> None:
    files.savez(
        path,
        fingerprint=np.array(fingerprint),
        next_batch=np.int64(next_batch),
        terms_sum=self.terms_sum,
        mse_sum=self.mse_sum,
        **self.arrays(),
    )


def _load_partial(path: str, fingerprint: str, T: int) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      got = {k: np.asarray(z[k]) for k in z.files}
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Ignoring unreadable partial bits/dim file %s (%s)", path, e)
    return None
  if str(got.get("fingerprint", "")) != fingerprint or got["terms_sum"].shape != (T,):
    logging.warning(
        "Ignoring %s: it belongs to another evaluation setting (%s, now %s)",
        path,
        got.get("fingerprint"),
        fingerprint,
    )
    return None
  return got


def _summary(config, totals: _Totals, step: int, n: int, T: int, **extra) -> tuple[dict, dict]:
  """(the JSON summary, the arrays of the terms file) of a finished evaluation."""
  ex = totals.arrays()
  count = ex["total"].size
  mean_terms, mean_mse = totals.terms_sum / count, totals.mse_sum / count
  prior = float(ex["prior"].mean())
  # Bits/dim received once x_t (array index t) is known: L_T + sum_{s > t} L_s.
  rate = prior + (np.cumsum(mean_terms[::-1])[::-1] - mean_terms)
  summary = dict(
      step=step,
      dataset=config.data.dataset,
      num_examples=int(count),
      num_timesteps=T,
      total_bpd=float(ex["total"].mean()),
      total_bpd_stderr=float(ex["total"].std(ddof=1) / math.sqrt(count)) if count > 1 else 0.0,
      prior_bpd=prior,
      decoder_bpd=float(ex["decoder"].mean()),
      kl_bpd=float(ex["kl"].mean()),
      **extra,
  )
  arrays = dict(
      terms_bpd=mean_terms,
      xstart_mse=mean_mse,
      rate_bpd=rate,
      distortion_rmse=np.sqrt(mean_mse) * 127.5,
      prior_bpd=np.float64(prior),
      example_index=ex["index"],
      example_total_bpd=ex["total"],
      example_prior_bpd=ex["prior"],
      example_decoder_bpd=ex["decoder"],
      example_kl_bpd=ex["kl"],
  )
  return summary, arrays


def run_eval_bpd(config, workdir: str) -> dict:
  """--mode=eval_bpd: the variational bound (bits/dim) of the EMA model on ``data.eval_split``.

  Uses the first ``eval.num_examples`` examples (all when 0) in batches of
  ``eval.batch_size``, sharded over the local devices (and processes); padding
  of the last batch is masked out. ``sampling.clip_denoised`` is used for the
  predicted x0 of each term, as in the paper's evaluation. Resumable.

  Writes and returns (workdir/eval/bpd_step{S}.json) a dict with:
    step, split, num_examples, num_timesteps, total_bpd (mean of the bound),
    total_bpd_stderr, prior_bpd (L_T), decoder_bpd (L_0, the t=0 term), kl_bpd
    (sum of the KL terms L_1..L_{T-1}), clip_denoised, seed, batch_size,
    num_batches, resumed_from_batch (batches taken from a partial file),
    batches_computed (by this call), elapsed_s, images_per_s, terms_file.
  The terms file (bpd_step{S}_terms.npz) holds: terms_bpd [T], xstart_mse [T]
  (means over examples, index t = array timestep, the decoder at 0),
  rate_bpd [T] (L_T + sum_{s>t} L_s: bits/dim received when x_t is known),
  distortion_rmse [T] (RMSE of the predicted x0 from x_t on the [0, 255]
  scale), prior_bpd (scalar), and per example: example_index, example_total_bpd,
  example_prior_bpd, example_decoder_bpd, example_kl_bpd.
  """
  start_time = time.time()
  sources.check_eval_split(config.data)
  ev, split, seed = config.eval, config.data.eval_split, int(config.eval.seed)
  batch_size = int(ev.batch_size)
  pcount, pindex, d = jax.process_count(), jax.process_index(), jax.local_device_count()
  if batch_size % (pcount * d):
    raise errors.ConfigError(
        f"config.eval.batch_size={batch_size} is invalid: must be divisible by "
        f"process_count * local_device_count = {pcount * d}"
    )
  model, params, step = builders.ema_params(config, workdir)
  diffusion = builders.build_diffusion(config)
  T = diffusion.num_timesteps
  clip = bool(config.sampling.clip_denoised)
  conditional = bool(config.model.num_classes)

  streaming = (
      config.data.dataset in sources.TFDS_DATASETS
      and not config.data.in_memory
      and not ev.num_examples
  )
  data = None
  if streaming:
    n = sources.num_examples(config.data, split)
  else:
    data = sources.load_split(config.data, split, max_examples=ev.num_examples or None)
    if conditional:
      pipeline.require_labels(config.data, data, config.model.num_classes)
    n = int(data.images.shape[0])
  workdirs.write_record(config, workdir, "eval_bpd")
  num_batches = -(-n // batch_size)
  out_dir = eval_dir(workdir)
  paths = {
      k: os.path.join(out_dir, f"bpd_step{step}{suffix}")
      for k, suffix in (("json", ".json"), ("terms", "_terms.npz"), ("partial", "_partial.npz"))
  }
  fingerprint = json.dumps(
      dict(
          step=step,
          split=split,
          n=n,
          batch_size=batch_size,
          T=T,
          seed=seed,
          clip=clip,
          processes=pcount,
          dataset=config.data.dataset,
          image_size=config.data.image_size,
      ),
      sort_keys=True,
  )

  partial = _load_partial(paths["partial"], fingerprint, T)
  first_batch = 0 if partial is None else int(partial["next_batch"])
  if pcount > 1:
    # Process 0 writes the partial file; every process must start at its batch (lock-step).
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    chief_first = int(multihost_utils.broadcast_one_to_all(np.int32(first_batch)))
    if chief_first != first_batch:  # this process cannot see process 0's partial file
      first_batch, partial = chief_first, None
  totals = _Totals(T, partial)
  if first_batch:
    logging.info(
        "Resuming bits/dim from %s: %d/%d batches done", paths["partial"], first_batch, num_batches
    )
  logging.info(
      "Bits/dim of the EMA parameters of step %d on %s split %r: %d examples, %d "
      "batches of %d over %d devices x %d processes, T=%d",
      step,
      config.data.dataset,
      split,
      n,
      num_batches,
      batch_size,
      d,
      pcount,
      T,
  )

  per_process = batch_size // pcount
  if streaming:
    batches = pipeline.create_eval_iterator(
        config.data, batch_size, split=split, with_labels=conditional
    )
    batches = itertools.islice(batches, first_batch, num_batches)
  else:
    rest = sources.Split(
        data.images[first_batch * batch_size :],
        None if data.labels is None else data.labels[first_batch * batch_size :],
    )
    batches = pipeline.create_eval_iterator(
        config.data, batch_size, data=rest, with_labels=conditional
    )
  indices = []  # this process's example indices of the batches in flight, [D, b] each

  def device_items():
    for k, batch in enumerate(batches, start=first_batch):
      index = (
          k * batch_size + pindex * per_process + np.arange(per_process, dtype=np.int32)
      ).reshape(d, per_process // d)
      indices.append((k, index, batch.pop("mask")))
      yield batch, index

  p_bpd = make_p_bpd(model, diffusion, seed, clip)
  p_params = parallel.replicate(params)
  batches_computed = 0
  # The first batch's rate includes compilation, later ones do not.
  examples = progress.Progress(n, "images", done=min(first_batch * batch_size, n), skip_first=True)
  for batch, index_dev in parallel.prefetch_to_device(device_items(), 2):
    k, index, mask = indices.pop(0)
    got = dict(jax.device_get(p_bpd(p_params, batch, index_dev)), index=index, mask=mask)
    got = parallel.allgather(got)  # [P, D, b, ...]
    totals.add({key: v.reshape((-1,) + v.shape[3:]) for key, v in got.items()})
    batches_computed += 1
    if pindex == 0:
      totals.save_partial(paths["partial"], fingerprint, k + 1)
    done = np.concatenate(totals.examples["total"])
    logging.info(
        "bits/dim batch %d/%d: running mean %.4f; %s",
        k + 1,
        num_batches,
        float(done.mean()),
        examples.report(min((k + 1) * batch_size, n)),
    )

  count = totals.arrays()["total"].size
  if count != n:
    if pindex == 0:
      raise RuntimeError(f"evaluated {count} examples, expected {n}")
    logging.info(
        "bits/dim: process %d resumed without process 0's partial file; the "
        "results are those of process 0",
        pindex,
    )
    return dict(step=step, split=split, num_examples=n, results_on_process=0)
  elapsed = time.time() - start_time
  result, arrays = _summary(
      config,
      totals,
      step,
      n,
      T,
      split=split,
      clip_denoised=clip,
      seed=seed,
      batch_size=batch_size,
      num_batches=num_batches,
      resumed_from_batch=first_batch,
      batches_computed=batches_computed,
      elapsed_s=elapsed,
      images_per_s=(batches_computed * batch_size / elapsed) if elapsed > 0 else 0.0,
      terms_file=paths["terms"],
  )
  if pindex == 0:
    files.savez(paths["terms"], **arrays)
    files.write_json(paths["json"], result)
    if os.path.exists(paths["partial"]):
      os.remove(paths["partial"])
    for stale in glob.glob(glob.escape(os.path.join(out_dir, ".")) + "*.tmp*"):
      os.remove(stale)  # temporary files of a run killed while writing
  logging.info(
      "bits/dim at step %d: %.4f (prior %.4f + decoder %.4f + KL terms %.4f) over %d "
      "examples; wrote %s",
      step,
      result["total_bpd"],
      result["prior_bpd"],
      result["decoder_bpd"],
      result["kl_bpd"],
      count,
      paths["json"],
  )
  return result
