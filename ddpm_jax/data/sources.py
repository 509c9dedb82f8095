"""Data sources: whole splits of the digits, an image folder or a TFDS data set, as uint8 arrays.

Every source gives images uint8 ``[N, S, S, C]`` in [0, 255] (S = ``data.image_size``,
C = ``data.channels``) and, where the data has them, class labels int32 ``[N]``:

'digits': scikit-learn's bundled ``load_digits`` (1797 images, 8x8, values 0..16,
  labels 0..9), scaled to uint8 with ``round(v * 255 / 16)`` (numpy's
  round-half-to-even; only v = 8 is a tie and gives 128). Split by position:
  'train' = the first ``DIGITS_NUM_TRAIN`` = 1500 images, 'test' = the other
  297, 'all' = all. For image_size a multiple of 8 the images are enlarged by
  pixel replication, else by PIL bilinear.
'folder': every decodable .png/.jpg/.jpeg/.webp/.bmp file under ``data.folder``
  (recursively, sorted by relative path). If ``folder/<split>`` is a directory
  it alone serves that split; otherwise the whole folder serves every split.
  Images are converted to RGB (or 'L'), center-cropped to the largest centred
  square and resized with PIL bicubic. Undecodable files are skipped and
  counted. Labels: when every image lies in a sub-directory, the index of its
  first-level sub-directory in their sorted names (``class_names``).
TFDS ('cifar10', 'celeb_a_hq/256', 'lsun/*'): center-cropped and resized with
  TF ops; labels where the data set has a 'label' feature (cifar10). Never
  downloaded: an unprepared data set raises ``DataNotPreparedError`` at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import numpy as np

from ddpm_jax import errors

logger = logging.getLogger(__name__)

TFDS_DATASETS = ("cifar10", "celeb_a_hq/256", "lsun/church_outdoor", "lsun/bedroom", "lsun/cat")
DATASETS = ("digits",) + TFDS_DATASETS + ("folder",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIGITS_NUM_TRAIN = 1500


@dataclasses.dataclass(frozen=True)
class Split:
  """A whole split: images uint8 [N, S, S, C]; labels int32 [N] or None; class names or None."""

  images: np.ndarray
  labels: Optional[np.ndarray] = None
  class_names: Optional[tuple] = None


# --------------------------------------------------------------------------
# digits (scikit-learn).
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  data = sk_datasets.load_digits()
  images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = data.target.astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_digits(split: str = "train", image_size: int = 8) -> Split:
  """scikit-learn's digits: images uint8 [N, S, S, 1], labels int32 [N] in 0..9.

  split: 'train' (the first 1500, N=1500), 'test' (the other 297) or 'all' (N=1797).
  """
  images, labels = _all_digits()
  rows = {
      "train": slice(None, DIGITS_NUM_TRAIN),
      "test": slice(DIGITS_NUM_TRAIN, None),
      "all": slice(None),
  }
  if split not in rows:
    raise errors.DataError(f"digits split {split!r} unknown; use 'train', 'test' or 'all'")
  images, labels = images[rows[split]], labels[rows[split]]
  if image_size % 8 == 0:
    factor = image_size // 8
    images = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)
  else:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    images = np.stack(
        [
            np.asarray(
                Image.fromarray(im[..., 0], mode="L").resize(
                    (image_size, image_size), Image.BILINEAR
                )
            )
            for im in images
        ]
    )[..., None]
  return Split(np.ascontiguousarray(images), labels, tuple(str(d) for d in range(10)))


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


def list_image_files(folder: str) -> list[str]:
  """Files with an image extension under ``folder``, sorted by relative path."""
  files = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(files, key=lambda p: os.path.relpath(p, folder))


def _decode_file(path: str, image_size: int, channels: int) -> Optional[np.ndarray]:
  """uint8 [image_size, image_size, channels], or None if the file cannot be decoded."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as im:
      im.load()
      im = center_crop_resize(im.convert("L" if channels == 1 else "RGB"), image_size)
      arr = np.asarray(im, dtype=np.uint8)
  except Exception:  # pylint: disable=broad-except
    # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
    return None
  return arr[..., None] if channels == 1 else arr


def folder_classes(files: list[str], folder: str) -> tuple[Optional[np.ndarray], Optional[tuple]]:
  """(labels int32 [N], sorted class names) from each file's first sub-directory, or (None, None).

  None when some file lies directly in ``folder``: loose images have no class.
  """
  parts = [os.path.relpath(p, folder).split(os.sep) for p in files]
  if not parts or any(len(p) < 2 for p in parts):
    return None, None
  names = tuple(sorted({p[0] for p in parts}))
  index = {n: i for i, n in enumerate(names)}
  return np.asarray([index[p[0]] for p in parts], np.int32), names


def load_image_folder(
    folder: str, image_size: int, channels: int = 3, num_workers: int = 8
) -> tuple[Split, int]:
  """Decodes every image under ``folder`` (recursively).

  Returns:
    (split, num_skipped): ``split.images`` uint8 [N, image_size, image_size,
    channels] in the sorted order of the files' relative paths, with labels
    (``folder_classes``) of the decodable files; ``num_skipped`` files with an
    image extension could not be decoded (a warning gives the count).
  Raises:
    DataError: no decodable image.
  """
  if not os.path.isdir(folder):
    raise errors.DataError(f"data.folder={folder!r} is not a directory")
  files = list_image_files(folder)
  decode = functools.partial(_decode_file, image_size=image_size, channels=channels)
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
    decoded = list(pool.map(decode, files))
  good = [i for i, a in enumerate(decoded) if a is not None]
  num_skipped = len(decoded) - len(good)
  if num_skipped:
    logger.warning(
        "Skipped %d of %d image files under %s that could not be decoded.",
        num_skipped,
        len(files),
        folder,
    )
  if not good:
    raise errors.DataError(
        f"No decodable image ({', '.join(IMAGE_EXTENSIONS)}) under data.folder={folder!r} "
        f"({num_skipped} undecodable files)."
    )
  labels, names = folder_classes(files, folder)
  if labels is not None:
    labels = labels[good]
  return Split(np.stack([decoded[i] for i in good]), labels, names), num_skipped


def folder_for_split(folder: str, split: str) -> str:
  """``folder/split`` when it is a directory, else ``folder`` (it serves every split)."""
  sub = os.path.join(folder, split)
  return sub if split and os.path.isdir(sub) else folder


def check_eval_split(data_config: Any) -> None:
  """Refuses to evaluate an image folder on its training images under the eval split's name.

  A folder without a ``data.eval_split`` sub-directory serves that split with
  the images it trains on; evaluation then needs the explicit
  ``data.eval_split = data.train_split``. Raises DataError naming both fixes.
  """
  if data_config.dataset != "folder":
    return
  folder, split = data_config.folder, data_config.eval_split
  if split == data_config.train_split or os.path.isdir(os.path.join(folder, split)):
    return
  raise errors.DataError(
      f"data.folder={folder!r} has no {split!r} sub-directory (data.eval_split), so it would "
      f"be evaluated on its training images; put held-out images in "
      f"{os.path.join(folder, split)}, or evaluate on the training images by name with "
      f"--config.data.eval_split={data_config.train_split}"
  )


# --------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------


def import_tf():
  """Imports TensorFlow with all GPUs hidden from it (returns the module)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # already initialised (by an earlier call, which hid them)
  return tf


def get_tfds_builder(data_config: Any):
  """The prepared TFDS builder of ``data.dataset``.

  Never downloads: raises ``DataNotPreparedError`` (at once) with the place the
  files must go and the command that prepares them.
  """
  import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = data_config.dataset
  data_dir = data_config.data_dir or None
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    root = str(getattr(builder, "data_dir_root", None) or data_dir or "~/tensorflow_datasets")
    msg = (
        f"TFDS data set {name!r} (version {builder.version}) is not prepared: no "
        f"dataset_info.json in {builder.data_dir}. Nothing is downloaded here. Prepare it on "
        f"a machine with network access with\n    tfds build {name} --data_dir={root}\nand "
        f"copy the folder {builder.data_dir} to this machine (or point data.data_dir to the "
        f"folder that holds {name}/)."
    )
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions:
      manual_dir = os.path.join(root, "downloads", "manual")
      msg += (
          "\nThis data set needs a manual download: place its source files in "
          f"{manual_dir} (or pass --manual_dir=DIR to tfds build), then run the command "
          f"above. TFDS instructions:\n{instructions.strip()}"
      )
    raise errors.DataNotPreparedError(msg)
  return builder


def tfds_has_labels(builder) -> bool:
  return "label" in builder.info.features


def tf_center_crop_resize(tf, image, image_size: int):
  """uint8 [h, w, 3] -> uint8 [image_size, image_size, 3] (TF ops).

  Center-crops to the largest centred square; resizes (bicubic, antialiased,
  rounded and clipped to [0, 255]) unless the square's side is image_size.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  m = tf.minimum(h, w)
  image = tf.image.crop_to_bounding_box(image, (h - m) // 2, (w - m) // 2, m, m)

  def resize():
    x = tf.image.resize(
        tf.cast(image, tf.float32), [image_size, image_size], method="bicubic", antialias=True
    )
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

  image = tf.cond(tf.equal(m, image_size), lambda: image, resize)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def tfds_num_examples(builder, split: str) -> int:
  return int(builder.info.splits[split].num_examples)


def load_tfds(data_config: Any, split: str, max_examples: Optional[int] = None) -> Split:
  """A TFDS split decoded into uint8 [N, S, S, 3] (file order), with its labels if any."""
  tf = import_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = get_tfds_builder(data_config)
  size = int(data_config.image_size)
  labelled = tfds_has_labels(builder)
  if max_examples is not None:
    split = f"{split}[:{int(max_examples)}]"
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(
      lambda ex: (
          tf_center_crop_resize(tf, ex["image"], size),
          tf.cast(ex["label"], tf.int32) if labelled else tf.constant(0),
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )
  chunks = [(np.asarray(x), np.asarray(y)) for x, y in tfds.as_numpy(ds.batch(1024))]
  if not chunks:
    raise errors.DataError(f"TFDS split {split!r} of {data_config.dataset!r} is empty")
  images = np.concatenate([x for x, _ in chunks])
  if not labelled:
    return Split(images)
  names = builder.info.features["label"].names
  return Split(images, np.concatenate([y for _, y in chunks]), tuple(names))


# --------------------------------------------------------------------------
# Any source.
# --------------------------------------------------------------------------


def load_split(data_config: Any, split: str, max_examples: Optional[int] = None) -> Split:
  """A whole split of ``data.dataset`` (its first ``max_examples`` when given).

  Works for every source (for large TFDS sets cap it with max_examples). The
  config is assumed valid (``config_validation.validate``).
  """
  dataset = data_config.dataset
  if dataset == "digits":
    data = load_digits(split, int(data_config.image_size))
  elif dataset == "folder":
    folder = folder_for_split(data_config.folder, split)
    data, _ = load_image_folder(folder, int(data_config.image_size), int(data_config.channels))
  else:
    return load_tfds(data_config, split, max_examples)
  if max_examples is None:
    return data
  labels = None if data.labels is None else data.labels[:max_examples]
  return Split(data.images[:max_examples], labels, data.class_names)


def load_split_array(
    data_config: Any, split: str, max_examples: Optional[int] = None
) -> np.ndarray:
  """The images alone of ``load_split``: uint8 [N, S, S, C] in [0, 255]."""
  return load_split(data_config, split, max_examples).images


def num_examples(data_config: Any, split: str) -> int:
  """Number of examples N of a split (loads the split for non-TFDS sources)."""
  if data_config.dataset in TFDS_DATASETS:
    return tfds_num_examples(get_tfds_builder(data_config), split)
  return int(load_split_array(data_config, split).shape[0])
