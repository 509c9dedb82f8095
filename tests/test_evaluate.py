"""Evaluation modes (bits/dim, FID/IS) and the paper's figures, on the tiny digits config."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from ddpm_jax import builders, checkpoints, errors, sample
from ddpm_jax import images as image_lib
from ddpm_jax.data import sources
from ddpm_jax.diffusion import schedules
from ddpm_jax.diffusion.gaussian import GaussianDiffusion
from ddpm_jax.evaluation import bpd, digits_classifier, features, fid, figures, metrics
from ddpm_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 3


def small_config():
  config = test_config.get_config()  # digits 8x8, T = 100, a two-level U-Net
  config.eval.batch_size = 8
  config.eval.num_examples = 20  # 3 batches, the last one half padding
  config.sampling.batch_size = 32
  config.eval.num_fid_samples = 64
  return config


def write_checkpoint(workdir, config):
  """A checkpoint at STEP whose EMA parameters are the init plus noise (no training needed)."""
  model = builders.build_model(config)
  tx = builders.create_optimizer(config.optim)
  state = jax.device_get(state_lib.create_train_state(config, model, tx))
  rng = np.random.default_rng(0)
  ema = jax.tree.map(
      lambda p: np.asarray(p) + 0.02 * rng.standard_normal(p.shape).astype(p.dtype),
      state.ema_params,
  )
  state = state.replace(ema_params=ema, step=np.int32(STEP))
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, state, config)
  return ema


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = small_config()
  ema = write_checkpoint(workdir, config)
  return workdir, config, ema


def fresh_workdir(tmp_path, trained):
  """A new workdir holding a copy of the module's checkpoint."""
  src, _, _ = trained
  dst = str(tmp_path / "run")
  shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(dst, "checkpoints"))
  return dst


# ----------------------------------------------------------------------------
# bits/dim
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_bpd_writes_the_bound_and_matches_calc_bpd_loop(tmp_path, trained):
  _, config, ema = trained
  workdir = fresh_workdir(tmp_path, trained)
  result = bpd.run_eval_bpd(config, workdir)
  T = config.diffusion.num_timesteps
  n = config.eval.num_examples

  with open(os.path.join(workdir, "eval", f"bpd_step{STEP}.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(result))
  for key in (
      "step",
      "num_examples",
      "total_bpd",
      "prior_bpd",
      "decoder_bpd",
      "kl_bpd",
      "num_timesteps",
      "resumed_from_batch",
      "batches_computed",
      "split",
  ):
    assert key in written, key
  assert written["step"] == STEP and written["num_examples"] == n
  assert written["resumed_from_batch"] == 0 and written["batches_computed"] == 3
  assert np.isfinite(written["total_bpd"]) and written["total_bpd"] > 0
  assert not os.path.exists(os.path.join(workdir, "eval", f"bpd_step{STEP}_partial.npz"))

  with np.load(os.path.join(workdir, "eval", f"bpd_step{STEP}_terms.npz")) as z:
    terms = {k: z[k] for k in z.files}
  for key in ("terms_bpd", "xstart_mse", "rate_bpd", "distortion_rmse"):
    assert terms[key].shape == (T,), key
    assert np.all(np.isfinite(terms[key])), key
  np.testing.assert_array_equal(terms["example_index"], np.arange(n))
  # Numpy recomputation of the summary from its parts.
  tot = terms["example_total_bpd"]
  np.testing.assert_allclose(
      tot,
      terms["example_prior_bpd"] + terms["example_decoder_bpd"] + terms["example_kl_bpd"],
      rtol=1e-5,
  )
  np.testing.assert_allclose(written["total_bpd"], tot.mean(), rtol=1e-12)
  np.testing.assert_allclose(
      written["total_bpd"], terms["terms_bpd"].sum() + written["prior_bpd"], rtol=1e-5
  )
  np.testing.assert_allclose(written["decoder_bpd"], terms["terms_bpd"][0], rtol=1e-6)
  np.testing.assert_allclose(terms["rate_bpd"][-1], written["prior_bpd"], rtol=1e-6)

  # Independent computation: calc_bpd_loop on single examples with the documented keys,
  # including example 19, which sat in the padded last batch.
  model = builders.build_model(config)
  diffusion = builders.build_diffusion(config)
  images = image_lib.scale_images(sources.load_split_array(config.data, config.data.eval_split)[:n])

  @jax.jit
  def direct(x, key):
    model_fn = builders.make_model_fn(model, ema, train=False)
    return diffusion.calc_bpd_loop(model_fn, x, key, clip_denoised=True)

  for i in (0, 9, 19):
    out = jax.device_get(direct(images[i : i + 1], bpd.example_bpd_key(0, i)))
    np.testing.assert_allclose(tot[i], out["total_bpd"][0], rtol=2e-5)
    np.testing.assert_allclose(terms["example_decoder_bpd"][i], out["terms_bpd"][0, 0], rtol=2e-5)
    np.testing.assert_allclose(terms["example_prior_bpd"][i], out["prior_bpd"][0], rtol=2e-5)

  # The numbers do not depend on the batch size (keys are per example).
  config2 = small_config()
  config2.eval.batch_size = 16
  again = bpd.run_eval_bpd(config2, workdir)
  assert again["num_batches"] == 2
  with np.load(os.path.join(workdir, "eval", f"bpd_step{STEP}_terms.npz")) as z:
    np.testing.assert_allclose(z["example_total_bpd"], tot, rtol=2e-5)


_CHILD = """
import sys
import jax
from absl import logging
logging.set_verbosity(logging.INFO)
sys.path.insert(0, {root!r})
from tests import test_evaluate
from ddpm_jax.evaluation import bpd
config = test_evaluate.small_config()
config.eval.num_examples = {n}
bpd.run_eval_bpd(config, {workdir!r})
"""


@pytest.mark.slow
def test_eval_bpd_resumes_after_sigkill(tmp_path, trained):
  _, config, _ = trained
  workdir = fresh_workdir(tmp_path, trained)
  n = 96  # 12 batches of 8
  config.eval.num_examples = n
  partial = os.path.join(workdir, "eval", f"bpd_step{STEP}_partial.npz")
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={jax.local_device_count()}"
  )
  proc = subprocess.Popen(
      [sys.executable, "-c", _CHILD.format(root=ROOT, n=n, workdir=workdir)],
      env=env,
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
  )
  done_at_kill = None
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(partial):
        try:
          with np.load(partial) as z:
            done_at_kill = int(z["next_batch"])
        except Exception:  # pylint: disable=broad-except
          done_at_kill = None
        if done_at_kill and done_at_kill >= 1:
          proc.send_signal(signal.SIGKILL)
          break
      time.sleep(0.02)
  finally:
    if proc.poll() is None:
      proc.kill()
    _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
  with np.load(partial) as z:
    done = int(z["next_batch"])
  assert 1 <= done < 12, done
  assert not os.path.exists(os.path.join(workdir, "eval", f"bpd_step{STEP}.json"))

  resumed = bpd.run_eval_bpd(config, workdir)
  assert resumed["resumed_from_batch"] == done
  assert resumed["batches_computed"] == 12 - done
  assert resumed["num_examples"] == n
  assert not os.path.exists(partial)
  with np.load(os.path.join(workdir, "eval", f"bpd_step{STEP}_terms.npz")) as z:
    resumed_terms = {k: z[k] for k in z.files}

  fresh = bpd.run_eval_bpd(config, workdir)  # uninterrupted (the partial is gone)
  assert fresh["resumed_from_batch"] == 0 and fresh["batches_computed"] == 12
  for key in ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd"):
    np.testing.assert_allclose(resumed[key], fresh[key], rtol=1e-6, err_msg=key)
  with np.load(os.path.join(workdir, "eval", f"bpd_step{STEP}_terms.npz")) as z:
    np.testing.assert_array_equal(z["example_index"], resumed_terms["example_index"])
    np.testing.assert_allclose(
        z["example_total_bpd"], resumed_terms["example_total_bpd"], rtol=1e-6
    )
    np.testing.assert_allclose(z["terms_bpd"], resumed_terms["terms_bpd"], rtol=1e-6)


def test_eval_bpd_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(errors.NoCheckpointError, match="checkpoint"):
    bpd.run_eval_bpd(small_config(), str(tmp_path))


def test_eval_bpd_batch_the_devices_cannot_split_is_a_config_error_before_any_work(tmp_path):
  config = small_config()
  config.eval.batch_size = jax.local_device_count() + 1
  # A ConfigError (one line from main.py), raised before looking for a checkpoint.
  with pytest.raises(errors.ConfigError, match=r"^config\.eval\.batch_size=9 is invalid: must be"):
    bpd.run_eval_bpd(config, str(tmp_path))


# ----------------------------------------------------------------------------
# FID / IS
# ----------------------------------------------------------------------------


def test_samples_drawn_another_way_get_another_file(tmp_path):
  config = test_config.get_config()
  config.sampling.seed = 1
  assert sample.sample_tag(config, 10) == "step10_ancestral100_seed1"
  config.sampling.sampler, config.sampling.eta, config.sampling.num_steps = "ddim", 0.5, 50
  config.sampling.clip_denoised, config.sampling.seed = False, 3
  assert sample.sample_tag(config, 10) == "step10_ddim50_eta0.5_noclip_seed3"
  config.sampling.eta = 0.0
  assert sample.sample_tag(config, 10) == "step10_ddim50_eta0_noclip_seed3"
  dpm = test_config.get_config()
  dpm.sampling.sampler, dpm.sampling.timestep_spacing = "dpm_solver++", "logsnr"
  assert sample.sample_tag(dpm, 10) == "step10_dpmpp20_logsnr_seed1"  # 20 steps by default
  dpm.model.num_classes, dpm.sampling.guidance_scale, dpm.sampling.class_label = 10, 3.0, 7
  assert sample.sample_tag(dpm, 10) == "step10_dpmpp20_logsnr_w3_class7_seed1"
  sde = test_config.get_config()
  sde.sampling.sampler, sde.sampling.thresholding = "dpm_solver++_sde", True
  assert sample.sample_tag(sde, 10) == "step10_dpmppsde20_thresholded_seed1"  # 20 by default
  assert sample.sampler_settings(sde) == dict(
      sampler="dpm_solver++_sde",
      num_timesteps=20,
      seed=1,
      timestep_spacing="uniform",
      thresholding=True,
  )
  sde.sampling.num_steps = 50
  assert builders.build_sampling_diffusion(sde).num_timesteps == 100  # all T: picks its own times
  # Two draws that differ only in eta: both files survive, each with its own settings.
  written = {}
  for eta in (0.0, 1.0):
    config.sampling.eta = eta
    images = np.full((2, 8, 8, 1), int(eta * 100), np.uint8)
    npz, _ = sample.write_samples(
        str(tmp_path),
        images,
        sample.sample_tag(config, 10),
        sample.sampler_settings(config),
    )
    written[eta] = npz
  assert written[0.0] != written[1.0]
  for eta, npz in written.items():
    with np.load(npz) as z:
      assert int(z["images"][0, 0, 0, 0]) == int(eta * 100)
      assert json.loads(str(z["settings"]))["eta"] == eta


@pytest.mark.slow
def test_eval_fid_on_digits_caches_statistics_and_resumes_sample_chunks(tmp_path, trained, caplog):
  _, config, _ = trained
  workdir = fresh_workdir(tmp_path, trained)
  # A chunk left by an interrupted run (call 0, 32 images): it must be used, not redrawn.
  tag = f"step{STEP}_ancestral{config.diffusion.num_timesteps}_seed{config.sampling.seed}"
  chunk_dir = os.path.join(workdir, "eval", f"fid_chunks_{tag}_bs{config.sampling.batch_size}")
  os.makedirs(chunk_dir)
  sentinel = np.full((32, 8, 8, 1), 77, np.uint8)
  np.savez(os.path.join(chunk_dir, "call_000000.npz"), images=sentinel)

  with caplog.at_level("INFO"):
    first = fid.run_eval_fid(config, workdir)
  assert re.search(
      r"FID samples: 64/64 images, [\d.]+ images/s, ETA 00:00:00 \(call 2/2\)", caplog.text
  )
  path = os.path.join(workdir, "eval", f"fid_{tag}_n64.json")
  with open(path) as f:
    written = json.load(f)
  for key in ("fid_train", "fid_test", "is_mean", "is_std", "num_samples", "extractor", "step"):
    assert key in written, key
  assert written["num_samples"] == 64 and written["extractor"] == "digits_mlp128"
  for key in ("fid_train", "fid_test", "is_mean", "is_std"):
    assert np.isfinite(written[key]), key
  assert written["fid_train"] > 0 and 1.0 <= written["is_mean"] <= 10.0
  assert sorted(written["reference_stats_computed"]) == ["test", "train"]
  assert written["samples_reused"] is False
  with np.load(written["samples_file"]) as z:
    samples = z["images"]
  assert samples.shape == (64, 8, 8, 1) and samples.dtype == np.uint8
  np.testing.assert_array_equal(samples[:32], sentinel)  # the chunk was resumed
  assert not np.all(samples[32:] == 77)
  assert not os.path.exists(chunk_dir)  # cleaned up once complete
  # The JSON numbers are the metrics of those samples against the written statistics.
  feats = digits_classifier.features(samples)
  mu, sigma = metrics.feature_statistics(feats)
  np.testing.assert_allclose(
      written["fid_train"],
      metrics.frechet_distance(
          mu, sigma, *metrics.load_statistics(written["reference_stats"]["train"])
      ),
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      written["is_mean"],
      metrics.inception_score(digits_classifier.probs(samples), 10)[0],
      rtol=1e-6,
  )

  stats = [written["reference_stats"][s] for s in ("train", "test")]
  mtimes = [os.stat(p).st_mtime_ns for p in stats]
  second = fid.run_eval_fid(config, workdir)
  assert second["reference_stats_computed"] == []
  assert second["samples_reused"] is True and second["samples_file"] == written["samples_file"]
  assert [os.stat(p).st_mtime_ns for p in stats] == mtimes
  np.testing.assert_allclose(second["fid_train"], first["fid_train"], rtol=1e-9)

  # Samples drawn another way (here: without clipping) are not reused, and say how they were drawn.
  with np.load(written["samples_file"]) as z:
    assert json.loads(str(z["settings"])) == dict(
        sampler="ancestral",
        num_timesteps=config.diffusion.num_timesteps,
        eta=0.0,
        clip_denoised=True,
        seed=config.sampling.seed,
    )
  unclipped = copy.deepcopy(config)
  unclipped.sampling.clip_denoised = False
  third = fid.run_eval_fid(unclipped, workdir)
  assert third["samples_reused"] is False
  assert os.path.basename(third["samples_file"]) == (
      f"samples_step{STEP}_ancestral{config.diffusion.num_timesteps}_noclip"
      f"_seed{config.sampling.seed}_fid64.npz"
  )
  with np.load(third["samples_file"]) as z:
    assert json.loads(str(z["settings"]))["clip_denoised"] is False
  # ... and the clipped samples are still there, unchanged: nothing saved is lost.
  assert os.path.basename(written["samples_file"]) == f"samples_{tag}_fid64.npz"
  with np.load(written["samples_file"]) as z:
    np.testing.assert_array_equal(z["images"], samples)
    assert json.loads(str(z["settings"]))["clip_denoised"] is True


def test_fid_user_errors_are_one_line_user_errors(tmp_path):
  config = small_config()
  with pytest.raises(errors.ConfigError, match="give a workdir or a stats_dir"):
    fid.default_stats_dir(config, None)
  # A damaged cached statistics file names itself and the remedy.
  path = fid.reference_statistics_path(config, "test", str(tmp_path))
  with open(path, "wb") as f:
    f.write(b"not an npz")
  with pytest.raises(errors.DataError) as info:
    fid.get_reference_statistics(config, "test", str(tmp_path))
  assert path in str(info.value) and "delete it" in str(info.value)
  assert "\n" not in str(info.value)


def test_fid_of_real_heldout_digits_is_far_below_that_of_noise(tmp_path):
  config = small_config()
  path = str(tmp_path / "stats.npz")
  extractor = features.get_feature_extractor(config)
  assert extractor.name == "digits_mlp128"
  mu, sigma, n = fid.compute_reference_statistics(config, "train", path, extractor)
  assert n == 1500 and os.path.exists(path)
  mu2, sigma2 = metrics.load_statistics(path)
  np.testing.assert_allclose(mu2, mu)
  heldout = sources.load_split_array(config.data, "test")
  noise = np.random.default_rng(0).integers(0, 256, heldout.shape).astype(np.uint8)
  fid_real = fid.fid_from_images(heldout, mu, sigma, extractor)
  fid_noise = fid.fid_from_images(noise, mu, sigma, extractor)
  assert fid_real < 5.0, fid_real
  assert fid_noise > 10 * fid_real, (fid_real, fid_noise)


class _PixelStatistics(features.FeatureExtractor):
  """A cheap stand-in for Inception: per-channel means and standard deviations of the pixels."""

  name = "pixel_statistics"

  def __call__(self, images):
    x = np.asarray(images, np.float64)
    feats = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)  # [N, 2C]
    logits = x.mean(axis=(1, 2)) / 32.0  # [N, C]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return feats, probs


def test_eval_fid_on_a_streaming_tfds_source(tmp_path, cifar_metadata_dir, monkeypatch):
  """eval_fid end to end with data.in_memory=False (the 256x256 configs' streaming iterator).

  The reference statistics of both splits equal those of the raw TFDS images, and the FID
  in the JSON is that of the drawn samples against them.
  """
  import tensorflow_datasets as tfds

  config = small_config()
  config.data.update(
      dataset="cifar10", image_size=32, channels=3, data_dir=cifar_metadata_dir, in_memory=False
  )
  config.eval.num_fid_samples = 8
  workdir = str(tmp_path / "run")
  write_checkpoint(workdir, config)
  # Samples as --mode=sample would leave them (drawing them is tested on the digits above).
  samples = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  sample.write_samples(
      os.path.join(workdir, "samples"),
      samples,
      sample.sample_tag(config, STEP),
      fid.fid_settings(config),
  )
  monkeypatch.setattr(fid, "get_feature_extractor", lambda config: _PixelStatistics())
  with tfds.testing.mock_data(
      num_examples=40, data_dir=cifar_metadata_dir, policy=tfds.testing.MockPolicy.USE_FILES
  ):
    result = fid.run_eval_fid(config, workdir)
    builder = tfds.builder("cifar10", data_dir=cifar_metadata_dir)
    raw = {
        split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))[
            "image"
        ][: builder.info.splits[split].num_examples]
        for split in ("train", "test")
    }
  assert {k: v.shape for k, v in raw.items()} == {
      "train": (40, 32, 32, 3),
      "test": (20, 32, 32, 3),
  }
  assert sorted(result["reference_stats_computed"]) == ["test", "train"]
  assert result["num_samples"] == 8 and result["samples_reused"] is True
  for split, images in raw.items():
    mu, sigma = metrics.load_statistics(result["reference_stats"][split])
    want_mu, want_sigma = metrics.feature_statistics(_PixelStatistics()(images)[0])
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-12)
  mu, sigma = metrics.feature_statistics(_PixelStatistics()(samples)[0])
  for key, split in (("fid_train", "train"), ("fid_test", "test")):
    ref = metrics.feature_statistics(_PixelStatistics()(raw[split])[0])
    np.testing.assert_allclose(result[key], metrics.frechet_distance(mu, sigma, *ref), rtol=1e-9)


@pytest.mark.slow
def test_missing_inception_weights_fail_before_any_work(tmp_path, trained):
  config = small_config()
  config.data.dataset = "cifar10"
  config.data.channels = 3
  config.eval.inception_weights = str(tmp_path / "nope.npz")
  with pytest.raises(errors.WeightsNotFoundError, match="Inception FID weights not found"):
    fid.run_eval_fid(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "samples"))


@pytest.mark.slow
def test_stats_only_cli_writes_the_cached_statistics(tmp_path):
  stats_dir = str(tmp_path / "stats")
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "ddpm_jax.evaluation.fid",
          f"--config={ROOT}/configs/test.py",
          "--stats_only",
          f"--stats_dir={stats_dir}",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  paths = json.loads(proc.stdout[proc.stdout.index("{") :])
  config = small_config()
  assert paths == {
      s: fid.reference_statistics_path(config, s, stats_dir) for s in ("train", "test")
  }
  mu, sigma = metrics.load_statistics(paths["test"])
  feats = digits_classifier.features(sources.load_split_array(config.data, "test"))
  np.testing.assert_allclose(mu, feats.mean(axis=0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------


def _toy_diffusion():
  return GaussianDiffusion(schedules.get_beta_schedule("linear", 20, 1e-3, 0.3))


def _toy_model(x, t):  # an eps-predictor that is not the identity
  return 0.5 * jnp.tanh(x) + 0.01 * t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def test_interpolation_uses_shared_noise_and_fixed_reverse_noise():
  d = _toy_diffusion()
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  b = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  lambdas = jnp.linspace(0.0, 1.0, 5)
  key = jax.random.PRNGKey(3)
  # Same source on both ends: every lambda decodes the same latent with the same noise.
  same = figures.interpolate(d, _toy_model, a, a, 9, lambdas, key)
  np.testing.assert_allclose(same, jnp.broadcast_to(same[:, :1], same.shape), atol=1e-6)
  out = figures.interpolate(d, _toy_model, a, b, 9, lambdas, key)
  assert out.shape == (2, 5, 4, 4, 1)
  assert float(jnp.abs(out[:, 0] - out[:, -1]).max()) > 1e-2
  # lambda = 0 is exactly the reverse process from x_t of the first image.
  eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 20), (4, 4, 1)))(
      jax.vmap(lambda p: jax.random.fold_in(key, p))(jnp.arange(2))
  )
  xt = d.q_sample(a, jnp.full((2,), 9), eps)
  pair_keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(jnp.arange(2))
  noise_fn = lambda s: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, s), (4, 4, 1)))(
      pair_keys
  )
  ref = np_ancestral_from(d, np.asarray(xt), 9, noise_fn)
  np.testing.assert_allclose(out[:, 0], ref, atol=1e-5)


def np_ancestral_from(d, x, t_start, noise_fn):
  """Algorithm 2 from x_t in float64 numpy (fixedlarge variance, x0 clipped), for _toy_model."""
  betas = np.asarray(schedules.get_beta_schedule("linear", 20, 1e-3, 0.3), np.float64)
  ac = np.cumprod(1 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  var = np.append(betas[1] * (1 - ac[0]) / (1 - ac[1]), betas[1:])  # sigma_1^2 = beta~_1
  for s in range(t_start, -1, -1):
    t = jnp.full((x.shape[0],), s, jnp.int32)
    eps = np.asarray(_toy_model(jnp.asarray(x, jnp.float32), t), np.float64)
    x0 = np.clip((x - np.sqrt(1 - ac[s]) * eps) / np.sqrt(ac[s]), -1, 1)
    mean = (betas[s] * np.sqrt(ac_prev[s]) * x0 + (1 - ac_prev[s]) * np.sqrt(1 - betas[s]) * x) / (
        1 - ac[s]
    )
    x = mean + (s > 0) * np.sqrt(var[s]) * np.asarray(noise_fn(s), np.float64)
  return x


def test_progressive_generation_ends_at_the_sample():
  d = _toy_diffusion()
  preds, ts, x0 = figures.progressive_generation(
      d, _toy_model, (3, 4, 4, 1), jax.random.PRNGKey(0), columns=4
  )
  assert list(np.asarray(ts)) == [19, 15, 10, 5, 0]
  assert preds.shape == (3, 5, 4, 4, 1)
  # At t = 0 the mean is the predicted x0 (fixedlarge) and no noise is added.
  np.testing.assert_allclose(preds[:, -1], x0, atol=1e-5)
  assert float(jnp.abs(preds[:, 0] - preds[:, -1]).max()) > 1e-3


@pytest.mark.slow
def test_run_figures_writes_pngs_of_the_expected_size(tmp_path, trained, caplog):
  _, config, _ = trained
  workdir = fresh_workdir(tmp_path, trained)
  config.eval.figure_rows = 2
  with caplog.at_level("INFO"):
    out = figures.run_figures(config, workdir)
  T = config.diffusion.num_timesteps
  assert f"timesteps [{T - 1}, {T - 10}, " in caplog.text and "np.int" not in caplog.text
  assert out["progressive_timesteps"] == [T - 1] + list(range(T - 10, -1, -10))
  assert out["interp_t"] == T // 2 - 1
  up = 32 // 8  # save_grid enlarges 8x8 tiles 4x, then separates them by 1-pixel lines
  size = lambda rows, cols: (cols * 33 + 1, rows * 33 + 1)  # PIL: (width, height)
  prog = Image.open(os.path.join(workdir, "figures", f"progressive_step{STEP}.png"))
  assert prog.size == size(2, 11)
  interp = Image.open(os.path.join(workdir, "figures", f"interpolation_step{STEP}.png"))
  assert interp.size == size(2, 13)
  # The first and last columns are the source images x0 and x0'.
  grid = np.asarray(interp)
  real = sources.load_split_array(config.data, config.data.eval_split)[:4, ..., 0]
  tile = lambda r, c: grid[1 + r * 33 : 1 + r * 33 + 32 : up, 1 + c * 33 : 1 + c * 33 + 32 : up]
  np.testing.assert_array_equal(tile(0, 0), real[0])
  np.testing.assert_array_equal(tile(0, 12), real[1])
  np.testing.assert_array_equal(tile(1, 0), real[2])


# ----------------------------------------------------------------------------
# Results never replaced by others; statistics by content; the eval split of a folder
# ----------------------------------------------------------------------------


def test_fid_results_of_other_draws_get_other_files(tmp_path):
  config = test_config.get_config()
  ancestral = fid.result_path(config, "w", 20)
  assert ancestral == os.path.join("w", "eval", "fid_step20_ancestral100_seed1_n64.json")
  config.sampling.sampler, config.sampling.num_steps = "ddim", 10
  assert fid.result_path(config, "w", 20) == os.path.join(
      "w", "eval", "fid_step20_ddim10_eta0_seed1_n64.json"
  )
  config.eval.num_fid_samples = 1024
  assert fid.result_path(config, "w", 20).endswith("_n1024.json")


def test_samples_drawn_over_other_devices_are_not_replaced(tmp_path):
  draw = dict(num_samples=8, batch_size=8, devices=2, processes=1)
  images = np.zeros((8, 8, 8, 1), np.uint8)
  npz, _ = sample.write_samples(str(tmp_path), images, "step1_ancestral100_seed1_n8_bs8", draw=draw)
  sample.check_not_replacing(npz, draw)  # drawn the same way: the same images, may be redrawn
  sample.check_not_replacing(str(tmp_path / "other.npz"), draw)  # no file yet
  with pytest.raises(errors.WorkdirError) as e:
    sample.check_not_replacing(npz, dict(draw, devices=4))
  assert str(e.value) == (
      f"{npz} exists, drawn over 2 devices and 1 process(es); this run draws over 4 devices "
      "and 1 process(es), which gives other images: move the file away, or draw with its "
      "device count (--cpu_devices)"
  )
  # eval_fid reuses --mode=sample's files, whose names now end in the count and the batch.
  settings = sample.sampler_settings(test_config.get_config())
  sample.write_samples(
      str(tmp_path / "samples"), images, "step1_ancestral100_seed1_n8_bs8", settings
  )
  assert fid.find_existing_samples(
      str(tmp_path), "step1_ancestral100_seed1", 8, settings
  ) == os.path.join(str(tmp_path), "samples", "samples_step1_ancestral100_seed1_n8_bs8.npz")


def _image_folder(root, names, value=0):
  os.makedirs(root, exist_ok=True)
  for name in names:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8), mode="L").save(path)


def test_folder_statistics_are_keyed_by_the_folder_content(tmp_path, caplog):
  folder = str(tmp_path / "images")
  _image_folder(folder, ["a.png", "b.png"])
  config = small_config()
  config.data.dataset, config.data.folder = "folder", folder
  stats_dir = str(tmp_path / "stats")
  calls = []

  class Extractor:
    name = "fake"

    def __call__(self, images):
      calls.append(images.shape[0])
      return (
          images.reshape(images.shape[0], -1)[:, :3].astype(np.float64)
          + np.arange(images.shape[0])[:, None],
          None,
      )

  first = fid.reference_statistics_path(config, "train", stats_dir)
  mu, _, path, computed = fid.get_reference_statistics(config, "train", stats_dir, Extractor())
  assert path == first and computed and calls == [2]
  assert fid.get_reference_statistics(config, "train", stats_dir, Extractor())[3] is False
  _image_folder(folder, ["c.png"])  # an image added: other statistics, computed afresh
  mu2, _, path2, computed = fid.get_reference_statistics(config, "train", stats_dir, Extractor())
  assert path2 != first and computed and calls == [2, 3]
  _image_folder(folder, ["c.png"], value=200)  # one rewritten (new size or time)
  os.utime(os.path.join(folder, "c.png"), ns=(1, 1))
  assert fid.reference_statistics_path(config, "train", stats_dir) != path2
  config.data.channels = 3  # the same files decoded another way
  assert fid.reference_statistics_path(config, "train", stats_dir) not in (first, path2)


def test_a_folder_without_the_eval_split_is_not_evaluated_on_its_training_images(tmp_path):
  folder = str(tmp_path / "images")
  _image_folder(folder, ["a.png", "b.png"])
  config = small_config()
  config.data.dataset, config.data.folder = "folder", folder
  expected = (
      f"data.folder={folder!r} has no 'test' sub-directory (data.eval_split), so it would be "
      f"evaluated on its training images; put held-out images in {folder}/test, or evaluate "
      "on the training images by name with --config.data.eval_split=train"
  )
  for run in (bpd.run_eval_bpd, fid.run_eval_fid):  # before any checkpoint is read
    with pytest.raises(errors.DataError) as e:
      run(config, str(tmp_path / "no_workdir"))
    assert str(e.value) == expected
  config.data.eval_split = "train"  # asked for by name
  sources.check_eval_split(config.data)
  config.data.eval_split = "test"
  _image_folder(folder, ["test/c.png"])
  sources.check_eval_split(config.data)
