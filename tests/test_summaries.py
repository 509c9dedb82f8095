"""The TensorFlow-free event writer, read back by TensorFlow's own reader."""

import glob
import io
import os

import numpy as np
from PIL import Image

from ddpm_jax import summaries


def test_crc32c_matches_the_published_check_values():
  # RFC 3720, B.4 (iSCSI), and the CRC catalogue's check value of "123456789".
  assert summaries.crc32c(b"123456789") == 0xE3069283
  assert summaries.crc32c(bytes(32)) == 0x8A9136AA
  assert summaries.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
  assert summaries.crc32c(bytes(range(32))) == 0x46DD794E


def test_tensorflow_reads_the_scalars_and_images_with_valid_checksums(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  grid = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, size=(8, 8, 1), dtype=np.uint8)
  writer = summaries.SummaryWriter(str(tmp_path))
  writer.scalar("train/loss", 0.25, 1)
  writer.scalar("train/loss", 0.125, 2)
  writer.image("samples/ema", grid, 2)
  writer.image("samples/gray", gray, 3)
  writer.close()

  (path,) = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
  events = list(tf.compat.v1.train.summary_iterator(path))  # checks every record's CRCs
  assert events[0].file_version == "brain.Event:2"
  values = [(e.step, v) for e in events[1:] for v in e.summary.value]
  assert [(s, v.tag, v.simple_value) for s, v in values[:2]] == [
      (1, "train/loss", 0.25),
      (2, "train/loss", 0.125),
  ]
  for (step, v), want, tag in zip(values[2:], (grid, gray), ("samples/ema", "samples/gray")):
    assert v.tag == tag and (v.image.height, v.image.width) == want.shape[:2]
    assert v.image.colorspace == want.shape[-1]
    decoded = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
    np.testing.assert_array_equal(decoded.reshape(want.shape), want)
    assert step in (2, 3)
