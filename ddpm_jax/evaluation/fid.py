"""``--mode=eval_fid``: FID (against the train and the eval split) and Inception Score (Table 1).

  python main.py --config=configs/cifar10.py --workdir=DIR --mode=eval_fid
  python -m ddpm_jax.evaluation.fid --config=configs/cifar10.py --stats_only [--stats_dir=DIR]

Evaluates the EMA parameters of the newest checkpoint (or of
``sampling.checkpoint_step``) and writes into ``workdir/eval``:

  fid_{tag}_n{N}.json     FID against the train and the eval split, IS, of N samples
                          drawn as ``tag`` says (``sample.sample_tag``).
  stats_*.npz             cached reference statistics (or in ``eval.stats_dir``).

The samples come from ``workdir/samples/samples_{tag}[_n{N}_bs{B}|_fid{N}].npz`` when such
a file holds enough images drawn with the config's sampler settings (e.g. from
--mode=sample); otherwise they are drawn in resumable chunks
(``workdir/eval/fid_chunks_*``) and written to
``workdir/samples/samples_{tag}_fid{N}.npz`` + a grid. The tag
(``sample.sample_tag``) names the step, the sampler and every setting of the
draw, so other settings never overwrite earlier samples.

Features: the digits MLP for ``data.dataset == 'digits'``, else Inception-v3
(``features.py``; weights from ``eval.inception_weights``, or
$DDPM_JAX_INCEPTION_WEIGHTS, or its default path; a missing file fails before
any sampling).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from typing import Iterator, Optional

from absl import logging
import jax
import numpy as np

from ddpm_jax import builders, errors, files, images as image_lib, parallel, progress, sample
from ddpm_jax import workdirs
from ddpm_jax.data import pipeline, sources
from ddpm_jax.evaluation import metrics
from ddpm_jax.evaluation.bpd import eval_dir
from ddpm_jax.evaluation import features
from ddpm_jax.evaluation.features import FeatureExtractor, extractor_name, get_feature_extractor

STATS_DIR_ENV_VAR = "DDPM_JAX_STATS_DIR"
# Reference statistics use at most this many examples of a split (all of CIFAR-10's
# 50k training images; the first 50k of the large LSUN splits).
MAX_REFERENCE_EXAMPLES = 50_000
IS_SPLITS = 10


# ----------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------


def default_stats_dir(config, workdir: Optional[str]) -> str:
  """eval.stats_dir if set, else $DDPM_JAX_STATS_DIR, else workdir/eval."""
  d = config.eval.stats_dir or os.environ.get(STATS_DIR_ENV_VAR, "")
  if d:
    return d
  if workdir is None:
    raise errors.ConfigError(
        "give a workdir or a stats_dir (--stats_dir, eval.stats_dir or $DDPM_JAX_STATS_DIR)"
    )
  return eval_dir(workdir)


def folder_digest(config, split: str) -> str:
  """A hash of what an image folder's split holds: its path, channels, files, sizes, mtimes.

  Files added, removed, replaced or edited give another hash, so statistics of
  the folder as it was are never taken for those of the folder as it is.
  """
  folder = os.path.abspath(config.data.folder)
  split_dir = sources.folder_for_split(folder, split)
  h = hashlib.sha1(f"{folder}\0{split_dir}\0{config.data.channels}\n".encode())
  for path in sources.list_image_files(split_dir):
    st = os.stat(path)
    h.update(f"{os.path.relpath(path, split_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:12]


def reference_statistics_path(config, split: str, stats_dir: str) -> str:
  """stats_{dataset}{image_size}_{split}_{extractor}.npz in ``stats_dir``.

  For an image folder the dataset part holds the folder's name and
  ``folder_digest`` of the split's files.
  """
  dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.dataset)
  if config.data.dataset == "folder":
    folder = os.path.abspath(config.data.folder)
    dataset += "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder.rstrip("/")))
    dataset += "_" + folder_digest(config, split)  # by content, not only by path
  return os.path.join(
      stats_dir, f"stats_{dataset}{config.data.image_size}_{split}_" f"{extractor_name(config)}.npz"
  )


def _split_uint8_batches(
    config, split: str, max_examples: int, batch: int
) -> tuple[int, Iterator[np.ndarray]]:
  """(N, consecutive uint8 [b, H, W, C] chunks of the first N <= ``max_examples`` of a split)."""
  data = config.data
  if data.dataset in sources.TFDS_DATASETS and not data.in_memory:
    n = min(max_examples, sources.num_examples(data, split))
    return n, _streamed_uint8_batches(data, split, n, batch)
  images = sources.load_split_array(data, split, max_examples=max_examples)[:max_examples]
  return images.shape[0], (images[lo : lo + batch] for lo in range(0, images.shape[0], batch))


def _streamed_uint8_batches(data, split: str, max_examples: int, batch: int):
  """The first ``max_examples`` of a streamed TFDS split, uint8 [b, H, W, C] chunks."""
  it = pipeline.create_eval_iterator(
      data, batch, process_index=0, process_count=1, local_device_count=1, split=split
  )
  seen = 0
  for item in it:  # {'image': [1, b, H, W, C] in [-1, 1], 'mask': [1, b]}
    x = image_lib.to_uint8(item["image"][0][item["mask"][0]])
    x = x[: max_examples - seen]
    seen += x.shape[0]
    yield x
    if seen >= max_examples:
      return


def compute_reference_statistics(
    config,
    split: str,
    path: Optional[str] = None,
    extractor: Optional[FeatureExtractor] = None,
    max_examples: int = MAX_REFERENCE_EXAMPLES,
):
  """Feature mean and covariance of (the first ``max_examples`` of) a data split.

  Writes them to ``path`` (if given; keys mu, sigma, num_examples, extractor,
  dataset, split, image_size; readable by ``metrics.load_statistics``) and
  returns (mu [F], sigma [F, F], num_examples).
  """
  extractor = extractor or get_feature_extractor(config)
  start = time.time()
  feats = []
  n = 0
  total, chunks = _split_uint8_batches(config, split, max_examples, 4096)
  done = progress.Progress(total, "images", skip_first=True)
  for chunk in chunks:
    f, _ = extractor(chunk)
    feats.append(f)
    n += f.shape[0]
    logging.info("reference features of %r: %s", split, done.report(n))
  feats = np.concatenate(feats)
  mu, sigma = metrics.feature_statistics(feats)
  logging.info(
      "Reference statistics of %s split %r (%d examples, %s features) in %.1f s",
      config.data.dataset,
      split,
      n,
      extractor.name,
      time.time() - start,
  )
  if path is not None and jax.process_index() == 0:
    files.savez(
        path,
        mu=mu,
        sigma=sigma,
        num_examples=np.int64(n),
        extractor=np.array(extractor.name),
        dataset=np.array(config.data.dataset),
        split=np.array(split),
        image_size=np.int64(config.data.image_size),
    )
    logging.info("Wrote %s", path)
  return mu, sigma, n


def get_reference_statistics(
    config, split: str, stats_dir: str, extractor: Optional[FeatureExtractor] = None
):
  """Cached statistics of a split: (mu, sigma, path, computed_now)."""
  path = reference_statistics_path(config, split, stats_dir)
  if os.path.exists(path):
    try:
      mu, sigma = metrics.load_statistics(path)
    except ValueError as e:  # a damaged or foreign file in the statistics directory
      raise errors.DataError(f"{e}; delete it to compute the statistics again") from e
    logging.info("Using cached reference statistics %s", path)
    return mu, sigma, path, False
  mu, sigma, _ = compute_reference_statistics(config, split, path, extractor)
  return mu, sigma, path, True


# ----------------------------------------------------------------------------
# Samples for FID
# ----------------------------------------------------------------------------


def find_existing_samples(
    workdir: str, tag: str, num: int, settings: Optional[dict] = None
) -> Optional[str]:
  """A samples_{tag}*.npz in workdir/samples with >= num images (the largest), or None.

  With ``settings`` (``sample.sampler_settings``), only files that stored the
  same settings count: samples drawn with another eta, clipping or seed, or
  files from before settings were stored, are not reused.
  """
  best, best_n = None, -1
  for path in glob.glob(os.path.join(workdir, "samples", f"samples_{tag}*.npz")):
    rest = os.path.basename(path)[len(f"samples_{tag}") : -len(".npz")]
    if rest and not re.fullmatch(r"_fid\d+|_n\d+_bs\d+", rest):
      continue  # another tag that merely starts like this one (e.g. step1 vs step10)
    try:
      with np.load(path, allow_pickle=False) as z:
        count = z["images"].shape[0]
        stored = sample.read_settings(z)
    except Exception:  # pylint: disable=broad-except
      continue
    if settings is not None and stored != settings:
      logging.info("Not reusing %s: drawn with %s, the config asks for %s", path, stored, settings)
      continue
    if count >= num and count > best_n:
      best, best_n = path, count
  return best


def fid_settings(config) -> dict:
  """``sample.sampler_settings`` of FID's samples: a conditional model's labels are uniform."""
  settings = sample.sampler_settings(config)
  if config.model.num_classes:
    settings.update(class_label=-1, labels="uniform")
  return settings


def generate_fid_samples(config, workdir: str, model, params, step: int, num: int):
  """``num`` EMA samples in resumable chunks of one sampler call: (images, labels, path written).

  images: uint8 [num, H, W, C]; labels: int32 [num] drawn uniformly for a
  class-conditional model (``sample.uniform_labels(config, sampling.seed)``),
  else None. Call i uses the key of ``sample.generate`` (fold_in(PRNGKey(
  sampling.seed), i)), so an unconditional model's images equal those of
  --mode=sample with the same seed and batch size. Each finished call is saved
  to workdir/eval/fid_chunks_{tag}/; a restarted run only draws the missing calls.
  """
  s = config.sampling
  d = jax.local_device_count()
  per_call = int(s.batch_size)
  if per_call % d:
    raise errors.ConfigError(
        f"config.sampling.batch_size={per_call} is invalid: must be divisible by the number "
        f"of local devices ({d})"
    )
  diffusion = builders.build_sampling_diffusion(config)
  tag = sample.sample_tag(config, step)
  settings = fid_settings(config)
  labels_fn = sample.uniform_labels(config, int(s.seed))
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
          have[i] = (np.asarray(z["images"]), np.asarray(z["labels"]) if labels_fn else None)
      except Exception:  # pylint: disable=broad-except
        pass
  todo = [i for i in range(first, first + calls) if i not in have]
  logging.info(
      "FID samples: %d needed, %d of %d sampler calls (%d images each, %s, %d steps) "
      "already in %s",
      num,
      len(have),
      calls,
      per_call,
      s.sampler,
      builders.sampling_steps(config),
      chunk_dir,
  )
  if todo:
    p_sample = sample.make_p_sample(model, diffusion, config, per_call // d)
    p_params = parallel.replicate(params)
    done = lambda: min(len(have) * per_call, num_local)
    drawn = progress.Progress(num_local, "images", done=done(), skip_first=True)
    for i in todo:
      imgs, labels = sample.generate(
          p_sample,
          p_params,
          per_call,
          per_call,
          s.seed,
          first_call=i,
          log_progress=False,
          labels=labels_fn,
      )
      files.savez(chunk_path(i), images=imgs, **({} if labels is None else {"labels": labels}))
      have[i] = (imgs, labels)
      # The first call's rate includes compilation, later ones do not.
      logging.info("FID samples: %s (call %d/%d)", drawn.report(done()), len(have), calls)
  images = np.concatenate([have[i][0] for i in range(first, first + calls)])[:num_local]
  labels = None
  if labels_fn:
    labels = np.concatenate([have[i][1] for i in range(first, first + calls)])[:num_local]
  if pcount > 1:
    images = parallel.allgather(images).reshape((-1,) + images.shape[1:])
    labels = None if labels is None else parallel.allgather(labels).reshape(-1)
  images = images[:num]
  labels = None if labels is None else labels[:num]
  path = None
  if jax.process_index() == 0:
    npz, _ = sample.write_samples(
        os.path.join(workdir, "samples"), images, f"{tag}_fid{num}", settings, labels
    )
    path = npz
    shutil.rmtree(chunk_dir, ignore_errors=True)
  return images, labels, path


# ----------------------------------------------------------------------------
# FID / IS
# ----------------------------------------------------------------------------


def fid_from_images(
    images: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, extractor: FeatureExtractor
) -> float:
  """FID of uint8 images [N, H, W, C] against reference statistics."""
  f, _ = extractor(images)
  mu, sigma = metrics.feature_statistics(f)
  return metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)


def result_path(config, workdir: str, step: int) -> str:
  """workdir/eval/fid_{tag}_n{N}.json: the checkpoint, every setting of the draw, the count."""
  tag = sample.sample_tag(config, step)
  return os.path.join(eval_dir(workdir), f"fid_{tag}_n{int(config.eval.num_fid_samples)}.json")


def run_eval_fid(config, workdir: str) -> dict:
  """--mode=eval_fid: FID (vs the train and the eval split) and IS of ``eval.num_fid_samples``.

  Writes and returns (workdir/eval/fid_{tag}_n{N}.json: ``sample.sample_tag``,
  so draws with other settings or counts get their own file) a dict with:
    step, num_samples, extractor, fid_train, fid_test (against data.eval_split),
    is_mean, is_std, is_splits, train_split, eval_split, sampler,
    sampling_steps, samples_file, samples_reused, reference_stats
    ({split: path}), reference_stats_computed (splits computed by this call),
    elapsed_s; for a class-conditional model (labels drawn uniformly)
    guidance_scale and, on the digits, class_accuracy (how often the digits
    classifier predicts the requested class).
  """
  start = time.time()
  num = int(config.eval.num_fid_samples)
  sources.check_eval_split(config.data)  # before any sampling
  # The extractor first: a missing Inception file fails before any sampling.
  extractor = get_feature_extractor(config)
  model, params, step = builders.ema_params(config, workdir)
  workdirs.write_record(config, workdir, "eval_fid")
  num_timesteps = builders.sampling_steps(config)
  tag = sample.sample_tag(config, step)
  existing = find_existing_samples(workdir, tag, num, fid_settings(config))
  if existing is not None:
    with np.load(existing, allow_pickle=False) as z:
      images = np.asarray(z["images"][:num])
      labels = np.asarray(z["labels"][:num]) if "labels" in z.files else None
    logging.info("Using %d existing samples from %s", num, existing)
    samples_file, reused = existing, True
  else:
    images, labels, samples_file = generate_fid_samples(config, workdir, model, params, step, num)
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
      step=step,
      num_samples=int(images.shape[0]),
      extractor=extractor.name,
      fid_train=float(fid_train),
      fid_test=float(fid_test),
      is_mean=float(is_mean),
      is_std=float(is_std),
      is_splits=splits,
      train_split=train_split,
      eval_split=eval_split,
      sampler=config.sampling.sampler,
      sampling_steps=num_timesteps,
      samples_file=samples_file,
      samples_reused=reused,
      reference_stats=paths,
      reference_stats_computed=computed,
      elapsed_s=time.time() - start,
  )
  if labels is not None:
    result["guidance_scale"] = float(config.sampling.guidance_scale)
    if extractor.name == features.DigitsExtractor.name and config.model.num_classes == 10:
      # How often the digits classifier sees the class that was asked for.
      result["class_accuracy"] = float(np.mean(np.argmax(probs, axis=1) == labels))
  path = result_path(config, workdir, step)
  if jax.process_index() == 0:
    files.write_json(path, result)
  logging.info(
      "step %d: FID %.3f (vs %s), %.3f (vs %s), IS %.3f +- %.3f over %d samples "
      "(%s features); wrote %s",
      step,
      fid_train,
      train_split,
      fid_test,
      eval_split,
      is_mean,
      is_std,
      result["num_samples"],
      extractor.name,
      path,
  )
  return result


def run_stats_only(
    config,
    workdir: Optional[str] = None,
    stats_dir: Optional[str] = None,
    splits=None,
    force: bool = False,
) -> dict:
  """Precomputes (or recomputes with ``force``) the reference statistics; returns {split: path}."""
  stats_dir = stats_dir or default_stats_dir(config, workdir)
  if not splits:
    sources.check_eval_split(config.data)
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
# CLI: python -m ddpm_jax.evaluation.fid --config=... --stats_only
# ----------------------------------------------------------------------------


def _cli() -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
  flags.DEFINE_string(
      "workdir",
      None,
      "Run directory; statistics go to workdir/eval unless "
      "--stats_dir / eval.stats_dir / $DDPM_JAX_STATS_DIR is set.",
  )
  flags.DEFINE_string("stats_dir", None, "Directory of the cached reference statistics.")
  flags.DEFINE_bool(
      "stats_only",
      False,
      "Compute the reference statistics of the train and "
      "eval splits (required: the only action of this CLI).",
  )
  flags.DEFINE_list(
      "splits", None, "Splits to compute (default: data.train_split, " "data.eval_split)."
  )
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
      paths = run_stats_only(
          FLAGS.config, FLAGS.workdir, FLAGS.stats_dir, FLAGS.splits, FLAGS.force
      )
    except errors.UserError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1)
    print(json.dumps(paths, indent=2))

  app.run(main)


if __name__ == "__main__":
  _cli()
