"""Image grids and PNG files."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles images [N, H, W, C] uint8 into one [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] image."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
  """Writes [H, W, C] uint8 (C = 1 or 3) as PNG, optionally enlarged by pixel replication."""
  image = np.asarray(image)
  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def save_grid(path: str, images_uint8: np.ndarray, ncol: int | None = None) -> None:
  """A PNG grid of [N, H, W, C] uint8 images; small images are enlarged to >= 32 px."""
  h = images_uint8.shape[1]
  save_png(path, make_grid(images_uint8, ncol), upscale=max(1, 32 // h))
