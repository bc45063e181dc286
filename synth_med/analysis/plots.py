"""The analyses' figures, drawn from their results (PNG bytes, for the study's `analyses/` folder)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from synth_med.infra.figures import figure, grid_figure, png_bytes


def memorisation_figure(check: Mapping[str, Any], synthetic: np.ndarray, train: np.ndarray) -> bytes:
  """Nearest-training-image distances of synthetic and test images, and the closest pairs."""
  pairs = check["closest_pairs"][:6]
  fig, axes = grid_figure(2, max(len(pairs), 1) + 1, (2.0 * (len(pairs) + 1), 4.4))
  ax = axes[0, 0]
  ax.hist(check["test_distances"], bins=30, alpha=0.6, density=True, label="test → train")
  ax.hist(check["synthetic_distances"], bins=30, alpha=0.6, density=True, label="synthetic → train")
  ax.axvline(check["threshold"], color="k", ls="--", lw=1)
  ax.set_xlabel(f"nearest distance ({check['metric']})")
  ax.legend(fontsize=6)
  axes[1, 0].axis("off")
  for j, (s, t, d) in enumerate(pairs, start=1):
    for row, img in ((0, synthetic[s]), (1, train[t])):
      a = axes[row, j]
      a.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
      a.set_xticks([])
      a.set_yticks([])
    axes[0, j].set_title(f"d={d:.3f}", fontsize=7)
  axes[0, 1].set_ylabel("synthetic", fontsize=7)
  axes[1, 1].set_ylabel("nearest train", fontsize=7)
  return png_bytes(fig)


def bars_figure(values: Mapping[str, Mapping[str, float | None]], ylabel: str,
                errors: Mapping[str, Mapping[str, Sequence[float] | None]] | None = None) -> bytes:
  """Grouped bars: one group per outer key, one bar per inner key (with CI error bars if given)."""
  outer = list(values)
  inner = sorted({k for v in values.values() for k in v})
  fig, axes = figure(1, 1, (max(5.0, 0.9 * len(outer) * max(len(inner), 1) * 0.6 + 2), 3.6))
  ax = axes[0]
  width = 0.8 / max(len(inner), 1)
  for j, name in enumerate(inner):
    xs, ys, lo, hi = [], [], [], []
    for i, o in enumerate(outer):
      v = values[o].get(name)
      if v is None:
        continue
      xs.append(i + j * width)
      ys.append(v)
      ci = (errors or {}).get(o, {}).get(name)
      lo.append(v - ci[0] if ci else 0.0)
      hi.append(ci[1] - v if ci else 0.0)
    ax.bar(xs, ys, width, label=name, yerr=[lo, hi] if errors else None, capsize=2)
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(outer))])
  ax.set_xticklabels(outer, rotation=30, ha="right", fontsize=7)
  ax.axhline(0.0, color="k", lw=0.5)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=6)
  return png_bytes(fig)


def lines_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str) -> bytes:
  """One line per named (x, y) series."""
  return panels_figure({"": series}, xlabel, ylabel)


def panels_figure(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], xlabel: str,
                  ylabel: str, hlines: Mapping[str, Mapping[str, float]] | None = None) -> bytes:
  """One panel per title, one line per named (x, y) series in it, and dashed horizontal reference lines
  (`hlines[title]`: {name: y}), e.g. paper 000's Fig. 3 with the real-data baseline."""
  fig, axes = figure(1, len(panels), (5.0 * len(panels), 3.6))
  for ax, (title, series) in zip(axes, panels.items()):
    for name, (x, y) in series.items():
      ax.plot(x, y, "o-", label=name)
    for k, (name, y) in enumerate((hlines or {}).get(title, {}).items()):
      ax.axhline(y, color=f"C{7 + k}", linestyle="--", linewidth=1.0, label=name)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)
  return png_bytes(fig)


def heatmaps_figure(matrices: Mapping[str, np.ndarray], names: Sequence[str]) -> bytes:
  """One co-occurrence heat map per named matrix (rows: the finding had; columns: the finding also had)."""
  fig, axes = figure(1, len(matrices), (3.2 * len(matrices), 3.4))
  for ax, (title, m) in zip(axes, matrices.items()):
    ax.imshow(np.nan_to_num(m), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_title(title, fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
  return png_bytes(fig)


def table_heatmap_figure(rows: Mapping[str, Mapping[str, float]], label: str) -> bytes:
  """One heat map of values in [0, 1]: a row per key of `rows`, a column per inner key (in first-seen order),
  each cell printed; blank where a row lacks the column."""
  cols = list(dict.fromkeys(k for r in rows.values() for k in r))
  m = np.array([[r.get(c, np.nan) for c in cols] for r in rows.values()], float)
  fig, axes = figure(1, 1, (max(4.0, 0.42 * len(cols) + 2.5), 0.45 * len(rows) + 2.2))
  ax = axes[0]
  im = ax.imshow(np.ma.masked_invalid(m), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  for (i, j), v in np.ndenumerate(m):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
  ax.set_xticks(range(len(cols)))
  ax.set_xticklabels(cols, rotation=90, fontsize=6)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(list(rows), fontsize=7)
  fig.colorbar(im, ax=ax, label=label)
  return png_bytes(fig)
