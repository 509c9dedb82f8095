"""Tests of ddpm_jax.data: sources, the step-derived order, iterators (CPU only, no network)."""

import itertools
import logging
import os
import re
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn import datasets as sk_datasets

from configs import test as test_config
from ddpm_jax import errors
from ddpm_jax import images as image_lib
from ddpm_jax.data import order, pipeline, sources
from helpers import write_images

IMAGE_EXTS = ".png, .jpg, .jpeg, .webp, .bmp"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(**overrides):
  cfg = ml_collections.ConfigDict(
      dict(
          dataset="digits",
          image_size=8,
          channels=1,
          random_flip=False,
          data_dir=None,
          folder="",
          train_split="train",
          eval_split="test",
          in_memory=True,
          shuffle_seed=7,
          shuffle_buffer_size=10_000,
      )
  )
  cfg.update(overrides)
  return cfg


def train_images(*args, **kwargs):
  """The image arrays [D, b, H, W, C] of pipeline.create_train_iterator's batches."""
  return (b["image"] for b in pipeline.create_train_iterator(*args, **kwargs))


def eval_pairs(*args, **kwargs):
  """(images [D, b, H, W, C], mask [D, b]) of pipeline.create_eval_iterator's batches."""
  return ((b["image"], b["mask"]) for b in pipeline.create_eval_iterator(*args, **kwargs))


def digits_reference_uint8():
  """Independent uint8 digits: round-half-up of v*255/16 in integer maths."""
  raw = sk_datasets.load_digits().images.astype(np.int64)  # [1797, 8, 8]
  return ((raw * 255 + 8) // 16).astype(np.uint8)[..., None]


def philox_indices(seed, step, batch_size, n):
  """Spec of the step-derived order, written independently of the module."""
  out = []
  for g in range(step * batch_size, (step + 1) * batch_size):
    e, pos = divmod(g, n)
    perm = np.random.Generator(np.random.Philox(key=[seed, e])).permutation(n)
    out.append(perm[pos])
  return np.array(out)


def as_uint8(x):
  """float in [-1, 1] produced by x/127.5-1 -> the exact uint8 it came from."""
  u = (np.asarray(x, np.float64) + 1.0) * 127.5
  r = np.round(u)
  assert np.max(np.abs(u - r)) < 1e-3  # every value is k/127.5 - 1
  return r.astype(np.uint8)


# ---------------------------------------------------------------- digits --


def test_digits_arrays_equal_independent_computation():
  ref = digits_reference_uint8()
  train = sources.load_split_array(make_config(), "train")
  test = sources.load_split_array(make_config(), "test")
  assert train.dtype == np.uint8 and test.dtype == np.uint8
  assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
  np.testing.assert_array_equal(train, ref[:1500])
  np.testing.assert_array_equal(test, ref[1500:])
  assert train.min() == 0 and train.max() == 255

  big = sources.load_split_array(make_config(image_size=16), "test")
  assert big.shape == (297, 16, 16, 1)
  np.testing.assert_array_equal(big, np.repeat(np.repeat(ref[1500:], 2, axis=1), 2, axis=2))


def test_scaling_is_exact_and_spans_minus_one_to_one():
  u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  x = image_lib.scale_images(u)
  assert x.dtype == np.float32
  np.testing.assert_allclose(x, u.astype(np.float64) / 127.5 - 1, atol=1e-7)
  assert x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(image_lib.to_uint8(x), u)


def test_train_batches_match_philox_reference():
  cfg = make_config(random_flip=False)
  ref = digits_reference_uint8()[:1500]
  batch_size = 64
  it = train_images(cfg, batch_size, 0, 0, 1, 1)
  for step, batch in zip(range(26), it):  # crosses the epoch boundary
    assert batch.shape == (1, 64, 8, 8, 1) and batch.dtype == np.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    expected = ref[philox_indices(7, step, batch_size, 1500)]
    np.testing.assert_array_equal(as_uint8(batch[0]), expected)
    np.testing.assert_allclose(batch[0], expected.astype(np.float64) / 127.5 - 1, atol=1e-6)


def test_resume_gives_identical_batches():
  cfg = make_config(random_flip=True)
  full = list(itertools.islice(train_images(cfg, 64, 0, 0, 1, 2), 30))
  for start in (1, 23, 24):  # 23/24 straddle/follow the first epoch boundary
    resumed = list(itertools.islice(train_images(cfg, 64, start, 0, 1, 2), 30 - start))
    for a, b in zip(full[start:], resumed):
      np.testing.assert_array_equal(a, b)
  # A different seed gives a different order.
  other = next(train_images(make_config(shuffle_seed=8, random_flip=True), 64, 0, 0, 1, 2))
  assert not np.array_equal(other, full[0])


def test_each_epoch_visits_every_example_once():
  cfg = make_config(random_flip=False)
  ref = digits_reference_uint8()[:1500].reshape(1500, -1)
  it = train_images(cfg, 60, 0, 0, 1, 1)  # 25 steps per epoch
  batches = [as_uint8(b[0]).reshape(60, -1) for b in itertools.islice(it, 50)]
  epoch0 = np.concatenate(batches[:25])
  epoch1 = np.concatenate(batches[25:])

  def canonical(rows):
    return rows[np.lexsort(rows.T[::-1])]

  np.testing.assert_array_equal(canonical(epoch0), canonical(ref))
  np.testing.assert_array_equal(canonical(epoch1), canonical(ref))
  assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch
  assert not np.array_equal(epoch0, ref)  # actually shuffled
  # Same by index, with a batch size that does not divide N.
  for e in range(2):
    idx = np.concatenate([order.batch_example_indices(7, s, 64, 1500)[0] for s in range(48)])[
        e * 1500 : (e + 1) * 1500
    ]
    np.testing.assert_array_equal(np.sort(idx), np.arange(1500))


def test_flips_are_width_flips_about_half_the_time():
  plain = train_images(make_config(random_flip=False), 64, 0, 0, 1, 1)
  flipped = train_images(make_config(random_flip=True), 64, 0, 0, 1, 1)
  n_flipped = n_asym = 0
  for a, b in itertools.islice(zip(plain, flipped), 20):
    a, b = a[0], b[0]
    for x, y in zip(a, b):
      same = np.array_equal(x, y)
      mirrored = np.array_equal(x[:, ::-1, :], y)
      assert same or mirrored
      if not np.array_equal(x, x[:, ::-1, :]):
        n_asym += 1
        n_flipped += mirrored
  assert n_asym > 1000
  assert 0.45 < n_flipped / n_asym < 0.55
  # The flip of an example depends on (seed, counter) only.
  g = np.arange(100_000)
  np.testing.assert_array_equal(order.flip_mask(3, g), order.flip_mask(3, g))
  assert 0.49 < order.flip_mask(3, g).mean() < 0.51
  assert 0.4 < np.mean(order.flip_mask(3, g) != order.flip_mask(4, g)) < 0.6


def test_device_and_process_count_independence():
  cfg = make_config(random_flip=True)
  for start in (0, 23):
    one = list(itertools.islice(train_images(cfg, 32, start, 0, 1, 1), 3))
    eight = list(itertools.islice(train_images(cfg, 32, start, 0, 1, 8), 3))
    p0 = list(itertools.islice(train_images(cfg, 32, start, 0, 2, 2), 3))
    p1 = list(itertools.islice(train_images(cfg, 32, start, 1, 2, 2), 3))
    for a, b, c, d in zip(one, eight, p0, p1):
      assert a.shape == (1, 32, 8, 8, 1)
      assert b.shape == (8, 4, 8, 8, 1)
      assert c.shape == d.shape == (2, 8, 8, 8, 1)
      np.testing.assert_array_equal(b.reshape(a.shape[1:]), a[0])
      np.testing.assert_array_equal(
          np.concatenate([c.reshape(-1, 8, 8, 1), d.reshape(-1, 8, 8, 1)]), a[0]
      )


def test_batch_size_not_divisible_raises():
  cfg = make_config()
  with pytest.raises(ValueError, match=r"training\.batch_size"):
    train_images(cfg, 30, 0, 0, 1, 8)
  with pytest.raises(ValueError, match=r"training\.batch_size"):
    train_images(cfg, 6, 0, 0, 2, 2)
  with pytest.raises(ValueError, match="batch_size"):
    eval_pairs(cfg, 6, 0, 2, 2)


def test_eval_iterator_counts_every_example_once():
  cfg = make_config()
  ref = digits_reference_uint8()[1500:]  # 297 examples
  batches = list(eval_pairs(cfg, 64, 0, 1, 2))
  assert len(batches) == 5
  for images, mask in batches:
    assert images.shape == (2, 32, 8, 8, 1) and images.dtype == np.float32
    assert mask.shape == (2, 32) and mask.dtype == bool
    assert images.min() >= -1 and images.max() <= 1
  real = np.concatenate([im.reshape(-1, 8, 8, 1)[m.reshape(-1)] for im, m in batches])
  np.testing.assert_array_equal(as_uint8(real), ref)
  assert sum(int(m.sum()) for _, m in batches) == 297

  # Two processes: same number of batches; together each example once.
  per_proc = [list(eval_pairs(cfg, 64, p, 2, 2)) for p in (0, 1)]
  assert len(per_proc[0]) == len(per_proc[1]) == 5
  rows = []
  for k in range(5):
    for p in (0, 1):
      im, m = per_proc[p][k]
      assert im.shape == (2, 16, 8, 8, 1)
      rows.append(im.reshape(-1, 8, 8, 1)[m.reshape(-1)])
  np.testing.assert_array_equal(as_uint8(np.concatenate(rows)), ref)


# ------------------------------------------------------------------ TFDS --


def cifar_config(**overrides):
  kwargs = dict(dataset="cifar10", image_size=32, channels=3, data_dir="/nonexistent")
  kwargs.update(overrides)
  return make_config(**kwargs)


def test_tfds_cifar10_mock_streaming_and_in_memory(cifar_metadata_dir):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(
      num_examples=40, data_dir=cifar_metadata_dir, policy=tfds.testing.MockPolicy.USE_FILES
  ):
    raw = tfds.as_numpy(
        tfds.builder("cifar10").as_dataset(split="train", batch_size=-1, shuffle_files=False)
    )["image"]
    assert raw.shape == (40, 32, 32, 3) and raw.dtype == np.uint8
    raw_set = {r.tobytes() for r in raw}

    # Streaming (tf.data) pipeline.
    cfg = cifar_config(in_memory=False, random_flip=True)
    stream = list(itertools.islice(train_images(cfg, 8, 0, 0, 1, 2), 6))
    n_flipped = 0
    for batch in stream:
      assert batch.shape == (2, 4, 32, 32, 3) and batch.dtype == np.float32
      assert batch.min() >= -1.0 and batch.max() <= 1.0
      for image in as_uint8(batch.reshape(-1, 32, 32, 3)):
        assert image.tobytes() in raw_set or image[:, ::-1].tobytes() in raw_set
        n_flipped += image.tobytes() not in raw_set
    assert 0 < n_flipped < 48
    # Resuming at step 3 reproduces the uninterrupted stream.
    resumed = list(itertools.islice(train_images(cfg, 8, 3, 0, 1, 2), 3))
    for a, b in zip(stream[3:], resumed):
      np.testing.assert_array_equal(a, b)

    # Streaming eval: the 20 test examples (per the metadata), padded.
    evals = list(eval_pairs(cfg, 16, 0, 1, 2))
    assert len(evals) == 2
    assert evals[0][0].shape == (2, 8, 32, 32, 3)
    assert sum(int(m.sum()) for _, m in evals) == 20
    for images, mask in evals:
      assert images.min() >= -1.0 and images.max() <= 1.0
      assert np.all(images[~mask] == -1.0)  # zero padding, masked out
    # Two processes: 10 + 10 examples, the same number of batches each.
    per_proc = [list(eval_pairs(cfg, 8, p, 2, 2)) for p in (0, 1)]
    assert len(per_proc[0]) == len(per_proc[1]) == 3
    assert [sum(int(m.sum()) for _, m in b) for b in per_proc] == [10, 10]

    # In-memory pipeline over the same split.
    cfg = cifar_config(in_memory=True, random_flip=False)
    array = sources.load_split_array(cfg, "train")
    np.testing.assert_array_equal(array, raw)
    batch = next(train_images(cfg, 8, 0, 0, 1, 2))
    assert batch.shape == (2, 4, 32, 32, 3)
    np.testing.assert_array_equal(
        as_uint8(batch.reshape(8, 32, 32, 3)), raw[philox_indices(7, 0, 8, 40)]
    )


def test_tfds_missing_dataset_fails_fast_with_instructions(tmp_path):
  empty = str(tmp_path / "empty_data_dir")
  os.makedirs(empty)
  cfg = cifar_config(in_memory=False, data_dir=empty)
  t0 = time.time()
  with pytest.raises(errors.DataNotPreparedError) as info:
    train_images(cfg, 8, 0, 0, 1, 1)  # fails before iterating
  assert time.time() - t0 < 10
  msg = str(info.value)
  assert "not prepared" in msg
  assert f"tfds build cifar10 --data_dir={empty}" in msg
  assert os.path.join(empty, "cifar10") in msg

  cfg = make_config(
      dataset="celeb_a_hq/256", image_size=256, channels=3, data_dir=empty, in_memory=False
  )
  t0 = time.time()
  with pytest.raises(errors.DataNotPreparedError) as info:
    sources.load_split_array(cfg, "train")
  assert time.time() - t0 < 10
  assert "manual download" in str(info.value)
  assert os.path.join(empty, "downloads", "manual") in str(info.value)


# ---------------------------------------------------------------- folder --


def test_folder_crop_resize_and_skipped_files(tmp_path, caplog):
  rng = np.random.default_rng(0)
  # 16 wide x 8 high: red margins (cropped away), green centre square.
  margins = np.zeros((8, 16, 3), np.uint8)
  margins[:, :4] = margins[:, 12:] = (255, 0, 0)
  margins[:, 4:12] = (0, 255, 0)
  Image.fromarray(margins).save(tmp_path / "a_margins.png")
  # 4 wide x 6 high: cropped to rows 1..4, already 4x4, so no resize.
  exact = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
  Image.fromarray(exact).save(tmp_path / "b_exact.png")
  (tmp_path / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  (tmp_path / "notes.txt").write_text("not an image, not counted")
  os.makedirs(tmp_path / "sub")
  gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
  Image.fromarray(gray, mode="L").save(tmp_path / "sub" / "d_gray.bmp")
  Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "e.jpg")

  with caplog.at_level(logging.WARNING):
    split, skipped = sources.load_image_folder(str(tmp_path), 4, 3)
  images = split.images
  assert skipped == 1
  assert any("Skipped 1" in r.getMessage() for r in caplog.records)
  assert images.shape == (4, 4, 4, 3) and images.dtype == np.uint8
  # Sorted order: a_margins, b_exact, e.jpg, sub/d_gray.bmp.
  np.testing.assert_array_equal(images[0], np.broadcast_to([0, 255, 0], (4, 4, 3)))
  np.testing.assert_array_equal(images[1], exact[1:5])
  np.testing.assert_array_equal(images[3], np.repeat(gray[..., None], 3, -1))

  cfg = make_config(dataset="folder", folder=str(tmp_path), image_size=4, channels=3)
  np.testing.assert_array_equal(sources.load_split_array(cfg, "train"), images)
  batch = next(train_images(cfg, 4, 0, 0, 1, 1))
  assert batch.shape == (1, 4, 4, 4, 3)
  assert batch.min() >= -1 and batch.max() <= 1


# ------------------------------------------------- undecodable, unprepared --


def test_undecodable_images_are_skipped_and_counted(tmp_path, caplog):
  folder = str(tmp_path / "images")
  write_images(folder, good=3, bad=2)
  with caplog.at_level(logging.WARNING):
    split, skipped = sources.load_image_folder(folder, 8, channels=1)
  assert split.images.shape == (3, 8, 8, 1) and skipped == 2
  assert f"Skipped 2 of 5 image files under {folder} that could not be decoded." in caplog.text


def test_folder_with_only_undecodable_images(tmp_path):
  folder = str(tmp_path / "images")
  write_images(folder, good=0, bad=2)
  with pytest.raises(errors.DataError) as e:
    sources.load_image_folder(folder, 8, channels=1)
  assert str(e.value) == (
      f"No decodable image ({IMAGE_EXTS}) under data.folder={folder!r} " "(2 undecodable files)."
  )


def test_tfds_dataset_not_prepared_fails_at_once_with_instructions(tmp_path):
  config = test_config.get_config()
  config.data.dataset, config.data.channels = "cifar10", 3
  config.data.data_dir = str(tmp_path)
  with pytest.raises(errors.DataNotPreparedError) as e:
    sources.get_tfds_builder(config.data)
  message = str(e.value)
  assert re.match(
      rf"TFDS data set 'cifar10' \(version [\d.]+\) is not prepared: no "
      rf"dataset_info.json in {re.escape(str(tmp_path))}/cifar10/[\d.]+\. Nothing is "
      r"downloaded here\.",
      message,
  ), message
  assert f"tfds build cifar10 --data_dir={tmp_path}" in message
