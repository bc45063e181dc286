"""Image grids for TensorBoard and PNG files (training examples now, samples later)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncol: int = 8, pad: int = 1) -> np.ndarray:
  """uint8[N, H, W, C] -> one uint8[rows*(H+pad), ncol*(W+pad), C] grid (white padding)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  ncol = max(1, min(ncol, n))
  rows = -(-n // ncol)
  grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
  return grid


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a PNG atomically (temporary file, then rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
  os.close(fd)
  arr = grid[..., 0] if grid.shape[-1] == 1 else grid
  Image.fromarray(arr).save(tmp, format="PNG")
  os.replace(tmp, path)
