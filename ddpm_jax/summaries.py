"""TensorBoard event files written without TensorFlow: scalars and images in the workdir.

TensorBoard reads ``events.out.tfevents.*`` files: ``Event`` protocol buffers
(``tensorboard.compat.proto``, shipped with the tensorboard package), each
framed as a TFRecord (length, checksums, payload). Writing them through
``tf.summary`` (what ``flax.metrics.tensorboard`` does) imports TensorFlow,
which costs a training process seconds of start-up even when its data never
touches TensorFlow (the embedded digits, image folders); this writer needs only
the protocol buffers and PIL.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2

from ddpm_jax import images


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, bit-reversed
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, the checksum TFRecord files use."""
  crc = 0xFFFFFFFF
  table = _TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of it, the payload, masked CRC of the payload."""
  header = struct.pack("<Q", len(payload))
  return (
      header
      + struct.pack("<I", _masked_crc(header))
      + payload
      + struct.pack("<I", _masked_crc(payload))
  )


class SummaryWriter:
  """Appends scalar and image summaries to a new event file in ``logdir``.

  Records are buffered by the file object; ``flush`` makes them visible to
  TensorBoard.
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    self._file.write(tfrecord(event.SerializeToString()))

  def _summary(self, step: int, value: summary_pb2.Summary.Value) -> None:
    self._write(
        event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value])
        )
    )

  def scalar(self, tag: str, value: float, step: int) -> None:
    """One point of the time series ``tag``."""
    self._summary(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """image: [H, W, C] uint8, C = 1 or 3, stored as PNG."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise ValueError(f"image must be [H, W, 1 or 3] uint8, got {image.dtype} {image.shape}")
    h, w, c = image.shape
    encoded = summary_pb2.Summary.Image(
        height=h, width=w, colorspace=c, encoded_image_string=images.png_bytes(image)
    )
    self._summary(step, summary_pb2.Summary.Value(tag=tag, image=encoded))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
