"""The study report: one self-contained HTML file (`<workdir>/report.html`), images embedded.

Sections: what was run; sample grids per (label, property), real next to
synthetic; a table per split of each method's metrics (mean ± std over seeds)
and fairness gap; performance against fairness gap per method (like 002
Fig. 7); stage timings.
"""
from __future__ import annotations

import html
import os
from typing import Any, Mapping

import numpy as np

from synth_med.infra import artifacts
from synth_med.infra.figures import grid_figure, png_data_uri, png_file_data_uri
from synth_med.evaluation.study_results import comparison_row_name, fmt


def _strip(images: np.ndarray, n: int, size: int, channels: int) -> np.ndarray:
  """n images side by side (grey where fewer exist)."""
  out = np.full((size, n * size, 3), 128, np.uint8)
  for i, img in enumerate(images[:n]):
    img = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
    out[:, i * size:(i + 1) * size] = img[:size, :size, :3]
  return out


def sample_grid_figure(real: dict[str, np.ndarray], synth: dict[str, np.ndarray], spec: Any, attr: str,
                       max_rows: int = 6, per_cell: int = 3) -> Any:
  """Rows: the most frequent labels; for each value of `attr`: real images | synthetic images."""

  r_y, s_y = real["label"].argmax(-1), synth["label"].argmax(-1)
  if spec.label_kind != "softmax":  # multi-label / binary: rows by the first positive finding (or none)
    r_y = np.where(real["label"].max(-1) > 0.5, real["label"].argmax(-1), -1)
    s_y = np.where(synth["label"].max(-1) > 0.5, synth["label"].argmax(-1), -1)
  classes = [c for c in np.argsort(-np.bincount(r_y + 1, minlength=spec.num_classes + 1)) - 1][:max_rows]
  values = list(range(len(spec.attribute(attr).values)))
  size, ch = real["image"].shape[1], real["image"].shape[-1]
  fig, axes = grid_figure(len(classes), 2 * len(values), (2 * len(values) * per_cell * 0.55, len(classes) * 0.75))
  for i, c in enumerate(classes):
    for j, v in enumerate(values):
      for k, (src, y, name) in enumerate(((real, r_y, "real"), (synth, s_y, "synthetic"))):
        sel = src["image"][(y == c) & (src[f"attrs/{attr}"] == v)]
        ax = axes[i, 2 * j + k]
        ax.imshow(_strip(sel, per_cell, size, ch))
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
          ax.set_title(f"{spec.attribute(attr).values[v]}\n{name}", fontsize=7)
        if j == 0 and k == 0:
          label = "no finding" if c < 0 else spec.class_names[c]
          ax.set_ylabel(label[:18], fontsize=6, rotation=0, ha="right", va="center")
  fig.suptitle(f"real (left of each pair) vs synthetic (right), by label and {attr}", fontsize=8)
  return fig


def scatter_figure(res: dict[str, Any]) -> Any:
  """Performance (first headline metric) against the fairness gap, one panel per split."""

  metric = res["metrics"][0]
  splits = res["splits"]
  fig, axes = grid_figure(1, max(len(splits), 1), (4.2 * max(len(splits), 1), 3.6))
  for ax, split in zip(axes[0], splits):
    for name, entry in res["methods"].items():
      p, g = entry[split][metric], entry[split]["gap"]
      if p["mean"] is None or g["mean"] is None:
        continue
      ax.errorbar(g["mean"], p["mean"], xerr=g["std"], yerr=p["std"], fmt="o", capsize=2, label=name)
      ax.annotate(name, (g["mean"], p["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{res['attribute']} gap ({res['gap_metric']}, lower is fairer)", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.set_title(split, fontsize=9)
    ax.grid(alpha=0.3)
  return fig


def _table(res: dict[str, Any], split: str) -> str:
  cols = list(res["metrics"]) + ["gap"]
  head = "".join(f"<th>{html.escape(c if c != 'gap' else res['attribute'] + ' gap')}</th>" for c in cols)
  rows = []
  for name, entry in res["methods"].items():
    mix = entry.get("mix", {})
    what = f"α={mix.get('alpha', 1.0):g}" + (f", l={mix['equality_level']:g}" if mix.get("equality_level") else "")
    cells = "".join(f"<td>{fmt(entry[split][c])}</td>" for c in cols)
    rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(what)}</td>{cells}</tr>")
  return (f"<h3>{html.escape(split)}</h3><table><tr><th>method</th><th>mix</th>{head}</tr>"
          + "".join(rows) + "</table>")


def _cell(c: dict[str, Any]) -> str:
  if c.get("diff") is None:
    return "<td>n/a</td>"
  colour = {"better": "#d8f0d8", "worse": "#f6d6d6"}.get(c["verdict"], "#fff")
  ci = "" if c["ci"] is None else f" [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
  p = "" if c.get("p_mann_whitney") is None else f"<br>U p={c['p_mann_whitney']:.2g}"
  return f"<td style='background:{colour}'>{c['diff']:+.3f}{ci}<br>{html.escape(c['verdict'])}{p}</td>"


def control_verdicts(res: dict[str, Any], mix: str = "synth_label_property") -> list[str]:
  """Sentences saying, per split and metric, whether the synthetic mix beats its controls (its CI of the
  difference to `reference` lies above each control's point estimate) or not."""
  comps = res.get("comparisons", {})
  controls = [m for m in comps if m.startswith("control_")]
  if mix not in comps or not controls:
    return []
  out = []
  for split in res["splits"]:
    for name, c in comps[mix].get(split, {}).items():
      if c.get("ci") is None:
        continue
      lower_better = name == "gap"
      beaten = [k for k in controls if comps[k].get(split, {}).get(name, {}).get("diff") is not None and
                ((c["ci"][1] < comps[k][split][name]["diff"]) if lower_better
                 else (c["ci"][0] > comps[k][split][name]["diff"]))]
      if len(beaten) < len(controls):
        out.append(f"{split} {name}: {mix} does no better than "
                   f"{', '.join(k for k in controls if k not in beaten)} (its CI does not clear the control's estimate), "
                   "so this gain, if any, need not come from the synthetic images.")
  return out


def comparison_section(res: dict[str, Any]) -> str:
  """The report's first table: each method minus the real-data baseline, per split and metric."""
  ref = str(res.get("reference", "real"))
  cols = list(res["metrics"]) + ["gap"]
  head = "".join(f"<th>{html.escape(s)}: {html.escape(c)}</th>" for s in res["splits"] for c in cols)
  rows = []
  for m, entry in res["comparisons"].items():
    cells = "".join(_cell(entry.get(s, {}).get(c, {})) for s in res["splits"] for c in cols)
    rows.append(f"<tr><td>{html.escape(comparison_row_name(m, entry))}</td><td>{entry.get('seeds', '')}</td>{cells}</tr>")
  notes = "".join(f"<li>{html.escape(t)}</li>" for t in control_verdicts(res))
  return (f"<h2>Paired differences to {html.escape(ref)}</h2><p>Each cell: the mean over seeds of the "
          f"method minus <b>{html.escape(ref)}</b> (same seed, same test images), its 95 % bootstrap CI "
          "(seeds and test images resampled together) and a verdict: better or worse when the CI excludes 0, "
          "otherwise no detectable difference; U p is the Mann-Whitney test over seeds. A method marked (vs X) is "
          "compared with X instead (paper 000's two-site mixes against the external site's real data). For the "
          f"{html.escape(res['attribute'])} gap lower is better.</p><table><tr><th>method</th><th>seeds</th>"
          f"{head}</tr>" + "".join(rows) + "</table>" + (f"<p>Controls:</p><ul>{notes}</ul>" if notes else ""))


ANALYSIS_TITLES = {
    "memorisation": "Memorisation check (002 §3.3, Fig. 9)", "mmd": "Maximum mean discrepancy (002 F.3, G.3.2)",
    "pca": "Principal components (002 G.3.3, Fig. G8)", "improvement": "Change over the baseline per group (Figs. G4-G7)",
    "generation_quality": "Generation quality per group", "underserved": "Underserved individuals (002 G.3.4, Fig. G9)",
    "beta_posterior": "Beta posterior spread (002 F.2, Fig. G6)", "group_metrics": "Fairness metrics (MEDFAIR)",
    "quality_filter": "Synthetic-sample quality filter",
    "supplementation": "Supplementation with label-matched replicas (paper 000)",
    "learnt_weights": "Learnt weights of the synthetic images (paper 004's IDS, MW-Net)",
}


def analyses_section(analyses: Mapping[str, Any], folder: str) -> str:
  """One subsection per analysis: its caption, figure (a PNG under `folder`) and table, or why it was skipped."""
  parts = ["<h2>Analyses</h2>"]
  for name, entry in analyses.items():
    parts.append(f"<h3>{html.escape(ANALYSIS_TITLES.get(name, name))}</h3>")
    if "skipped" in entry:
      parts.append(f"<p>Not run: {html.escape(entry['skipped'])}.</p>")
      continue
    parts.append(f"<p>{html.escape(entry.get('caption', ''))}</p>")
    for fig in (entry.get("figure"), entry.get("heatmaps"), entry.get("images")):
      if fig and os.path.exists(os.path.join(folder, fig)):
        parts.append(f"<img alt='{html.escape(name)}' src='{png_file_data_uri(os.path.join(folder, fig))}'>")
    for table in [entry.get("table")] + list(entry.get("tables", [])):
      if table and table["rows"]:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table["header"])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                       for row in table["rows"])
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
  return "".join(parts)


def write_report(path: str, res: Mapping[str, Any] | None, timings: Mapping[str, Any],
                 summary: Mapping[str, Any], samples: Mapping[str, Any] | None = None) -> str:
  """Writes the study report to `path` (atomically) and returns it.

  `res` is the study's results.json (None before the evaluate stage), `timings` its timings.json,
  `summary` the study's world, skew_setting, skew_attribute, attribute, seeds and num_images, and
  `samples` (or None) real and synthetic arrays for the sample grid: {real, synthetic, spec, store}.
  """
  parts = [f"<h1>synth_med study: {html.escape(str(summary['world']))} world</h1>",
           f"<p>Skew setting <b>{html.escape(str(summary['skew_setting']))}</b> on "
           f"<b>{html.escape(str(summary['skew_attribute']))}</b>; fair sampling over "
           f"<b>{html.escape(str(summary['attribute']))}</b>; {int(summary['seeds'])} seed(s); "
           f"{int(summary['num_images'])} synthetic images per conditioning mode.</p>"]

  if res and res.get("comparisons"):
    parts.append(comparison_section(res))

  parts.append("<h2>Samples: real next to synthetic</h2>")
  if samples is not None:
    fig = sample_grid_figure(samples["real"], samples["synthetic"], samples["spec"], str(summary["attribute"]))
    parts.append(f"<p>Store: <code>{html.escape(str(samples['store']))}</code></p>"
                 f"<img alt='sample grid' src='{png_data_uri(fig)}'>")
  else:
    parts.append("<p>No synthetic store yet (the generate stage has not run).</p>")

  parts.append("<h2>Results (mean ± std over seeds)</h2>")
  if res and res["methods"]:
    parts.append(f"<p>Gap: best − worst {html.escape(res['attribute'])} group on "
                 f"{html.escape(res['gap_metric'])}.</p>")
    parts += [_table(res, s) for s in res["splits"]]
    parts.append("<h2>Performance against fairness gap</h2>")
    parts.append(f"<img alt='performance vs gap' src='{png_data_uri(scatter_figure(res))}'>")
    if res.get("missing"):
      parts.append(f"<p>Missing runs: {html.escape(', '.join(res['missing']))}</p>")
  else:
    parts.append("<p>No classifier results yet (the classifiers and evaluate stages have not run).</p>")

  fid = res.get("fidelity") if res else None
  if fid:
    parts.append("<h2>Generator fidelity</h2><p>Does the generator follow its conditions? A probe "
                 "(gradient-boosted trees on colour-grid, channel and edge features) fitted on real labelled "
                 "images predicts the label and the property; <i>real</i> is its accuracy on held-out real "
                 "images (how visible the part is), <i>synthetic</i> its agreement with what each synthetic "
                 "image was asked for. Synthetic far below real means that part of the condition is not "
                 "rendered, so fair sampling over it cannot help.</p><table><tr><th>store</th><th>part</th>"
                 "<th>real held-out</th><th>synthetic as requested</th><th>majority class</th>"
                 "<th>per requested value</th></tr>")
    for mode, entry in fid.items():
      for part, e in entry.items():
        if not isinstance(e, dict):
          continue
        syn = "n/a" if e.get("synthetic_as_requested") is None else f"{e['synthetic_as_requested']:.3f}"
        per = ", ".join(f"{k}: {v:.2f}" for k, v in (e.get("synthetic_per_value") or {}).items())
        parts.append(f"<tr><td>{html.escape(mode)}</td><td>{html.escape(part)}</td><td>{e['real_heldout']:.3f}</td>"
                     f"<td>{syn}</td><td>{e['majority_baseline']:.3f}</td><td>{html.escape(per)}</td></tr>")
    parts.append("</table>")
  cfid = res.get("fidelity_classifier") if res else None
  if cfid:
    parts.append("<p>The second judge: the real-data classifier (every seed of "
                 f"<b>{html.escape(str(res.get('reference', 'real')))}</b>) on the synthetic images, against the "
                 "label each was asked for, next to the same metric on the real ID test images.</p><table><tr>"
                 "<th>store</th><th>metric</th><th>real ID test</th><th>synthetic as requested</th><th>ratio</th>"
                 "<th>per requested value</th></tr>")
    for mode, e in cfid.items():
      per = ", ".join(f"{k}: {v:.2f}" for k, v in (e.get("synthetic_per_value") or {}).items())
      ratio = "n/a" if e.get("ratio") is None else f"{e['ratio']:.2f}"
      real, synth = (("n/a" if e[k] is None else f"{e[k]:.3f}") for k in ("real_heldout", "synthetic_as_requested"))
      parts.append(f"<tr><td>{html.escape(mode)}</td><td>{html.escape(e['metric'])}</td>"
                   f"<td>{real}</td><td>{synth}</td><td>{ratio}</td>"
                   f"<td>{html.escape(per)}</td></tr>")
    parts.append("</table>")

  if res and res.get("analyses"):
    parts.append(analyses_section(res["analyses"], os.path.dirname(os.path.abspath(path))))

  tuning = res.get("tuning") if res else None
  if tuning:
    parts.append(f"<h2>Hyper-parameter tuning</h2><p>The <b>{html.escape(tuning['method'])}</b> recipe, "
                 f"1 run per point and seed, scored by {html.escape(tuning['metric'])} on the "
                 f"{html.escape(tuning['split'])} split; the best point is used by every method.</p>"
                 f"<table><tr><th>point</th><th>{html.escape(tuning['metric'])}</th><th>used</th></tr>")
    for j, row in enumerate(tuning["points"]):
      point = ", ".join(f"{k}={v}" for k, v in row["overrides"].items())
      mean = "n/a" if row["mean"] is None else f"{row['mean']:.3f}"
      parts.append(f"<tr><td>{html.escape(point)}</td><td>{mean}</td>"
                   f"<td>{'✔' if j == tuning['best'] else ''}</td></tr>")
    parts.append("</table>")

  parts.append("<h2>Stage timings</h2><table><tr><th>stage</th><th>seconds, all runs</th>"
               "<th>seconds, last run</th><th>last run</th></tr>")
  for stage, t in timings.items():
    parts.append(f"<tr><td>{html.escape(stage)}</td><td>{t.get('total_seconds', t['seconds']):.0f}</td>"
                 f"<td>{t['seconds']:.0f}</td>"
                 f"<td>{'skipped (finished earlier)' if t['skipped_last_run'] else 'ran'}</td></tr>")
  total = sum(t.get("total_seconds", t["seconds"]) for t in timings.values())
  parts.append(f"<tr><td><b>total</b></td><td><b>{total:.0f}</b></td><td></td><td></td></tr></table>")
  style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
           "font-size:13px;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
  page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>synth_med report</title>"
          f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
  artifacts.atomic_write(path, lambda f: f.write(page), "w", ".html")
  return path
