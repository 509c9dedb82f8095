"""Input pipeline: image data sets for DDPM training and evaluation.

Every image leaves this module as float32 in [-1, 1], laid out NHWC, obtained
from uint8 pixels in [0, 255] via ``x / 127.5 - 1`` (so 0 -> -1.0 and
255 -> +1.0 exactly).

Config fields (``config.data``, an ``ml_collections.ConfigDict``)
-----------------------------------------------------------------
Required:
  dataset (str):      'digits' | 'cifar10' | 'celeb_a_hq/256' |
                      'lsun/church_outdoor' | 'lsun/bedroom' | 'lsun/cat' |
                      'folder'.  The TFDS ones are TFDS builder names.
  image_size (int):   output height = width in pixels (e.g. 8 for digits,
                      32 for cifar10, 256 for CelebA-HQ / LSUN).
  channels (int):     1 for 'digits'; 3 for the TFDS data sets; 1 or 3
                      (grayscale or RGB) for 'folder'.
  random_flip (bool): random horizontal (width-axis) flips of training
                      examples, each with probability 1/2.
  data_dir (str|None): TFDS data_dir (None: TFDS's default,
                      $TFDS_DATA_DIR or ~/tensorflow_datasets).  Unused by
                      'digits' and 'folder'.
  folder (str):       image directory for dataset='folder' (else unused).
  train_split (str):  split for training, e.g. 'train'.
  eval_split (str):   split for evaluation, e.g. 'test' (cifar10, digits),
                      'validation' (LSUN has only 'train'/'validation'),
                      'train' (celeb_a_hq has only 'train').
  in_memory (bool):   True: decode the whole split once into a uint8 numpy
                      array and draw batches in a step-derived order (exact
                      resume, device-count independent); use for digits,
                      cifar10, folder.  False: stream with tf.data (TFDS
                      sources only; for LSUN / CelebA-HQ).
  shuffle_seed (int): seed (>= 0) of the data order and of the flips.
Optional (read with ``.get``; defaults in brackets):
  shuffle_buffer_size (int) [10_000]: tf.data shuffle buffer for streaming.

Splits of the non-TFDS sources
------------------------------
'digits': scikit-learn's bundled ``load_digits`` (1797 images, 8x8, values
  0..16), scaled to uint8 with ``round(v * 255 / 16)`` (numpy's
  round-half-to-even; only v = 8 is a tie and gives 128).  Split by position:
  'train' = the first 1500 images, 'test' = the remaining 297, 'all' = all.
  For image_size an integer multiple of 8 the images are enlarged by exact
  pixel replication (nearest neighbour); for any other size by PIL bilinear.
'folder': every decodable .png/.jpg/.jpeg/.webp/.bmp file under ``folder``
  (recursively, sorted by relative path).  If ``folder/<split>`` is a
  directory it alone serves that split; otherwise the whole folder serves
  every split.  Each image is converted to RGB (or 'L' for channels=1),
  center-cropped to the largest centred square and, if its side differs from
  image_size, resized with PIL bicubic.  Files that cannot be decoded are
  skipped, counted and reported in a warning.

Training order of in-memory sources
-----------------------------------
The global batch at step s is a pure function of (shuffle_seed, s, B, N):
its row j holds global example counter g = s * B + j, which is example
``perm_e[g % N]`` of the array, where e = g // N is the epoch and ``perm_e`` a
permutation of range(N) drawn from ``Philox(key=[shuffle_seed, e])``.  Every
epoch thus visits each example exactly once (batches may straddle an epoch
boundary).  Whether example g is flipped is a hash of (shuffle_seed, g).
Process p of P takes rows [p*B/P, (p+1)*B/P) of the global batch and
reshapes them to [local_device_count, B/(P*D), H, W, C].  Hence a run
resumed at step s sees bitwise the same data as an uninterrupted run, for any
number of processes and devices.

Streaming sources (tf.data)
---------------------------
Process p reads ``tfds.split_for_jax_process(train_split, p, P)``, shuffled
with fixed seeds (file order and a ``shuffle_buffer_size`` buffer), repeated,
flipped with stateless per-example seeds and batched by B/P.  Resuming at
step s skips s * B/P records before decoding: this is the data position as
far as TFDS allows (deterministic given the same TFDS/TF versions, files and
process count).  TF is kept off all GPUs.

TFDS data sets are never downloaded here: an unprepared data set raises
``DatasetNotPreparedError`` at once, saying where the files must go.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import math
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

TFDS_DATASETS = (
    'cifar10',
    'celeb_a_hq/256',
    'lsun/church_outdoor',
    'lsun/bedroom',
    'lsun/cat',
)
DATASETS = ('digits',) + TFDS_DATASETS + ('folder',)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
DIGITS_NUM_TRAIN = 1500
DEFAULT_SHUFFLE_BUFFER_SIZE = 10_000

_REQUIRED = object()


class DatasetNotPreparedError(RuntimeError):
  """A TFDS data set is not prepared on disk (and will not be downloaded)."""


# --------------------------------------------------------------------------
# Config access and scaling.
# --------------------------------------------------------------------------


def _field(data_config: Any, name: str, default: Any = _REQUIRED) -> Any:
  """Returns ``data_config.<name>``; raises a clear error if it is missing."""
  try:
    value = data_config.get(name, _REQUIRED)
  except AttributeError:
    value = getattr(data_config, name, _REQUIRED)
  if value is _REQUIRED:
    if default is _REQUIRED:
      raise ValueError(f'Config field data.{name} is required but missing.')
    return default
  return value


def _check_dataset_name(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(
        f'Unknown data.dataset={dataset!r}; expected one of {DATASETS}.')


def _check_channels(data_config: Any) -> int:
  dataset = _field(data_config, 'dataset')
  channels = int(_field(data_config, 'channels'))
  allowed = {'digits': (1,), 'folder': (1, 3)}.get(dataset, (3,))
  if channels not in allowed:
    raise ValueError(
        f'data.channels={channels} does not fit data.dataset={dataset!r} '
        f'(allowed: {allowed}).')
  return channels


def scale_images(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] in [0, 255] -> float32, same shape, in [-1, 1]."""
  return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(
      1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [..., H, W, C] in [-1, 1] -> uint8 in [0, 255] (clip and round).

  Inverse of ``scale_images`` on its image.
  """
  x = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# digits (scikit-learn).
# --------------------------------------------------------------------------


def load_digits_array(split: str = 'train', image_size: int = 8) -> np.ndarray:
  """scikit-learn digits as uint8 [N, image_size, image_size, 1] in [0, 255].

  split: 'train' (first 1500 images, N=1500), 'test' (the other 297) or
  'all' (N=1797).
  """
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  raw = sk_datasets.load_digits().images  # float64 [1797, 8, 8], 0..16
  if split == 'train':
    raw = raw[:DIGITS_NUM_TRAIN]
  elif split == 'test':
    raw = raw[DIGITS_NUM_TRAIN:]
  elif split != 'all':
    raise ValueError(
        f"digits split {split!r} unknown; use 'train', 'test' or 'all'.")
  images = np.round(raw * (255.0 / 16.0)).astype(np.uint8)
  if image_size != 8:
    if image_size <= 0:
      raise ValueError(f'data.image_size={image_size} must be positive.')
    if image_size % 8 == 0:
      factor = image_size // 8
      images = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)
    else:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      images = np.stack([
          np.asarray(
              Image.fromarray(im, mode='L').resize(
                  (image_size, image_size), Image.BILINEAR))
          for im in images
      ])
  return np.ascontiguousarray(images[..., None])


# --------------------------------------------------------------------------
# Image folder (PIL).
# --------------------------------------------------------------------------


def center_crop_resize(image: Any, image_size: int) -> Any:
  """Center-crops a PIL image to its largest centred square, then resizes it.

  The crop box is [left, top) = ((w - m) // 2, (h - m) // 2) with side
  m = min(w, h); resizing to image_size x image_size uses PIL bicubic and is
  skipped when m == image_size.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = image.size
  m = min(w, h)
  left, top = (w - m) // 2, (h - m) // 2
  if (w, h) != (m, m):
    image = image.crop((left, top, left + m, top + m))
  if m != image_size:
    image = image.resize((image_size, image_size), Image.BICUBIC)
  return image


def _list_image_files(folder: str) -> list[str]:
  files = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in names:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(root, name))
  return sorted(files, key=lambda p: os.path.relpath(p, folder))


def _decode_file(path: str, image_size: int, channels: int):
  """Returns uint8 [image_size, image_size, channels] or None if undecodable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.load()
      im = im.convert('L' if channels == 1 else 'RGB')
      im = center_crop_resize(im, image_size)
      arr = np.asarray(im, dtype=np.uint8)
  except Exception:  # pylint: disable=broad-except
    # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError,...
    return None
  if channels == 1:
    arr = arr[..., None]
  return arr


def load_image_folder(folder: str,
                      image_size: int,
                      channels: int = 3,
                      num_workers: int = 8) -> tuple[np.ndarray, int]:
  """Decodes every image under ``folder`` (recursively).

  Returns:
    images: uint8 [N, image_size, image_size, channels] in [0, 255], in the
      sorted order of the files' relative paths.
    num_skipped: number of files with an image extension that could not be
      decoded (they are left out of ``images``; a warning gives the count).
  """
  if not os.path.isdir(folder):
    raise ValueError(f'data.folder={folder!r} is not a directory.')
  files = _list_image_files(folder)
  decode = functools.partial(
      _decode_file, image_size=image_size, channels=channels)
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
    decoded = list(pool.map(decode, files))
  images = [a for a in decoded if a is not None]
  num_skipped = len(decoded) - len(images)
  if num_skipped:
    logger.warning('Skipped %d of %d image files under %s that could not be '
                   'decoded.', num_skipped, len(files), folder)
  if not images:
    raise ValueError(
        f'No decodable image ({", ".join(IMAGE_EXTENSIONS)}) under '
        f'data.folder={folder!r} ({num_skipped} undecodable files).')
  return np.stack(images), num_skipped


def _folder_for_split(folder: str, split: str) -> str:
  sub = os.path.join(folder, split)
  return sub if split and os.path.isdir(sub) else folder


# --------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------


def _import_tf():
  """Imports TensorFlow with all GPUs hidden from it (returns the module)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # Already initialized: devices can no longer be changed. It was hidden by
    # the first call if that came from here.
    pass
  return tf


def get_tfds_builder(data_config: Any):
  """Returns the prepared TFDS builder of ``data.dataset``.

  Never downloads: raises ``DatasetNotPreparedError`` (at once) with the
  place the files must go and the command that prepares them.
  """
  _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = _field(data_config, 'dataset')
  data_dir = _field(data_config, 'data_dir', None) or None
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    root = str(getattr(builder, 'data_dir_root', None) or data_dir or
               '~/tensorflow_datasets')
    msg = (
        f'TFDS data set {name!r} (version {builder.version}) is not prepared: '
        f'no dataset_info.json in {builder.data_dir}. Nothing is downloaded '
        f'here. Prepare it on a machine with network access with\n'
        f'    tfds build {name} --data_dir={root}\n'
        f'and copy the folder {builder.data_dir} to this machine (or point '
        f'data.data_dir to the folder that holds {name}/).')
    instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
    if instructions:
      manual_dir = os.path.join(root, 'downloads', 'manual')
      msg += (
          f'\nThis data set needs a manual download: place its source files '
          f'in {manual_dir} (or pass --manual_dir=DIR to tfds build), then run '
          f'the command above. TFDS instructions:\n{instructions.strip()}')
    raise DatasetNotPreparedError(msg)
  return builder


def _tf_center_crop_resize(tf, image, image_size: int):
  """uint8 [h, w, 3] -> uint8 [image_size, image_size, 3] (TF ops).

  Center-crops to the largest centred square; resizes (bicubic, antialiased,
  rounded and clipped to [0, 255]) unless the square's side is image_size.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  m = tf.minimum(h, w)
  image = tf.image.crop_to_bounding_box(image, (h - m) // 2, (w - m) // 2, m,
                                        m)

  def resize():
    x = tf.image.resize(
        tf.cast(image, tf.float32), [image_size, image_size],
        method='bicubic',
        antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

  image = tf.cond(tf.equal(m, image_size), lambda: image, resize)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def _tfds_num_examples(builder, split: str) -> int:
  return int(builder.info.splits[split].num_examples)


def load_tfds_array(data_config: Any,
                    split: str,
                    max_examples: Optional[int] = None) -> np.ndarray:
  """Decodes a TFDS split into uint8 [N, S, S, 3] in [0, 255] (file order)."""
  tf = _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = get_tfds_builder(data_config)
  image_size = int(_field(data_config, 'image_size'))
  if max_examples is not None:
    split = f'{split}[:{int(max_examples)}]'
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(
      lambda ex: _tf_center_crop_resize(tf, ex['image'], image_size),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)
  chunks = [np.asarray(b) for b in tfds.as_numpy(ds.batch(1024))]
  if not chunks:
    raise ValueError(f'TFDS split {split!r} of '
                     f'{_field(data_config, "dataset")!r} is empty.')
  return np.concatenate(chunks)


# --------------------------------------------------------------------------
# Whole splits as arrays.
# --------------------------------------------------------------------------


def load_split_array(data_config: Any,
                     split: str,
                     max_examples: Optional[int] = None) -> np.ndarray:
  """Loads a whole split as uint8 [N, H, W, C] in [0, 255], H = W = image_size.

  Works for every source (for large TFDS sets cap it with max_examples, which
  keeps the first examples). Evaluation uses it for FID reference statistics.
  """
  dataset = _field(data_config, 'dataset')
  _check_dataset_name(dataset)
  channels = _check_channels(data_config)
  image_size = int(_field(data_config, 'image_size'))
  if dataset == 'digits':
    images = load_digits_array(split, image_size)
  elif dataset == 'folder':
    folder = _folder_for_split(_field(data_config, 'folder'), split)
    images, _ = load_image_folder(folder, image_size, channels)
  else:
    return load_tfds_array(data_config, split, max_examples)
  if max_examples is not None:
    images = images[:max_examples]
  return images


def num_examples(data_config: Any, split: str) -> int:
  """Number of examples N of a split (loads the split for non-TFDS sources)."""
  dataset = _field(data_config, 'dataset')
  if dataset in TFDS_DATASETS:
    return _tfds_num_examples(get_tfds_builder(data_config), split)
  return int(load_split_array(data_config, split).shape[0])


# --------------------------------------------------------------------------
# Step-derived order for in-memory sources.
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """Permutation int64 [n] of range(n) for an epoch; pure in (seed, epoch)."""
  if seed < 0 or epoch < 0:
    raise ValueError(f'seed={seed} and epoch={epoch} must be >= 0.')
  key = np.array([seed, epoch], dtype=np.uint64)
  perm = np.random.Generator(np.random.Philox(key=key)).permutation(n)
  perm = perm.astype(np.int64)
  perm.setflags(write=False)
  return perm


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
  with np.errstate(over='ignore'):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def flip_mask(seed: int, example_counters: np.ndarray) -> np.ndarray:
  """bool [...]: whether global example counter g is flipped (p = 1/2).

  A pure function of (seed, g); the counter g = step * B + row.
  """
  g = np.asarray(example_counters, dtype=np.uint64)
  key = _splitmix64(np.full(g.shape, seed, dtype=np.uint64))
  return (_splitmix64(key ^ g) >> np.uint64(63)).astype(bool)


def batch_example_indices(seed: int,
                          step: int,
                          batch_size: int,
                          n: int,
                          rows: Optional[slice] = None
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Which examples make up the global batch at ``step``.

  Args:
    seed: shuffle seed (>= 0).
    step: training step (>= 0).
    batch_size: global batch size B.
    n: number of examples N in the array.
    rows: optional slice of the batch rows to compute (default all B).

  Returns:
    indices: int64 [R] in [0, N), row j -> array index perm_e[g % N] with
      g = step * B + j and e = g // N.
    counters: int64 [R], the global example counters g.
  """
  if step < 0:
    raise ValueError(f'step={step} must be >= 0.')
  start, stop, _ = (rows or slice(None)).indices(batch_size)
  counters = step * batch_size + np.arange(start, stop, dtype=np.int64)
  epochs = counters // n
  positions = counters % n
  indices = np.empty_like(counters)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    indices[sel] = epoch_permutation(seed, int(epoch), n)[positions[sel]]
  return indices, counters


def get_batch_uint8(images: np.ndarray,
                    step: int,
                    batch_size: int,
                    seed: int,
                    random_flip: bool,
                    rows: Optional[slice] = None) -> np.ndarray:
  """Global batch (or its ``rows``) at ``step``: uint8 [R, H, W, C] in [0,255].

  ``images`` is uint8 [N, H, W, C]; flipped rows are reversed along W.
  """
  indices, counters = batch_example_indices(seed, step, batch_size,
                                            images.shape[0], rows)
  batch = images[indices]
  if random_flip:
    flips = flip_mask(seed, counters)
    batch[flips] = batch[flips][:, :, ::-1, :]
  return batch


def get_batch(images: np.ndarray, step: int, batch_size: int, seed: int,
              random_flip: bool) -> np.ndarray:
  """Global batch at ``step``: float32 [B, H, W, C] in [-1, 1].

  A pure function of (images, seed, step, batch_size, random_flip).
  """
  return scale_images(
      get_batch_uint8(images, step, batch_size, seed, random_flip))


def _check_divisible(batch_size: int, process_count: int,
                     local_device_count: int, field: str) -> int:
  """Returns the per-device batch size or raises ValueError naming ``field``."""
  parts = process_count * local_device_count
  if batch_size <= 0 or batch_size % parts:
    raise ValueError(
        f'{field}={batch_size} must be a positive multiple of process_count * '
        f'local_device_count = {process_count} * {local_device_count} = '
        f'{parts}.')
  return batch_size // parts


def get_local_batch(images: np.ndarray, step: int, global_batch_size: int,
                    seed: int, random_flip: bool, process_index: int,
                    process_count: int, local_device_count: int) -> np.ndarray:
  """This process's part of the global batch at ``step``, per device.

  Returns float32 [local_device_count, B / (P * D), H, W, C] in [-1, 1]:
  rows [p * B/P, (p+1) * B/P) of ``get_batch(...)``, split over devices in
  order.

  ``axis_name`` must be the pmap axis name of the consumer ('batch' in
  ddpm_jax.train): jax 0.10 treats a mesh with another axis name as a
  different sharding and re-lays the batch out on every call (measured: a
  2 ms step took 4 s).
  """
  per_device = _check_divisible(global_batch_size, process_count,
                                local_device_count, 'training.batch_size')
  per_process = global_batch_size // process_count
  rows = slice(process_index * per_process, (process_index + 1) * per_process)
  batch = get_batch_uint8(images, step, global_batch_size, seed, random_flip,
                          rows)
  return scale_images(
      batch.reshape((local_device_count, per_device) + batch.shape[1:]))


# --------------------------------------------------------------------------
# Train / eval iterators.
# --------------------------------------------------------------------------


def _resolve_topology(process_index, process_count, local_device_count):
  if process_index is None or process_count is None or local_device_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if local_device_count is None:
      local_device_count = jax.local_device_count()
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  return int(process_index), int(process_count), int(local_device_count)


def _in_memory_train_iterator(images, global_batch_size, start_step, seed,
                              random_flip, process_index, process_count,
                              local_device_count) -> Iterator[np.ndarray]:
  for step in itertools.count(start_step):
    yield get_local_batch(images, step, global_batch_size, seed, random_flip,
                          process_index, process_count, local_device_count)


def _tfds_train_iterator(data_config, global_batch_size, start_step,
                         process_index, process_count,
                         local_device_count) -> Iterator[np.ndarray]:
  tf = _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = get_tfds_builder(data_config)
  image_size = int(_field(data_config, 'image_size'))
  seed = int(_field(data_config, 'shuffle_seed'))
  random_flip = bool(_field(data_config, 'random_flip'))
  buffer_size = int(
      _field(data_config, 'shuffle_buffer_size', DEFAULT_SHUFFLE_BUFFER_SIZE))
  per_process = global_batch_size // process_count
  per_device = per_process // local_device_count
  split = tfds.split_for_jax_process(
      _field(data_config, 'train_split'),
      process_index=process_index,
      process_count=process_count)
  ds = builder.as_dataset(
      split=split,
      shuffle_files=True,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(
          shuffle_seed=seed, try_autocache=False, add_tfds_id=False))
  ds = ds.map(lambda ex: ex['image'])  # encoded bytes
  ds = ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  ds = ds.enumerate()  # per-process example counter -> flip seed
  ds = ds.skip(start_step * per_process)  # resume before decoding
  flip_seed = seed * 1_000_003 + process_index

  def preprocess(counter, encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = _tf_center_crop_resize(tf, image, image_size)
    if random_flip:
      u = tf.random.stateless_uniform(
          [], seed=tf.stack([tf.constant(flip_seed, tf.int64), counter]))
      image = tf.cond(u < 0.5, lambda: tf.reverse(image, axis=[1]),
                      lambda: image)
    return image

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(per_process, drop_remainder=True)
  ds = ds.map(lambda x: tf.cast(x, tf.float32) / 127.5 - 1.0)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)

  def batches():
    for batch in tfds.as_numpy(ds):
      yield batch.reshape((local_device_count, per_device) + batch.shape[1:])

  return batches()  # The data set is built (and checked) before iterating.


def create_train_iterator(data_config: Any,
                          global_batch_size: int,
                          start_step: int = 0,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          local_device_count: Optional[int] = None
                         ) -> Iterator[np.ndarray]:
  """Infinite iterator over this process's training batches from ``start_step``.

  Yields float32 [local_device_count, global_batch_size / (process_count *
  local_device_count), H, W, C] in [-1, 1], H = W = data.image_size,
  C = data.channels; the k-th item belongs to step start_step + k.
  Topology arguments left None come from jax.

  Raises:
    ValueError: global_batch_size is not a multiple of process_count *
      local_device_count (the message names training.batch_size), or a config
      value does not fit.
    DatasetNotPreparedError: a TFDS data set is not on disk.
  """
  process_index, process_count, local_device_count = _resolve_topology(
      process_index, process_count, local_device_count)
  _check_divisible(global_batch_size, process_count, local_device_count,
                   'training.batch_size')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  dataset = _field(data_config, 'dataset')
  _check_dataset_name(dataset)
  _check_channels(data_config)
  seed = int(_field(data_config, 'shuffle_seed'))
  if seed < 0:
    raise ValueError(f'data.shuffle_seed={seed} must be >= 0.')
  in_memory = bool(_field(data_config, 'in_memory'))
  if not in_memory and dataset not in TFDS_DATASETS:
    raise ValueError(f'data.in_memory=False (streaming) needs a TFDS data set, '
                     f'not data.dataset={dataset!r}.')
  if in_memory:
    images = load_split_array(data_config, _field(data_config, 'train_split'))
    return _in_memory_train_iterator(images, global_batch_size,
                                     int(start_step), seed,
                                     bool(_field(data_config, 'random_flip')),
                                     process_index, process_count,
                                     local_device_count)
  return _tfds_train_iterator(data_config, global_batch_size, int(start_step),
                              process_index, process_count, local_device_count)


def _pad_and_shard(batch: np.ndarray, mask: np.ndarray, rows: int,
                   local_device_count: int):
  """Pads uint8 [r, H, W, C] + bool [r] to ``rows`` and splits per device."""
  if batch.shape[0] < rows:
    pad = rows - batch.shape[0]
    batch = np.concatenate(
        [batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    mask = np.concatenate([mask, np.zeros((pad,), bool)])
  per_device = rows // local_device_count
  return (scale_images(batch).reshape((local_device_count, per_device) +
                                      batch.shape[1:]),
          mask.reshape(local_device_count, per_device))


def _in_memory_eval_iterator(images, batch_size, process_index, process_count,
                             local_device_count):
  n = images.shape[0]
  per_process = batch_size // process_count
  for start in range(0, n, batch_size):
    lo = min(start + process_index * per_process, n)
    hi = min(start + (process_index + 1) * per_process, n)
    yield _pad_and_shard(images[lo:hi], np.ones((hi - lo,), bool), per_process,
                         local_device_count)


def _tfds_eval_iterator(data_config, split_name, batch_size, process_index,
                        process_count, local_device_count):
  tf = _import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = get_tfds_builder(data_config)
  image_size = int(_field(data_config, 'image_size'))
  n = _tfds_num_examples(builder, split_name)
  per_process = batch_size // process_count
  # Every process yields the same number of batches (pmap needs lock-step).
  num_batches = math.ceil(math.ceil(n / process_count) / per_process)
  split = tfds.split_for_jax_process(
      split_name, process_index=process_index, process_count=process_count)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(
      lambda ex: (_tf_center_crop_resize(tf, ex['image'], image_size),
                  tf.constant(True)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = tf.data.Dataset.from_tensors(
      (tf.zeros([image_size, image_size, 3], tf.uint8),
       tf.constant(False))).repeat()
  # even_splits gives the first n % P processes one extra example.
  n_local = n // process_count + int(process_index < n % process_count)
  ds = ds.take(n_local).concatenate(pad).take(num_batches * per_process)
  ds = ds.batch(per_process).prefetch(tf.data.AUTOTUNE)

  def batches():
    for images, mask in tfds.as_numpy(ds):
      yield _pad_and_shard(images, mask, per_process, local_device_count)

  return batches()


def create_eval_iterator(data_config: Any,
                         batch_size: int,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None,
                         local_device_count: Optional[int] = None,
                         split: Optional[str] = None,
                         images: Optional[np.ndarray] = None
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One ordered pass over the eval split (default data.eval_split).

  Yields (images, mask): images float32 [local_device_count, b, H, W, C] in
  [-1, 1] with b = batch_size / (process_count * local_device_count); mask
  bool [local_device_count, b], True for real examples and False for the
  zero padding of the last batch(es).  Summed over all processes the mask
  counts each example of the split exactly once; every process yields the
  same number of batches.  ``images`` (uint8 [N, H, W, C]) may be given to
  reuse an already loaded in-memory split.
  """
  process_index, process_count, local_device_count = _resolve_topology(
      process_index, process_count, local_device_count)
  _check_divisible(batch_size, process_count, local_device_count,
                   'eval batch_size')
  split = split or _field(data_config, 'eval_split')
  if images is not None:
    return _in_memory_eval_iterator(images, batch_size, process_index,
                                    process_count, local_device_count)
  dataset = _field(data_config, 'dataset')
  _check_dataset_name(dataset)
  _check_channels(data_config)
  if dataset in TFDS_DATASETS and not bool(_field(data_config, 'in_memory')):
    return _tfds_eval_iterator(data_config, split, batch_size, process_index,
                               process_count, local_device_count)
  return _in_memory_eval_iterator(
      load_split_array(data_config, split), batch_size, process_index,
      process_count, local_device_count)


# --------------------------------------------------------------------------
# Device prefetch.
# --------------------------------------------------------------------------


def prefetch_to_device(iterator: Iterable[Any],
                       size: int = 2,
                       devices: Optional[Sequence[Any]] = None,
                       axis_name: str = 'batch') -> Iterator[Any]:
  """Moves batches onto the local devices, sharded, ``size`` in flight.

  Each item is an array or a pytree of arrays whose leading axis has length
  len(devices) (e.g. [local_devices, per_device_batch, H, W, C]); leaf x is
  placed with x[i] on devices[i] (a NamedSharding over a 1-D mesh of
  ``devices`` split along axis 0), which is the layout jax.pmap consumes
  without copying.  Transfers are asynchronous, so up to ``size`` batches are
  on their way while the caller works.  Yields the device-resident pytrees in
  order.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  devices = list(devices) if devices is not None else jax.local_devices()
  sharding = NamedSharding(Mesh(np.array(devices), (axis_name,)),
                           PartitionSpec(axis_name))

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] != len(devices):
      raise ValueError(f'Leading axis of shape {x.shape} must equal the '
                       f'number of devices {len(devices)}.')
    return jax.device_put(x, sharding)

  queue = collections.deque()
  iterator = iter(iterator)

  def enqueue(n):
    for item in itertools.islice(iterator, n):
      queue.append(jax.tree_util.tree_map(put, item))

  enqueue(max(int(size), 1))
  while queue:
    yield queue.popleft()
    enqueue(1)
