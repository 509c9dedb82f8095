"""Class-conditional training and classifier-free guidance, and importance-sampled timesteps."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from ddpm_jax import builders, errors, parallel, sample
from ddpm_jax.data import order, pipeline, sources
from ddpm_jax.diffusion import guidance, samplers, schedules
from ddpm_jax.diffusion.gaussian import GaussianDiffusion
from ddpm_jax.training import step as step_lib
from ddpm_jax.training import timesteps


def conditional_config():
  config = test_config.get_config()
  config.model.num_classes = 10
  return config


# ----------------------------------------------------------------------------
# Labels in the data
# ----------------------------------------------------------------------------


def test_digits_labels_follow_their_images_in_the_step_order():
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  split = sources.load_digits("train")
  ref = sk_datasets.load_digits().target[:1500]
  np.testing.assert_array_equal(split.labels, ref)
  batch = order.local_batch(split.images, split.labels, 7, 32, 3, False, 0, 1, 2)
  indices, _ = order.batch_example_indices(3, 7, 32, 1500)
  np.testing.assert_array_equal(batch["label"].reshape(-1), ref[indices])
  np.testing.assert_array_equal(
      batch["image"].reshape(32, 8, 8, 1), split.images[indices] / np.float32(127.5) - 1
  )


def _folder(root, classes, per_class=2, loose=0):
  rng = np.random.default_rng(0)
  os.makedirs(root, exist_ok=True)
  for c in classes:
    os.makedirs(root / c, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(
          root / c / f"{i}.png"
      )
  for i in range(loose):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(
        root / f"loose{i}.png"
    )


def _folder_config(folder):
  return ml_collections.ConfigDict(
      dict(
          dataset="folder",
          folder=str(folder),
          image_size=8,
          channels=1,
          train_split="train",
          in_memory=True,
      )
  )


def test_folder_classes_are_sorted_sub_directories(tmp_path):
  _folder(tmp_path, ["zebra", "ant", "cat"])
  split = pipeline.load_train_data(_folder_config(tmp_path), num_classes=3)
  assert split.class_names == ("ant", "cat", "zebra")
  np.testing.assert_array_equal(split.labels, [0, 0, 1, 1, 2, 2])


def test_bad_labels_are_one_line_at_start_up(tmp_path):
  _folder(tmp_path / "three", ["a", "b", "c"])
  with pytest.raises(errors.DataError) as e:
    pipeline.load_train_data(_folder_config(tmp_path / "three"), num_classes=2)
  assert str(e.value) == (
      "data.dataset='folder' has label 2 ('c'), but model.num_classes=2 "
      "allows 0..1; its classes are ['a', 'b', 'c']"
  )
  # A class without a readable image (an empty sub-directory, or one of corrupt files) would
  # be trained and sampled from its embedding alone: refused, naming it.
  _folder(tmp_path / "three", ["a", "b", "c"])
  os.makedirs(tmp_path / "three" / "d")
  with pytest.raises(errors.DataError) as e:
    pipeline.load_train_data(_folder_config(tmp_path / "three"), num_classes=4)
  assert str(e.value) == (
      "model.num_classes=4, but class 3 has no readable training image in "
      "data.dataset='folder' (its classes: ['a', 'b', 'c']; sub-directories without a readable "
      "image: ['d']); give every class images, or train on fewer classes (model.num_classes)"
  )
  (tmp_path / "three" / "d" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  with pytest.raises(errors.DataError) as e:
    pipeline.load_train_data(_folder_config(tmp_path / "three"), num_classes=4)
  assert str(e.value) == (
      "model.num_classes=4, but class 3 ('d') has no readable training image in "
      "data.dataset='folder' (its classes: ['a', 'b', 'c', 'd']; sub-directories without a "
      "readable image: ['d']); give every class images, or train on fewer classes "
      "(model.num_classes)"
  )
  _folder(tmp_path / "loose", [], loose=3)
  with pytest.raises(errors.DataError) as e:
    pipeline.load_train_data(_folder_config(tmp_path / "loose"), num_classes=2)
  assert str(e.value) == (
      "model.num_classes=2 needs class labels, but data.dataset='folder' has none (put each "
      "class's images in a sub-directory of data.folder)"
  )


# ----------------------------------------------------------------------------
# Label dropout and guidance
# ----------------------------------------------------------------------------


def test_label_dropout_rate_matches_p_uncond():
  """Each example drops its label with probability p_uncond, from its own key (binomial test)."""
  n, p = 20_000, 0.1
  index = jnp.arange(n, dtype=jnp.int32)
  draw = jax.jit(
      lambda rng: step_lib.example_randomness(rng, 5, index, 100, (1, 1, 1), p_uncond=p)[3]
  )
  drops = np.asarray(draw(jax.random.PRNGKey(0)))
  assert abs(drops.mean() - p) < 4 * np.sqrt(p * (1 - p) / n), drops.mean()
  np.testing.assert_array_equal(drops, np.asarray(draw(jax.random.PRNGKey(0))))  # same keys
  # An example's draw does not depend on the others drawn with it.
  part = np.asarray(
      jax.jit(
          lambda rng: step_lib.example_randomness(
              rng, 5, index[100:200], 100, (1, 1, 1), p_uncond=p
          )[3]
      )(jax.random.PRNGKey(0))
  )
  np.testing.assert_array_equal(part, drops[100:200])


def _stub(x, t, y):  # an output that depends on x, t and the label
  shape = (-1,) + (1,) * (x.ndim - 1)
  return jnp.sin(x) * (1.0 + y.reshape(shape)) + 0.01 * t.reshape(shape)


@pytest.mark.parametrize("learned_variance", [False, True])
def test_guided_output_is_the_formula(learned_variance):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 2, 2, 2)), jnp.float32)
  t = jnp.asarray([5, 50, 99])
  y = jnp.asarray([1, 4, 7])
  w, null = 2.5, 10
  fn = guidance.guided_model_fn(_stub, y, null, w, learned_variance)
  c = np.asarray(_stub(x, t, y), np.float64)
  u = np.asarray(_stub(x, t, jnp.full((3,), null)), np.float64)
  want = (1 + w) * c - w * u
  if learned_variance:  # the mean half is guided, the variance half is the conditional one
    want = np.concatenate([want[..., :1], c[..., 1:]], axis=-1)
  np.testing.assert_allclose(np.asarray(fn(x, t)), want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def conditional_model():
  config = conditional_config()
  model = builders.build_model(config)
  params = builders.init_params(model, config, jax.random.PRNGKey(0))
  # The paper's init zeroes the residual branches and the output; random weights everywhere
  # make the label (and so the tests) matter.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [
      jax.random.normal(k, a.shape) / np.sqrt(np.prod(a.shape[:-1]))
      if a.ndim > 1
      else 1.0 + 0.1 * jax.random.normal(k, a.shape)
      for k, a in zip(keys, leaves)
  ]
  return config, model, jax.tree.unflatten(tree, leaves)


@pytest.mark.slow  # the module fixture compiles the conditional U-Net
def test_the_batched_two_branch_call_equals_two_calls(conditional_model):
  config, model, params = conditional_model
  assert params["class_emb"]["embedding"].shape[0] == 11  # 10 classes and "no class"
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1))
  t, y = jnp.asarray([3, 30, 60, 90]), jnp.asarray([0, 3, 6, 9])
  calls = []

  def apply(x, t, y):
    calls.append(x.shape[0])
    return model.apply({"params": params}, x, t, y)

  guided = jax.jit(guidance.guided_model_fn(apply, y, 10, 3.0))(x, t)
  assert calls == [8]  # one network call of both branches
  apply = jax.jit(apply)
  cond, uncond = apply(x, t, y), apply(x, t, jnp.full((4,), 10))
  assert float(jnp.abs(cond - uncond).max()) > 1e-3  # the label matters
  # 4 c - 3 u scales the float32 rounding of the batched call by up to 7.
  np.testing.assert_allclose(
      np.asarray(guided), np.asarray(4.0 * cond - 3.0 * uncond), rtol=0, atol=7e-5
  )


@pytest.mark.slow  # the module fixture compiles the conditional U-Net
def test_guidance_zero_is_plain_conditional_sampling_bit_for_bit(conditional_model):
  config, model, params = conditional_model
  config.sampling.num_steps = 10
  diffusion = builders.build_sampling_diffusion(config)
  labels = jnp.arange(4, dtype=jnp.int32)
  labelled = lambda x, t, y: model.apply({"params": params}, x, t, y)

  def run(model_fn):
    return jax.jit(
        lambda key: samplers.ancestral_sample_loop(diffusion, model_fn, (4, 8, 8, 1), key)
    )(jax.random.PRNGKey(5))

  guided = run(guidance.guided_model_fn(labelled, labels, 10, 0.0))
  plain = run(builders.make_model_fn(model, params, labels=labels))
  np.testing.assert_array_equal(np.asarray(guided), np.asarray(plain))
  assert (
      float(jnp.abs(run(guidance.guided_model_fn(labelled, labels, 10, 1.0)) - plain).max()) > 1e-3
  )  # guidance does change the samples


@pytest.mark.slow  # the module fixture compiles the conditional U-Net
def test_the_sde_solver_samples_a_guided_model_through_make_p_sample(conditional_model):
  """sampling.sampler='dpm_solver++_sde' reaches the SDE loop with the guided network, the
  full process and the device's key, as the other samplers do."""
  config, model, params = conditional_model
  config = ml_collections.ConfigDict(config.to_dict())
  config.sampling.sampler, config.sampling.num_steps = "dpm_solver++_sde", 5
  config.sampling.guidance_scale, config.sampling.timestep_spacing = 1.0, "logsnr"
  diffusion = builders.build_sampling_diffusion(config)
  assert diffusion.num_timesteps == config.diffusion.num_timesteps
  d = jax.local_device_count()
  labels = np.arange(2 * d, dtype=np.int32).reshape(d, 2) % 10
  p_sample = sample.make_p_sample(model, diffusion, config, per_device_batch=2)
  key = jax.random.PRNGKey(7)
  got = np.asarray(p_sample(parallel.replicate(params), jnp.broadcast_to(key, (d, 2)), labels))
  labelled = lambda x, t, y: model.apply({"params": params}, x, t, y)
  want = samplers.dpm_solver_sde_sample_loop(
      diffusion,
      guidance.guided_model_fn(labelled, jnp.asarray(labels[0]), 10, 1.0),
      (2, 8, 8, 1),
      jax.random.fold_in(key, 0),
      num_steps=5,
      spacing="logsnr",
  )
  # The CPU kernels and the samplers' compile options (on by default) change float rounding:
  # values here reach ~50, so the tolerance is relative too.
  np.testing.assert_allclose(got[0], np.asarray(want), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Importance-sampled timesteps
# ----------------------------------------------------------------------------


def test_the_history_keeps_the_last_losses_per_timestep():
  h = timesteps.init(3)
  t = jnp.asarray([0] * 12 + [2])
  losses = jnp.arange(13, dtype=jnp.float32)
  h = timesteps.update(h, t, losses)
  np.testing.assert_array_equal(h["count"], [10, 0, 1])
  np.testing.assert_array_equal(h["losses"][0], np.arange(2, 12))  # the oldest two dropped
  assert float(h["losses"][2, 0]) == 12.0
  np.testing.assert_allclose(timesteps.probabilities(h), [1 / 3] * 3)  # not warm yet: uniform
  h = dict(losses=jnp.asarray([[1.0] * 10, [2.0] * 10, [4.0] * 10]), count=jnp.full((3,), 10))
  want = np.array([1.0, 2.0, 4.0]) / 7 * (1 - timesteps.UNIFORM_FLOOR) + timesteps.UNIFORM_FLOOR / 3
  np.testing.assert_allclose(timesteps.probabilities(h), want, rtol=1e-6)


def test_loss_aware_sampling_is_unbiased():
  """With t ~ p and the weight 1 / (T p_t), the Monte-Carlo mean of the weighted loss of a fixed
  network equals its uniform-t loss within the standard error (fixed keys)."""
  T = 50
  d = GaussianDiffusion(schedules.get_beta_schedule("linear", T, 1e-3, 0.2))
  model_fn = lambda x, t: 0.5 * x + 0.02 * t.reshape((-1, 1, 1, 1)).astype(x.dtype)
  x0 = jnp.full((1, 2, 2, 1), 0.3)
  noise = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 2, 1))
  loss_at = jax.jit(jax.vmap(lambda t: d.training_losses(model_fn, x0, t[None], noise)["loss"][0]))
  per_t = np.asarray(loss_at(jnp.arange(T)), np.float64)
  uniform = per_t.mean()
  # A history that makes p far from uniform.
  history = dict(
      losses=jnp.asarray(np.outer(np.linspace(0.1, 3.0, T), np.ones(10)), jnp.float32),
      count=jnp.full((T,), 10, jnp.int32),
  )
  p = np.asarray(timesteps.probabilities(history), np.float64)
  assert p.max() / p.min() > 10
  keys = jax.random.split(jax.random.PRNGKey(2), 20_000)
  t = np.asarray(jax.vmap(lambda k: timesteps.draw(k, jnp.asarray(p, jnp.float32)))(keys))
  weighted = per_t[t] / (T * p[t])
  stderr = weighted.std() / np.sqrt(len(t))
  assert abs(weighted.mean() - uniform) < 4 * stderr, (weighted.mean(), uniform, stderr)
  # The frequencies follow p (chi-square-like check on the extreme bins).
  counts = np.bincount(t, minlength=T) / len(t)
  assert abs(counts[-1] - p[-1]) < 5 * np.sqrt(p[-1] / len(t))


def test_the_grid_of_a_conditional_model_has_one_row_per_class():
  labels = np.arange(512) % 10  # the classes in turn, 51 or 52 of each
  imgs = np.broadcast_to(labels[:, None, None, None], (512, 8, 8, 1)).astype(np.uint8)
  grid, per_row = sample.class_rows(imgs, labels)
  assert per_row == 16 and grid.shape == (10 * 16, 8, 8, 1)
  rows = grid[:, 0, 0, 0].reshape(10, 16)  # each image carries its label as its pixels
  np.testing.assert_array_equal(rows, np.repeat(np.arange(10)[:, None], 16, axis=1))
  _, per_row = sample.class_rows(imgs[:30], labels[:30])
  assert per_row == 3  # the rarest class sets the row length
