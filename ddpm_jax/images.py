"""Pixels: uint8 <-> [-1, 1] scaling, image grids and PNG files.

Every image the model sees is float32 in [-1, 1], NHWC, obtained from uint8
pixels in [0, 255] via ``x / 127.5 - 1`` (0 -> -1.0 and 255 -> +1.0 exactly).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ddpm_jax import files

# Grids show every image at least this many pixels high: smaller ones are enlarged
# by pixel repetition (an 8x8 digit becomes 32x32).
MIN_DISPLAY_SIZE = 32


def scale_images(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] in [0, 255] -> float32, same shape, in [-1, 1]."""
  return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [..., H, W, C] in [-1, 1] -> uint8 in [0, 255] (clip and round); inverts ``scale_images``."""
  x = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles images uint8 [N, H, W, C] into one [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] image."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top : top + h, left : left + w] = images[i]
  return grid


def upscale_factor(height: int) -> int:
  """Pixel repetition that makes an image ``height`` pixels high at least ``MIN_DISPLAY_SIZE``."""
  return max(1, -(-MIN_DISPLAY_SIZE // height))


def display_grid(images_uint8: np.ndarray, ncol: int | None = None) -> np.ndarray:
  """The grid of [N, H, W, C] uint8 images as shown and saved: tiles enlarged to >= 32 px."""
  u = upscale_factor(images_uint8.shape[1])
  big = np.asarray(images_uint8).repeat(u, axis=1).repeat(u, axis=2)
  return make_grid(big, ncol)


def png_bytes(image: np.ndarray) -> bytes:
  """[H, W, C] uint8 (C = 1 or 3) encoded as PNG."""
  image = np.asarray(image)
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


def save_grid(path: str, images_uint8: np.ndarray, ncol: int | None = None) -> None:
  """Writes the ``display_grid`` of [N, H, W, C] uint8 images as a PNG (atomically)."""
  files.write_bytes(path, png_bytes(display_grid(images_uint8, ncol)))
