"""Train and eval iterators over the data sources, and the prefetch of batches onto the devices.

Batches are dicts of host arrays with a leading device axis: 'image' float32
[D, b, H, W, C] in [-1, 1] and, when asked for (``with_labels``), 'label' int32
[D, b]; eval batches also carry 'mask' bool [D, b] (False for padding).

In-memory sources (``data.in_memory``: digits, folder, any TFDS set that fits)
draw each step's batch in the step-derived order of ``order.py``: exact resume,
independent of the device and process count. Streaming TFDS sources (LSUN,
CelebA-HQ) read ``tfds.split_for_jax_process(train_split, p, P)`` with tf.data,
shuffled with fixed seeds, flipped with stateless per-example seeds and batched
by B/P; resuming at step s skips s * B/P records before decoding (deterministic
for the same TFDS/TF versions, files and process count). TF never sees a GPU.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Iterator, Optional

import numpy as np

from ddpm_jax import errors
from ddpm_jax import images as image_lib
from ddpm_jax.data import order, sources


def _resolve_topology(process_index, process_count, local_device_count):
  if process_index is None or process_count is None or local_device_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if local_device_count is None:
      local_device_count = jax.local_device_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return int(process_index), int(process_count), int(local_device_count)


def require_labels(data_config: Any, split: sources.Split, num_classes: int) -> np.ndarray:
  """The split's labels, checked against ``model.num_classes``; DataError when unusable."""
  if split.labels is None:
    raise errors.DataError(
        f"model.num_classes={num_classes} needs class labels, but data.dataset="
        f"{data_config.dataset!r} has none"
        + (
            " (put each class's images in a sub-directory of data.folder)"
            if data_config.dataset == "folder"
            else ""
        )
    )
  top = int(split.labels.max(initial=-1))
  if top >= num_classes:
    names = split.class_names or ()
    what = f" ({names[top]!r})" if top < len(names) else ""
    raise errors.DataError(
        f"data.dataset={data_config.dataset!r} has label {top}{what}, but model.num_classes="
        f"{num_classes} allows 0..{num_classes - 1}"
        + (f"; its classes are {list(names)}" if names else "")
    )
  return split.labels


def require_every_class(data_config: Any, split: sources.Split, num_classes: int) -> None:
  """Refuses a training split in which some class 0..num_classes-1 has no image (DataError).

  Such a class would be trained and sampled from its embedding alone, without
  a word; for an image folder the message names the sub-directories without a
  readable image (empty, or whose files could not be decoded).
  """
  present = set(np.unique(split.labels).tolist())
  missing = [c for c in range(num_classes) if c not in present]
  if not missing:
    return
  names = split.class_names or ()
  described = ", ".join(f"{c} ({names[c]!r})" if c < len(names) else str(c) for c in missing)
  which = f"class {described} has" if len(missing) == 1 else f"classes {described} have"
  known = [f"its classes: {list(names)}"] if names else []
  if data_config.dataset == "folder":
    folder = sources.folder_for_split(data_config.folder, data_config.train_split)
    with_images = {names[c] for c in present if c < len(names)}
    without = sorted(
        d
        for d in os.listdir(folder)
        if os.path.isdir(os.path.join(folder, d)) and d not in with_images
    )
    known.append(f"sub-directories without a readable image: {without}")
  raise errors.DataError(
      f"model.num_classes={num_classes}, but {which} no readable training image in "
      f"data.dataset={data_config.dataset!r}"
      + (f" ({'; '.join(known)})" if known else "")
      + "; give every class images, or train on fewer classes (model.num_classes)"
  )


def _tfds_builder(data_config, with_labels: bool):
  """The TFDS builder of ``data_config``; a conditional model on unlabelled data is a DataError."""
  builder = sources.get_tfds_builder(data_config)
  if with_labels and not sources.tfds_has_labels(builder):
    raise errors.DataError(
        f"model.num_classes > 0 needs class labels, but data.dataset="
        f"{data_config.dataset!r} has none"
    )
  return builder


def _tfds_train_iterator(
    data_config,
    global_batch_size,
    start_step,
    process_index,
    process_count,
    local_device_count,
    with_labels,
):
  tf = sources.import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _tfds_builder(data_config, with_labels)
  image_size = int(data_config.image_size)
  seed = int(data_config.shuffle_seed)
  random_flip = bool(data_config.random_flip)
  per_process = global_batch_size // process_count
  per_device = per_process // local_device_count
  split = tfds.split_for_jax_process(
      data_config.train_split, process_index=process_index, process_count=process_count
  )
  ds = builder.as_dataset(
      split=split,
      shuffle_files=True,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False, add_tfds_id=False),
  )
  ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32) if with_labels else 0))
  ds = ds.shuffle(int(data_config.shuffle_buffer_size), seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  ds = ds.enumerate()  # per-process example counter -> flip seed
  ds = ds.skip(start_step * per_process)  # resume before decoding
  flip_seed = seed * 1_000_003 + process_index

  def preprocess(counter, example):
    encoded, label = example
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = sources.tf_center_crop_resize(tf, image, image_size)
    if random_flip:
      u = tf.random.stateless_uniform(
          [], seed=tf.stack([tf.constant(flip_seed, tf.int64), counter])
      )
      image = tf.cond(u < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return image, label

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_process, drop_remainder=True)
  ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 127.5 - 1.0, y))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)

  def batches():
    for x, y in tfds.as_numpy(ds):
      out = {"image": x.reshape((local_device_count, per_device) + x.shape[1:])}
      if with_labels:
        out["label"] = y.reshape(local_device_count, per_device)
      yield out

  return batches()  # the data set is built (and checked) before iterating


def load_train_data(data_config: Any, num_classes: int = 0) -> Optional[sources.Split]:
  """The training split of an in-memory source (checked labels included), or None when streaming.

  For a streaming TFDS source only checks that the data set is prepared and,
  with ``num_classes`` > 0, labelled. Called before the model is built, so a
  data problem stops a run at once.
  """
  if not data_config.in_memory:
    _tfds_builder(data_config, with_labels=num_classes > 0)
    return None
  split = sources.load_split(data_config, data_config.train_split)
  if num_classes:
    require_labels(data_config, split, num_classes)
    require_every_class(data_config, split, num_classes)
  return split


def create_train_iterator(
    data_config: Any,
    global_batch_size: int,
    start_step: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    local_device_count: Optional[int] = None,
    num_classes: int = 0,
    data: Optional[sources.Split] = None,
) -> Iterator[dict]:
  """Infinite iterator over this process's training batches from ``start_step``.

  Yields {'image': float32 [D, B / (P * D), H, W, C] in [-1, 1]} (D local
  devices, P processes, H = W = data.image_size, C = data.channels), plus
  'label' int32 [D, B / (P * D)] when ``num_classes`` > 0; the k-th item belongs
  to step start_step + k. Topology arguments left None come from jax. The
  config is assumed valid (``config_validation.validate``); ``data`` may be the
  split ``load_train_data`` already loaded.

  Raises:
    ValueError: global_batch_size is not a multiple of P * D.
    DataNotPreparedError: a TFDS data set is not on disk.
    DataError: labels are needed but the data has none, or one is >= num_classes.
  """
  process_index, process_count, local_device_count = _resolve_topology(
      process_index, process_count, local_device_count
  )
  order.check_divisible(global_batch_size, process_count, local_device_count, "training.batch_size")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  if not data_config.in_memory:
    return _tfds_train_iterator(
        data_config,
        global_batch_size,
        int(start_step),
        process_index,
        process_count,
        local_device_count,
        num_classes > 0,
    )
  split = data if data is not None else load_train_data(data_config, num_classes)
  labels = split.labels if num_classes else None

  def batches():
    for step in itertools.count(int(start_step)):
      yield order.local_batch(
          split.images,
          labels,
          step,
          global_batch_size,
          int(data_config.shuffle_seed),
          bool(data_config.random_flip),
          process_index,
          process_count,
          local_device_count,
      )

  return batches()


def _pad_and_shard(
    images: np.ndarray, labels: Optional[np.ndarray], rows: int, local_device_count: int
) -> dict:
  """uint8 [r, H, W, C] (+ labels [r]) padded to ``rows`` and split per device, with the mask."""
  r = images.shape[0]
  mask = np.arange(rows) < r
  if r < rows:
    images = np.concatenate([images, np.zeros((rows - r,) + images.shape[1:], images.dtype)])
    if labels is not None:
      labels = np.concatenate([labels, np.zeros((rows - r,), labels.dtype)])
  per_device = rows // local_device_count
  out = {
      "image": image_lib.scale_images(images).reshape(
          (local_device_count, per_device) + images.shape[1:]
      ),
      "mask": mask.reshape(local_device_count, per_device),
  }
  if labels is not None:
    out["label"] = labels.astype(np.int32).reshape(local_device_count, per_device)
  return out


def _in_memory_eval_iterator(
    split: sources.Split, batch_size, process_index, process_count, local_device_count, with_labels
):
  n = split.images.shape[0]
  per_process = batch_size // process_count
  for start in range(0, n, batch_size):
    lo = min(start + process_index * per_process, n)
    hi = min(start + (process_index + 1) * per_process, n)
    labels = split.labels[lo:hi] if with_labels else None
    yield _pad_and_shard(split.images[lo:hi], labels, per_process, local_device_count)


def _tfds_eval_iterator(
    data_config,
    split_name,
    batch_size,
    process_index,
    process_count,
    local_device_count,
    with_labels,
):
  tf = sources.import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _tfds_builder(data_config, with_labels)
  image_size = int(data_config.image_size)
  n = sources.tfds_num_examples(builder, split_name)
  per_process = batch_size // process_count
  # Every process yields the same number of batches (pmap needs lock-step).
  num_batches = math.ceil(math.ceil(n / process_count) / per_process)
  split = tfds.split_for_jax_process(
      split_name, process_index=process_index, process_count=process_count
  )
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(
      lambda ex: (
          sources.tf_center_crop_resize(tf, ex["image"], image_size),
          tf.cast(ex["label"], tf.int32) if with_labels else tf.constant(0),
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )
  # even_splits gives the first n % P processes one extra example.
  n_local = n // process_count + int(process_index < n % process_count)
  ds = ds.take(n_local).batch(per_process).prefetch(tf.data.AUTOTUNE)

  def batches():
    count = 0
    for images, labels in tfds.as_numpy(ds):
      count += 1
      yield _pad_and_shard(images, labels if with_labels else None, per_process, local_device_count)
    empty = np.zeros((0, image_size, image_size, 3), np.uint8)
    for _ in range(count, num_batches):  # processes with fewer examples pad to lock-step
      yield _pad_and_shard(
          empty, np.zeros((0,), np.int32) if with_labels else None, per_process, local_device_count
      )

  return batches()


def create_eval_iterator(
    data_config: Any,
    batch_size: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    local_device_count: Optional[int] = None,
    split: Optional[str] = None,
    data: Optional[sources.Split] = None,
    with_labels: bool = False,
) -> Iterator[dict]:
  """One ordered pass over a split (default data.eval_split).

  Yields {'image': float32 [D, b, H, W, C] in [-1, 1], 'mask': bool [D, b]}
  (+ 'label' int32 [D, b] with ``with_labels``), b = batch_size / (P * D); the
  mask is False for the zero padding of the last batch(es). Summed over all
  processes the mask counts each example of the split exactly once; every
  process yields the same number of batches. ``data`` may be given to reuse an
  already loaded in-memory split.
  """
  process_index, process_count, local_device_count = _resolve_topology(
      process_index, process_count, local_device_count
  )
  order.check_divisible(batch_size, process_count, local_device_count, "eval batch_size")
  split = split or data_config.eval_split
  if data is None:
    if data_config.dataset in sources.TFDS_DATASETS and not data_config.in_memory:
      return _tfds_eval_iterator(
          data_config,
          split,
          batch_size,
          process_index,
          process_count,
          local_device_count,
          with_labels,
      )
    data = sources.load_split(data_config, split)
  if with_labels and data.labels is None:
    raise errors.DataError(f"data.dataset={data_config.dataset!r} has no class labels")
  return _in_memory_eval_iterator(
      data, batch_size, process_index, process_count, local_device_count, with_labels
  )
