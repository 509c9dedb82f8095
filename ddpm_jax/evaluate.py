"""Evaluation: the variational bound in bits/dim, FID and Inception Score, the paper's figures.

  python main.py --config=configs/cifar10.py --workdir=DIR --mode=eval_bpd
  python main.py --config=configs/cifar10.py --workdir=DIR --mode=eval_fid
  python -m ddpm_jax.evaluate --config=configs/cifar10.py --stats_only [--stats_dir=DIR]

Both modes evaluate the EMA parameters of the newest checkpoint in
``workdir/checkpoints`` (or of ``config.sampling.checkpoint_step``) and write
into ``workdir/eval``:

``--mode=eval_bpd`` (Table 2 / Fig. 5 of Ho et al. 2020)
  bpd_step{S}.json        summary (keys: see ``run_eval_bpd``)
  bpd_step{S}_terms.npz   per-timestep mean terms of the bound and MSE of the
                          predicted x0 (the rate/distortion view), and the
                          per-example results
  bpd_step{S}_partial.npz while it runs: the results so far; a restarted run
                          continues after the last finished batch, and the
                          file is deleted at the end.
  Randomness: example ``i`` of the split (its row in the evaluated prefix)
  uses the key ``fold_in(PRNGKey(eval.seed or 0), i)`` for all its q(x_t|x0)
  draws, so the numbers do not depend on the batch size, the number of
  devices, or where a run was interrupted.

``--mode=eval_fid`` (Table 1)
  fid_step{S}.json        FID against the train and the eval split, IS.
  stats_*.npz             cached reference statistics (or in ``stats_dir``).
  The samples come from ``workdir/samples/samples_{tag}[_fid{N}].npz`` when such
  a file holds enough images drawn with the config's sampler settings (e.g. from
  --mode=sample); otherwise they are drawn in resumable chunks
  (``workdir/eval/fid_chunks_*``) and written to
  ``workdir/samples/samples_{tag}_fid{N}.npz`` + a grid. The tag
  (``generate.sample_tag``) names the step, the sampler and every setting of
  the draw, so other settings never overwrite earlier samples.

Feature extractor: the digits MLP (``ddpm_jax.digits_classifier``) for
``data.dataset == 'digits'``, else the Inception-v3 FID graph
(``ddpm_jax.models.inception``; weights from ``eval.inception_weights``, or
$DDPM_JAX_INCEPTION_WEIGHTS, or its default path; a missing file raises
``InceptionWeightsNotFoundError``, a ``FileNotFoundError`` saying where to get
it).
"""

from __future__ import annotations

import collections
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Any, Iterator, Optional

from absl import logging
import jax
import numpy as np

from ddpm_jax import compile_options, generate, input_pipeline, metrics, train
from ddpm_jax.train import AXIS

EVAL_DIR = "eval"
STATS_DIR_ENV_VAR = "DDPM_JAX_STATS_DIR"
# Reference statistics use at most this many examples of a split (all of CIFAR-10's
# 50k training images; the first 50k of the large LSUN splits).
MAX_REFERENCE_EXAMPLES = 50_000
IS_SPLITS = 10


# ----------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------

def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR)


def _is_chief() -> bool:
  return jax.process_index() == 0


def atomic_savez(path: str, **arrays) -> None:
  """np.savez to ``path`` (exactly that name) via a temporary file and a rename.

  A reader (or a restarted run after SIGKILL) sees either the old or the new
  file, never a truncated one.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _check_unconditional(config) -> None:
  if config.model.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes}: evaluation of "
                     "class-conditional models is not supported (no labels are fed)")


def restore_ema(config, workdir: str):
  """(model, EMA params on the host, checkpoint step) of ``sampling.checkpoint_step``.

  Raises FileNotFoundError when the workdir holds no (such) checkpoint.
  """
  from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  model = train.build_model(config)
  target = jax.eval_shape(functools.partial(train.init_params, model, config),
                          jax.random.PRNGKey(0))
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {checkpoint.checkpoint_dir(workdir)}: train "
                            "first (--mode=train) or point --workdir at a trained run")
  manager = checkpoint.create_manager(workdir, read_only=True)
  params, step = checkpoint.restore_ema_params(manager, target, config,
                                               step=config.sampling.checkpoint_step)
  return model, params, int(step)


def _eval_seed(config) -> int:
  return int(config.eval.get("seed", 0))


def _fmt_eta(seconds: float) -> str:
  seconds = max(0.0, float(seconds))
  if seconds >= 86400:
    return f"{seconds / 86400:.1f} d"
  return time.strftime("%H:%M:%S", time.gmtime(seconds))


def _allgather(tree):
  """Stacks each process's arrays along a new leading axis (no-op with one process)."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.asarray(x)[None], tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree))


# ----------------------------------------------------------------------------
# Bits/dim (the variational bound, Eq. 5)
# ----------------------------------------------------------------------------

def example_bpd_key(seed: int, index) -> jax.Array:
  """The key of example ``index`` of the evaluated split for ``calc_bpd_loop``."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def make_p_bpd(model, diffusion, seed: int, clip_denoised: bool, cpu_compile_options: bool = True):
  """pmap-ed bound: (params [D...], x0 [D, b, H, W, C], index [D, b] int32) -> dict.

  Each example runs ``diffusion.calc_bpd_loop`` on its own with the key
  ``example_bpd_key(seed, index)`` (vmapped, so the network still sees batches
  of b). Returns total_bpd, prior_bpd [D, b] and terms_bpd, xstart_mse [D, b, T].
  On CPU it is compiled with ``compile_options.forward_options`` unless
  ``cpu_compile_options`` is False.
  """
  base_key = jax.random.PRNGKey(seed)

  def one_device(params, x0, index):
    model_fn = train.make_model_fn(model, params, train=False)

    def one(xi, i):
      out = diffusion.calc_bpd_loop(model_fn, xi[None], jax.random.fold_in(base_key, i),
                                    clip_denoised=clip_denoised)
      return jax.tree.map(lambda a: a[0], out)
    return jax.vmap(one)(x0, index)

  return compile_options.CompiledWithOptions(
      jax.pmap(one_device, axis_name=AXIS), compile_options.forward_options(cpu_compile_options))


def _bpd_paths(workdir: str, step: int) -> dict:
  d = eval_dir(workdir)
  return dict(json=os.path.join(d, f"bpd_step{step}.json"),
              terms=os.path.join(d, f"bpd_step{step}_terms.npz"),
              partial=os.path.join(d, f"bpd_step{step}_partial.npz"))


_EXAMPLE_FIELDS = ("index", "total", "prior", "decoder", "kl")


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
    logging.warning("Ignoring %s: it belongs to another evaluation setting (%s, now %s)", path,
                    got.get("fingerprint"), fingerprint)
    return None
  return got


def run_eval_bpd(config, workdir: str) -> dict:
  """--mode=eval_bpd: the variational bound (bits/dim) of the EMA model on ``data.eval_split``.

  Uses the first ``eval.num_examples`` examples (all when 0) in batches of
  ``eval.batch_size``, sharded over the local devices (and processes); padding
  of the last batch is masked out. ``sampling.clip_denoised`` is used for the
  predicted x0 of each term, as in the paper's evaluation. Resumable: see the
  module docstring.

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
  _check_unconditional(config)
  start_time = time.time()
  model, params, step = restore_ema(config, workdir)
  diffusion = train.build_diffusion(config)
  T = diffusion.num_timesteps
  ev = config.eval
  split = config.data.eval_split
  seed = _eval_seed(config)
  clip = bool(config.sampling.clip_denoised)
  batch_size = int(ev.batch_size)
  pcount, pindex = jax.process_count(), jax.process_index()
  d = jax.local_device_count()
  if batch_size % (pcount * d):
    raise ValueError(f"config.eval.batch_size={batch_size} must be divisible by "
                     f"process_count * local_device_count = {pcount * d}")

  streaming = (config.data.dataset in input_pipeline.TFDS_DATASETS and
               not config.data.in_memory and not ev.num_examples)
  images = None
  if streaming:
    n = input_pipeline.num_examples(config.data, split)
  else:
    images = input_pipeline.load_split_array(config.data, split,
                                             max_examples=ev.num_examples or None)
    if ev.num_examples:
      images = images[:ev.num_examples]
    n = int(images.shape[0])
  num_batches = -(-n // batch_size)
  paths = _bpd_paths(workdir, step)
  fingerprint = json.dumps(dict(step=step, split=split, n=n, batch_size=batch_size, T=T,
                                seed=seed, clip=clip, processes=pcount,
                                dataset=config.data.dataset,
                                image_size=config.data.image_size), sort_keys=True)

  if _is_chief():
    for stale in glob.glob(glob.escape(paths["partial"]) + ".tmp*"):  # from a killed write
      os.remove(stale)
  partial = _load_partial(paths["partial"], fingerprint, T)
  if partial is not None:
    first_batch = int(partial["next_batch"])
    examples = {k: [partial[k]] for k in _EXAMPLE_FIELDS}
    terms_sum, mse_sum = partial["terms_sum"].astype(np.float64), partial["mse_sum"].astype(np.float64)
    logging.info("Resuming bits/dim from %s: %d/%d batches done", paths["partial"], first_batch,
                 num_batches)
  else:
    first_batch = 0
    examples = {k: [] for k in _EXAMPLE_FIELDS}
    terms_sum, mse_sum = np.zeros(T), np.zeros(T)
  if pcount > 1:
    # Process 0 writes the partial file; every process must start at its batch (lock-step).
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    chief_first = int(multihost_utils.broadcast_one_to_all(np.int32(first_batch)))
    if chief_first != first_batch:  # this process cannot see process 0's partial file
      first_batch = chief_first
      examples = {k: [] for k in _EXAMPLE_FIELDS}
      terms_sum, mse_sum = np.zeros(T), np.zeros(T)

  logging.info("Bits/dim of the EMA parameters of step %d on %s split %r: %d examples, %d "
               "batches of %d over %d devices x %d processes, T=%d", step,
               config.data.dataset, split, n, num_batches, batch_size, d, pcount, T)

  per_process = batch_size // pcount
  per_device = per_process // d

  def host_batches():
    if streaming:
      it = input_pipeline.create_eval_iterator(config.data, batch_size, split=split)
      it = itertools.islice(it, first_batch, num_batches)
    else:
      it = input_pipeline.create_eval_iterator(config.data, batch_size,
                                               images=images[first_batch * batch_size:])
    for k, (x, mask) in enumerate(it, start=first_batch):
      index = (k * batch_size + pindex * per_process
               + np.arange(per_process, dtype=np.int32)).reshape(d, per_device)
      yield k, x, index, mask

  p_bpd = make_p_bpd(model, diffusion, seed, clip, config.sampling.cpu_compile_options)
  p_params = train.replicate(params)
  pending = collections.deque()

  def device_items():
    for k, x, index, mask in host_batches():
      pending.append((k, index, mask))
      yield x, index

  batches_computed = 0
  t_first = None
  for x, index_dev in input_pipeline.prefetch_to_device(device_items(), 2, axis_name=AXIS):
    k, index, mask = pending.popleft()
    out = p_bpd(p_params, x, index_dev)
    got = jax.device_get(out)
    got = dict(got, index=index, mask=mask)
    got = _allgather(got)  # [P, D, b, ...]
    flat = {key: v.reshape((-1,) + v.shape[3:]) for key, v in got.items()}
    keep = flat["mask"].astype(bool)
    terms = flat["terms_bpd"][keep].astype(np.float64)
    examples["index"].append(flat["index"][keep].astype(np.int64))
    examples["total"].append(flat["total_bpd"][keep].astype(np.float64))
    examples["prior"].append(flat["prior_bpd"][keep].astype(np.float64))
    examples["decoder"].append(terms[:, 0])
    examples["kl"].append(terms[:, 1:].sum(axis=1))
    terms_sum = terms_sum + terms.sum(axis=0)
    mse_sum = mse_sum + flat["xstart_mse"][keep].astype(np.float64).sum(axis=0)
    batches_computed += 1
    if _is_chief():
      atomic_savez(paths["partial"], fingerprint=np.array(fingerprint), next_batch=np.int64(k + 1),
                   terms_sum=terms_sum, mse_sum=mse_sum,
                   **{f: np.concatenate(examples[f]) for f in _EXAMPLE_FIELDS})
    now = time.time()
    if t_first is None:
      t_first = now  # the first batch includes compilation
      logging.info("bits/dim batch %d/%d done (first batch, compilation included: %.1f s)",
                   k + 1, num_batches, now - start_time)
    else:
      rate = (batches_computed - 1) * batch_size / max(now - t_first, 1e-9)
      done = np.concatenate(examples["total"])
      logging.info("bits/dim batch %d/%d: running mean %.4f over %d examples, %.2f images/s, "
                   "ETA %s", k + 1, num_batches, float(done.mean()), done.size, rate,
                   _fmt_eta((num_batches - k - 1) * batch_size / max(rate, 1e-9)))

  ex = {f: np.concatenate(examples[f]) if examples[f] else np.zeros((0,)) for f in _EXAMPLE_FIELDS}
  count = ex["total"].size
  if count != n:
    if _is_chief():
      raise RuntimeError(f"evaluated {count} examples, expected {n}")
    logging.info("bits/dim: process %d resumed without process 0's partial file; the "
                 "results are those of process 0", pindex)
    return dict(step=step, split=split, num_examples=n, results_on_process=0)
  mean_terms = terms_sum / count
  mean_mse = mse_sum / count
  prior_mean = float(ex["prior"].mean())
  # Bits/dim received once x_t (array index t) is known: L_T + sum_{s > t} L_s.
  rate = prior_mean + (np.cumsum(mean_terms[::-1])[::-1] - mean_terms)
  elapsed = time.time() - start_time
  result = dict(
      step=step, split=split, dataset=config.data.dataset, num_examples=int(count),
      num_timesteps=T, total_bpd=float(ex["total"].mean()),
      total_bpd_stderr=float(ex["total"].std(ddof=1) / math.sqrt(count)) if count > 1 else 0.0,
      prior_bpd=prior_mean, decoder_bpd=float(ex["decoder"].mean()),
      kl_bpd=float(ex["kl"].mean()), clip_denoised=clip, seed=seed, batch_size=batch_size,
      num_batches=num_batches, resumed_from_batch=first_batch,
      batches_computed=batches_computed, elapsed_s=elapsed,
      images_per_s=(batches_computed * batch_size / elapsed) if elapsed > 0 else 0.0,
      terms_file=paths["terms"])
  if _is_chief():
    atomic_savez(paths["terms"], terms_bpd=mean_terms, xstart_mse=mean_mse, rate_bpd=rate,
                 distortion_rmse=np.sqrt(mean_mse) * 127.5, prior_bpd=np.float64(prior_mean),
                 example_index=ex["index"], example_total_bpd=ex["total"],
                 example_prior_bpd=ex["prior"], example_decoder_bpd=ex["decoder"],
                 example_kl_bpd=ex["kl"])
    atomic_write_json(paths["json"], result)
    if os.path.exists(paths["partial"]):
      os.remove(paths["partial"])
  logging.info("bits/dim at step %d: %.4f (prior %.4f + decoder %.4f + KL terms %.4f) over %d "
               "examples; wrote %s", step, result["total_bpd"], result["prior_bpd"],
               result["decoder_bpd"], result["kl_bpd"], count, paths["json"])
  return result


# ----------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------

class FeatureExtractor:
  """name, and __call__(images uint8 [N, H, W, C]) -> (features [N, F], probs [N, K]) float64."""

  name: str

  def __call__(self, images: np.ndarray):
    raise NotImplementedError


class DigitsExtractor(FeatureExtractor):
  """The digits MLP's hidden activations (features) and class probabilities (for IS)."""

  name = "digits_mlp"

  def __call__(self, images):
    from ddpm_jax import digits_classifier  # pylint: disable=g-import-not-at-top
    images = _to_8x8(np.asarray(images))
    return digits_classifier.features(images), digits_classifier.probs(images)


def _to_8x8(images: np.ndarray) -> np.ndarray:
  """Grayscale images [N, S, S, 1] at another size -> [N, 8, 8, 1] (block mean or bilinear)."""
  n, h, w, c = images.shape
  if c != 1:
    images = np.round(images.astype(np.float64).mean(axis=-1, keepdims=True)).astype(np.uint8)
  if (h, w) == (8, 8):
    return images
  if h % 8 == 0 and w % 8 == 0:
    x = images.astype(np.float64).reshape(n, 8, h // 8, 8, w // 8, 1).mean(axis=(2, 4))
    return x
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((8, 8), Image.BILINEAR))
                   for im in images])[..., None]


class InceptionExtractor(FeatureExtractor):
  """Inception-v3 pool3 features and softmax probabilities, pmap-ed over local devices."""

  name = "inception"

  def __init__(self, weights_path: Optional[str] = None, batch_size: int = 256):
    from ddpm_jax.models import inception  # pylint: disable=g-import-not-at-top
    self.variables = inception.load_inception_params(weights_path or None)
    self.model = inception.InceptionV3()
    d = jax.local_device_count()
    self.per_device = max(1, -(-batch_size // d))
    self.batch = self.per_device * d

    def apply(variables, x):
      pool3, logits = self.model.apply(variables, x)
      return pool3, jax.nn.softmax(logits, axis=-1)
    self._p_apply = jax.pmap(apply, axis_name=AXIS)
    self._p_vars = None

  def __call__(self, images):
    images = np.asarray(images)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    if self._p_vars is None:
      self._p_vars = train.replicate(self.variables)
    d = jax.local_device_count()
    n = images.shape[0]

    def chunks():
      for lo in range(0, n, self.batch):
        x = images[lo:lo + self.batch].astype(np.float32)
        if x.shape[0] < self.batch:
          x = np.concatenate([x, np.zeros((self.batch - x.shape[0],) + x.shape[1:], x.dtype)])
        yield x.reshape((d, self.per_device) + x.shape[1:])

    feats, probs = [], []
    for x in input_pipeline.prefetch_to_device(chunks(), 2, axis_name=AXIS):
      f, p = jax.device_get(self._p_apply(self._p_vars, x))
      feats.append(np.asarray(f, np.float64).reshape(-1, f.shape[-1]))
      probs.append(np.asarray(p, np.float64).reshape(-1, p.shape[-1]))
    return np.concatenate(feats)[:n], np.concatenate(probs)[:n]


def get_feature_extractor(config) -> FeatureExtractor:
  """The digits MLP for data.dataset='digits', else Inception-v3 (weights must exist)."""
  if config.data.dataset == "digits":
    return DigitsExtractor()
  return InceptionExtractor(config.eval.inception_weights or None, int(config.eval.batch_size))


def extractor_name(config) -> str:
  return DigitsExtractor.name if config.data.dataset == "digits" else InceptionExtractor.name


# ----------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------

def default_stats_dir(config, workdir: Optional[str]) -> str:
  """eval.stats_dir if set, else $DDPM_JAX_STATS_DIR, else workdir/eval."""
  d = config.eval.get("stats_dir", "") or os.environ.get(STATS_DIR_ENV_VAR, "")
  if d:
    return d
  if workdir is None:
    raise ValueError("give a workdir or a stats_dir (eval.stats_dir or $DDPM_JAX_STATS_DIR)")
  return eval_dir(workdir)


def reference_statistics_path(config, split: str, stats_dir: str) -> str:
  """stats_{dataset}{image_size}_{split}_{extractor}.npz in ``stats_dir``."""
  dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.dataset)
  if config.data.dataset == "folder":
    folder = os.path.abspath(config.data.folder)
    digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
    dataset += "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder.rstrip("/")))
    dataset += "_" + digest  # two folders with the same name get different files
  return os.path.join(stats_dir, f"stats_{dataset}{config.data.image_size}_{split}_"
                                 f"{extractor_name(config)}.npz")


def _split_uint8_batches(config, split: str, max_examples: int, batch: int) -> Iterator[np.ndarray]:
  """Consecutive uint8 [b, H, W, C] chunks of the first ``max_examples`` of a split."""
  data = config.data
  if data.dataset in input_pipeline.TFDS_DATASETS and not data.in_memory:
    it = input_pipeline.create_eval_iterator(data, batch, process_index=0, process_count=1,
                                             local_device_count=1, split=split)
    seen = 0
    for x, mask in it:
      x = input_pipeline.to_uint8(x[0][mask[0]])
      x = x[:max_examples - seen]
      seen += x.shape[0]
      yield x
      if seen >= max_examples:
        return
  else:
    images = input_pipeline.load_split_array(data, split, max_examples=max_examples)
    images = images[:max_examples]
    for lo in range(0, images.shape[0], batch):
      yield images[lo:lo + batch]


def compute_reference_statistics(config, split: str, path: Optional[str] = None,
                                 extractor: Optional[FeatureExtractor] = None,
                                 max_examples: int = MAX_REFERENCE_EXAMPLES):
  """Feature mean and covariance of (the first ``max_examples`` of) a data split.

  Writes them to ``path`` (if given; keys mu, sigma, num_examples, extractor,
  dataset, split, image_size; readable by ``metrics.load_statistics``) and
  returns (mu [F], sigma [F, F], num_examples).
  """
  extractor = extractor or get_feature_extractor(config)
  start = time.time()
  feats = []
  n = 0
  for chunk in _split_uint8_batches(config, split, max_examples, 4096):
    f, _ = extractor(chunk)
    feats.append(f)
    n += f.shape[0]
    logging.info("reference features of %r: %d images (%.1f images/s)", split, n,
                 n / max(time.time() - start, 1e-9))
  feats = np.concatenate(feats)
  mu, sigma = metrics.feature_statistics(feats)
  logging.info("Reference statistics of %s split %r (%d examples, %s features) in %.1f s",
               config.data.dataset, split, n, extractor.name, time.time() - start)
  if path is not None and _is_chief():
    atomic_savez(path, mu=mu, sigma=sigma, num_examples=np.int64(n),
                 extractor=np.array(extractor.name), dataset=np.array(config.data.dataset),
                 split=np.array(split), image_size=np.int64(config.data.image_size))
    logging.info("Wrote %s", path)
  return mu, sigma, n


def get_reference_statistics(config, split: str, stats_dir: str,
                             extractor: Optional[FeatureExtractor] = None):
  """Cached statistics of a split: (mu, sigma, path, computed_now)."""
  path = reference_statistics_path(config, split, stats_dir)
  if os.path.exists(path):
    mu, sigma = metrics.load_statistics(path)
    logging.info("Using cached reference statistics %s", path)
    return mu, sigma, path, False
  mu, sigma, _ = compute_reference_statistics(config, split, path, extractor)
  return mu, sigma, path, True


# ----------------------------------------------------------------------------
# Samples for FID
# ----------------------------------------------------------------------------

def find_existing_samples(workdir: str, tag: str, num: int,
                          settings: Optional[dict] = None) -> Optional[str]:
  """A samples_{tag}*.npz in workdir/samples with >= num images (the largest), or None.

  With ``settings`` (``generate.sampler_settings``), only files that stored the
  same settings count: samples drawn with another eta, clipping or seed, or
  files from before settings were stored, are not reused.
  """
  best, best_n = None, -1
  for path in glob.glob(os.path.join(workdir, "samples", f"samples_{tag}*.npz")):
    rest = os.path.basename(path)[len(f"samples_{tag}"):-len(".npz")]
    if rest and not re.fullmatch(r"_fid\d+", rest):
      continue  # another tag that merely starts like this one (e.g. step1 vs step10)
    try:
      with np.load(path, allow_pickle=False) as z:
        count = z["images"].shape[0]
        stored = generate.read_settings(z)
    except Exception:  # pylint: disable=broad-except
      continue
    if settings is not None and stored != settings:
      logging.info("Not reusing %s: drawn with %s, the config asks for %s", path, stored, settings)
      continue
    if count >= num and count > best_n:
      best, best_n = path, count
  return best


def generate_fid_samples(config, workdir: str, model, params, step: int, num: int):
  """``num`` EMA samples (uint8 [num, H, W, C]) in resumable chunks of one sampler call.

  Call i uses the key of ``generate.generate`` (fold_in(PRNGKey(sampling.seed),
  i)), so the images equal those of --mode=sample with the same seed and batch
  size. Each finished call is saved to workdir/eval/fid_chunks_{tag}/; a
  restarted run only draws the missing calls. Returns (images, path written).
  """
  s = config.sampling
  d = jax.local_device_count()
  per_call = int(s.batch_size)
  if per_call % d:
    raise ValueError(f"config.sampling.batch_size={per_call} must be divisible by the number "
                     f"of local devices ({d})")
  diffusion = train.build_sampling_diffusion(config)
  tag = generate.sample_tag(config, step, diffusion.num_timesteps)
  settings = generate.sampler_settings(config, diffusion.num_timesteps)
  chunk_dir = os.path.join(eval_dir(workdir), f"fid_chunks_{tag}_bs{per_call}")
  os.makedirs(chunk_dir, exist_ok=True)
  pcount, pindex = jax.process_count(), jax.process_index()
  num_local = -(-num // pcount)
  calls = -(-num_local // per_call)
  first = pindex * calls
  chunk_path = lambda i: os.path.join(chunk_dir, f"call_{i:06d}.npz")
  have = {}
  for i in range(first, first + calls):
    if os.path.exists(chunk_path(i)):
      try:
        with np.load(chunk_path(i), allow_pickle=False) as z:
          have[i] = np.asarray(z["images"])
      except Exception:  # pylint: disable=broad-except
        pass
  todo = [i for i in range(first, first + calls) if i not in have]
  logging.info("FID samples: %d needed, %d of %d sampler calls (%d images each, %s, %d steps) "
               "already in %s", num, len(have), calls, per_call, s.sampler,
               diffusion.num_timesteps, chunk_dir)
  if todo:
    p_sample = generate.make_p_sample(model, diffusion, config, per_call // d)
    p_params = train.replicate(params)
    start = time.time()
    for j, i in enumerate(todo):
      imgs = generate.generate(p_sample, p_params, per_call, per_call, s.seed, first_call=i,
                               log_progress=False)
      atomic_savez(chunk_path(i), images=imgs)
      have[i] = imgs
      if j > 0:  # the first call includes compilation
        rate = j * per_call / (time.time() - t1)
        logging.info("FID samples: call %d/%d, %.2f images/s, ETA %s", len(have), calls, rate,
                     _fmt_eta((len(todo) - j - 1) * per_call / rate))
      else:
        t1 = time.time()
        logging.info("FID samples: first call done in %.1f s (compilation included)", t1 - start)
  images = np.concatenate([have[i] for i in range(first, first + calls)])[:num_local]
  if pcount > 1:
    images = _allgather(images).reshape((-1,) + images.shape[1:])
  images = images[:num]
  path = None
  if _is_chief():
    npz, _ = generate.write_samples(os.path.join(workdir, "samples"), images, f"{tag}_fid{num}",
                                    settings)
    path = npz
    shutil.rmtree(chunk_dir, ignore_errors=True)
  return images, path


# ----------------------------------------------------------------------------
# FID / IS
# ----------------------------------------------------------------------------

def fid_from_images(images: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                    extractor: FeatureExtractor) -> float:
  """FID of uint8 images [N, H, W, C] against reference statistics."""
  f, _ = extractor(images)
  mu, sigma = metrics.feature_statistics(f)
  return metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)


def run_eval_fid(config, workdir: str) -> dict:
  """--mode=eval_fid: FID (vs the train and the eval split) and IS of ``eval.num_fid_samples``.

  Writes and returns (workdir/eval/fid_step{S}.json) a dict with:
    step, num_samples, extractor, fid_train, fid_test (against data.eval_split),
    is_mean, is_std, is_splits, train_split, eval_split, sampler,
    sampling_steps, samples_file, samples_reused, reference_stats
    ({split: path}), reference_stats_computed (splits computed by this call),
    elapsed_s.
  """
  _check_unconditional(config)
  start = time.time()
  num = int(config.eval.num_fid_samples)
  # The extractor first: a missing Inception file fails before any sampling.
  extractor = get_feature_extractor(config)
  model, params, step = restore_ema(config, workdir)
  num_timesteps = train.build_sampling_diffusion(config).num_timesteps
  tag = generate.sample_tag(config, step, num_timesteps)
  settings = generate.sampler_settings(config, num_timesteps)
  existing = find_existing_samples(workdir, tag, num, settings)
  if existing is not None:
    with np.load(existing, allow_pickle=False) as z:
      images = np.asarray(z["images"][:num])
    logging.info("Using %d existing samples from %s", num, existing)
    samples_file, reused = existing, True
  else:
    images, samples_file = generate_fid_samples(config, workdir, model, params, step, num)
    reused = False

  stats_dir = default_stats_dir(config, workdir)
  train_split, eval_split = config.data.train_split, config.data.eval_split
  refs, computed, paths = {}, [], {}
  for split in dict.fromkeys([train_split, eval_split]):
    mu, sigma, path, was_computed = get_reference_statistics(config, split, stats_dir, extractor)
    refs[split] = (mu, sigma)
    paths[split] = path
    if was_computed:
      computed.append(split)

  feats, probs = extractor(images)
  mu, sigma = metrics.feature_statistics(feats)
  fid_train = metrics.frechet_distance(mu, sigma, *refs[train_split])
  fid_test = metrics.frechet_distance(mu, sigma, *refs[eval_split])
  splits = min(IS_SPLITS, num)
  is_mean, is_std = metrics.inception_score(probs, num_splits=splits)
  result = dict(
      step=step, num_samples=int(images.shape[0]), extractor=extractor.name,
      fid_train=float(fid_train), fid_test=float(fid_test), is_mean=float(is_mean),
      is_std=float(is_std), is_splits=splits, train_split=train_split, eval_split=eval_split,
      sampler=config.sampling.sampler,
      sampling_steps=num_timesteps,
      samples_file=samples_file, samples_reused=reused, reference_stats=paths,
      reference_stats_computed=computed, elapsed_s=time.time() - start)
  path = os.path.join(eval_dir(workdir), f"fid_step{step}.json")
  if _is_chief():
    atomic_write_json(path, result)
  logging.info("step %d: FID %.3f (vs %s), %.3f (vs %s), IS %.3f +- %.3f over %d samples "
               "(%s features); wrote %s", step, fid_train, train_split, fid_test, eval_split,
               is_mean, is_std, result["num_samples"], extractor.name, path)
  return result


def run_figures(config, workdir: str) -> dict:
  """The paper's progressive-generation and interpolation figures (see ddpm_jax.figures)."""
  from ddpm_jax import figures  # pylint: disable=g-import-not-at-top
  return figures.run_figures(config, workdir)


def run_stats_only(config, workdir: Optional[str] = None, stats_dir: Optional[str] = None,
                   splits=None, force: bool = False) -> dict:
  """Precomputes (or recomputes with ``force``) the reference statistics; returns {split: path}."""
  stats_dir = stats_dir or default_stats_dir(config, workdir)
  extractor = get_feature_extractor(config)
  out = {}
  for split in dict.fromkeys(splits or [config.data.train_split, config.data.eval_split]):
    path = reference_statistics_path(config, split, stats_dir)
    if force or not os.path.exists(path):
      compute_reference_statistics(config, split, path, extractor)
    else:
      logging.info("%s exists (use --force to recompute)", path)
    out[split] = path
  return out


# ----------------------------------------------------------------------------
# CLI: python -m ddpm_jax.evaluate --config=... --stats_only
# ----------------------------------------------------------------------------

def _cli() -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
  flags.DEFINE_string("workdir", None, "Run directory; statistics go to workdir/eval unless "
                      "--stats_dir / eval.stats_dir / $DDPM_JAX_STATS_DIR is set.")
  flags.DEFINE_string("stats_dir", None, "Directory of the cached reference statistics.")
  flags.DEFINE_bool("stats_only", False, "Compute the reference statistics of the train and "
                    "eval splits (required: the only action of this CLI).")
  flags.DEFINE_list("splits", None, "Splits to compute (default: data.train_split, "
                    "data.eval_split).")
  flags.DEFINE_bool("force", False, "Recompute existing statistics files.")
  flags.mark_flags_as_required(["config"])
  FLAGS = flags.FLAGS

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.stats_only:
      raise app.UsageError("only --stats_only is supported here; use main.py --mode=eval_fid")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
    FLAGS.alsologtostderr = True
    try:
      paths = run_stats_only(FLAGS.config, FLAGS.workdir, FLAGS.stats_dir, FLAGS.splits,
                             FLAGS.force)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1)
    print(json.dumps(paths, indent=2))

  app.run(main)


if __name__ == "__main__":
  _cli()
