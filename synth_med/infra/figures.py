"""Matplotlib figures for the HTML pages (report, analyses, toys): made off-screen, embedded as PNG."""
from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the off-screen backend is chosen


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (5.0, 3.6)) -> tuple[Any, list[Any]]:
  """(figure, its axes as a flat list, row by row)."""
  fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=size)
  return fig, list(axes.ravel())


def grid_figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
  """(figure, axes as a [rows, cols] array)."""
  return plt.subplots(rows, cols, squeeze=False, figsize=size)


def png_bytes(fig: Any) -> bytes:
  """The figure as PNG; the figure is closed."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  return buf.getvalue()


def png_data_uri(fig: Any) -> str:
  """The figure as a data: URI for an <img> (closed afterwards)."""
  return data_uri(png_bytes(fig))


def png_file_data_uri(path: str) -> str:
  """A PNG file as a data: URI for an <img>."""
  with open(path, "rb") as f:
    return data_uri(f.read())


def data_uri(png: bytes) -> str:
  """PNG bytes as a data: URI for an <img>."""
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
