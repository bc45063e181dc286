"""Paper 002's App. D toy settings, reproduced numerically ("Generative models improve fairness of
medical classifiers under distribution shifts", Ktena et al.).

    python -m synth_med.analysis.toys --out app_d_toys.html

Convention: here, as in App. D, α is the weight of the *generated* data, p′ = t(1 − α) + p̂ α;
Eq. 3 of the main text (and `mix.alpha` in the configs) uses α for the *real* fraction.

- D.1 (Fig. D1): one Bernoulli variable. t is the empirical distribution of N draws from p, p̂ the
  generative model's; α* minimises KL(p ‖ p′). KL is convex in α, and p′ reaches p exactly when
  α = (t₀ − p₀)/(t₀ − p̂₀) lies in [0, 1], so α* is that value clipped (`optimal_alpha_closed_form`).
- D.2 (Fig. D2): a label y and a hidden attribute a. Resampling can reweight y freely but keeps
  t(a|y) and p̂(a|y): p′(y, a) = t(a|y) t̄(y) + p̂(a|y) p̄(y) with Σ t̄ + p̄ = 1 (Eq. 4-5), fitted by
  minimising KL(p ‖ p′). Eq. 6 writes the KL the other way round; this direction is the one that is
  infinite when the N draws miss a cell of p, as App. D.2 states for small N.
- D.3 (Figs. D3-D4): a Gaussian mixture, one component per class. A GMM fitted to unlabelled
  points, its modes named with the labelled points, samples generated points; a classifier trained
  on labelled + generated points is scored on held-out points of the true mixture.
"""
from __future__ import annotations

import argparse
import html
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture

from synth_med.infra.artifacts import atomic_write
from synth_med.infra.figures import figure, png_data_uri

EPS = 1e-12


def kl(p: np.ndarray, q: np.ndarray) -> float:
  """KL(p ‖ q) of discrete distributions (any shape); inf where q = 0 < p."""
  p, q = np.asarray(p, float).ravel(), np.asarray(q, float).ravel()
  on = p > 0
  if np.any(q[on] <= 0):
    return float("inf")
  return float(np.sum(p[on] * np.log(p[on] / q[on])))


# --- D.1 -----------------------------------------------------------------------------------------

def bernoulli(p0: float) -> np.ndarray:
  return np.array([p0, 1.0 - p0])


def optimal_alpha_closed_form(p0: float, t0: float, phat0: float) -> float:
  """argmin over α in [0, 1] of KL(p ‖ t(1 − α) + p̂ α) for Bernoulli p, t, p̂ (given by P(y=0))."""
  if abs(t0 - phat0) < EPS:
    return 0.0  # p′ = t whatever α: no reason to use generated data
  return float(np.clip((t0 - p0) / (t0 - phat0), 0.0, 1.0))


def optimal_alpha_numeric(p0: float, t0: float, phat0: float) -> float:
  """The same minimum found by a bounded scalar search (the check on the closed form)."""
  p = bernoulli(p0)

  def loss(a):
    value = kl(p, bernoulli(t0 * (1 - a) + phat0 * a))
    return value if np.isfinite(value) else 1e6
  return float(optimize.minimize_scalar(loss, bounds=(0.0, 1.0), method="bounded",
                                        options={"xatol": 1e-7}).x)


def alpha_over_resamples(n: int, p0: float, phat0: float, resamples: int, rng: np.random.Generator
                         ) -> dict[str, float]:
  """α* over `resamples` draws of t (N points from p): mean and the 95 % CI of the mean."""
  t0 = rng.binomial(n, p0, resamples) / n
  alphas = np.array([optimal_alpha_closed_form(p0, t, phat0) for t in t0])
  half = 1.96 * alphas.std(ddof=1) / np.sqrt(len(alphas))
  return {"mean": float(alphas.mean()), "ci": [float(alphas.mean() - half), float(alphas.mean() + half)]}


def d1_sweeps(resamples: int = 1000, seed: int = 0, n: int = 6, p0: float = 0.2, phat0: float = 0.5,
              points: int = 19) -> dict[str, list[dict[str, float]]]:
  """Fig. D1(b): α* as N (1..100), p and p̂ (in (0, 1)) vary in turn around N = 6, p = 0.2, p̂ = 0.5."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(0.05, 0.95, points)
  return {
      "N": [{"x": float(v), **alpha_over_resamples(int(v), p0, phat0, resamples, rng)}
            for v in np.unique(np.linspace(1, 100, points).round().astype(int))],
      "p": [{"x": float(v), **alpha_over_resamples(n, float(v), phat0, resamples, rng)} for v in grid],
      "p_hat": [{"x": float(v), **alpha_over_resamples(n, p0, float(v), resamples, rng)} for v in grid],
  }


# --- D.2 -----------------------------------------------------------------------------------------

P_TRUE = np.array([[0.35, 0.4], [0.1, 0.15]])  # p(y, a): rows y, columns a (App. D.2)
P_GENERATED = np.array([[0.7, 0.2], [0.05, 0.05]])  # p̂(y, a), the generative model


def conditional_on_label(joint: np.ndarray) -> np.ndarray:
  """p(a|y) rows; a row of zeros where y never occurs."""
  totals = joint.sum(1, keepdims=True)
  return np.divide(joint, totals, out=np.zeros_like(joint, dtype=float), where=totals > 0)


def best_label_mix(p: np.ndarray, t: np.ndarray, p_hat: np.ndarray | None, iterations: int = 5000
                   ) -> tuple[float, np.ndarray]:
  """(min KL(p ‖ p′), weights): p′(y, a) = t(a|y) t̄(y) [+ p̂(a|y) p̄(y)], weights (t̄, p̄) on the simplex.

  Minimising KL(p ‖ Σ_k w_k b_k) over the simplex is maximum-likelihood estimation of mixture weights
  with fixed components b_k, a concave problem; EM's multiplicative update climbs to its maximum.
  """
  parts = [conditional_on_label(t)] + ([conditional_on_label(p_hat)] if p_hat is not None else [])
  # column k of `basis` is the p′ of putting all weight on (source, y) = k
  basis = np.stack([cond[y] * np.eye(2)[y][:, None] for cond in parts for y in range(2)], -1).reshape(4, -1)
  usable = basis.sum(0) > 0  # a label never drawn cannot be resampled
  b, flat_p = basis[:, usable], p.ravel()
  w = np.full(b.shape[1], 1.0 / b.shape[1])
  for _ in range(iterations):
    q = b @ w
    ratio = np.divide(flat_p, q, out=np.zeros_like(q), where=q > 0)
    w = w * (b.T @ ratio)
    w = w / w.sum()
  weights = np.zeros(len(usable))
  weights[usable] = w
  return kl(p, b @ w), weights


def d2_curves(ns: Sequence[int] = (5, 10, 20, 50, 100, 200, 500, 1000), repeats: int = 10, seed: int = 0
              ) -> list[dict[str, object]]:
  """Fig. D2: min KL with and without generated data per N, over `repeats` draws of t."""
  rng = np.random.default_rng(seed)
  rows = []
  for n in ns:
    with_gen, without = [], []
    for _ in range(repeats):
      t = rng.multinomial(n, P_TRUE.ravel()).reshape(2, 2) / n
      with_gen.append(best_label_mix(P_TRUE, t, P_GENERATED)[0])
      without.append(best_label_mix(P_TRUE, t, None)[0])
    rows.append({"N": int(n), "with_generated": _summary(with_gen), "without_generated": _summary(without)})
  return rows


def _summary(values: Sequence[float]) -> dict[str, object]:
  """Mean and 95 % CI of the finite values, and how many were infinite."""
  v = np.asarray(values, float)
  finite = v[np.isfinite(v)]
  if len(finite) == 0:
    return {"mean": None, "ci": None, "infinite": int(len(v))}
  half = 1.96 * finite.std(ddof=1) / np.sqrt(len(finite)) if len(finite) > 1 else 0.0
  return {"mean": float(finite.mean()), "ci": [float(finite.mean() - half), float(finite.mean() + half)],
          "infinite": int(len(v) - len(finite))}


# --- D.3 -----------------------------------------------------------------------------------------

@dataclass
class TrueMixture:
  """A GMM with one component per class: means U[0, 1] per dimension, full covariances A Aᵀ with
  A ~ N(0, scale²)."""
  means: np.ndarray  # [classes, dims]
  covs: np.ndarray  # [classes, dims, dims]

  @classmethod
  def random(cls, classes: int, dims: int, rng: np.random.Generator, scale: float = 0.1) -> "TrueMixture":
    a = rng.normal(0.0, scale, (classes, dims, dims))
    return cls(rng.uniform(0.0, 1.0, (classes, dims)), a @ a.transpose(0, 2, 1) + 1e-4 * np.eye(dims))

  def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(self.means), n)
    x = np.stack([rng.multivariate_normal(self.means[k], self.covs[k]) for k in y]) if n else np.zeros((0, self.means.shape[1]))
    return x, y


def name_modes(gmm: GaussianMixture, x: np.ndarray, y: np.ndarray, classes: int) -> np.ndarray:
  """The class of each fitted mode: the assignment that classifies the labelled points best."""
  counts = np.zeros((gmm.n_components, classes))
  np.add.at(counts, (gmm.predict(x), y), 1)
  modes, labels = linear_sum_assignment(-counts)
  out = np.zeros(gmm.n_components, int)
  out[modes] = labels
  return out


def gmm_accuracy(mixture: TrueMixture, labelled: int, generated: int, rng: np.random.Generator,
                 unlabelled: int = 10_000, validation: int = 2000) -> float:
  """Validation accuracy of a classifier on `labelled` true points plus `generated` points sampled
  from a GMM fitted to `unlabelled` points (modes named with the labelled points)."""
  classes = len(mixture.means)
  x_l, y_l = mixture.sample(labelled, rng)
  while len(np.unique(y_l)) < 2:  # a classifier needs two classes
    x_l, y_l = mixture.sample(labelled, rng)
  x_v, y_v = mixture.sample(validation, rng)
  x_train, y_train = x_l, y_l
  if generated:
    gmm = GaussianMixture(classes, covariance_type="full", random_state=int(rng.integers(1 << 31)))
    gmm.fit(mixture.sample(unlabelled, rng)[0])
    x_g, modes = gmm.sample(generated)
    x_train = np.concatenate([x_l, x_g])
    y_train = np.concatenate([y_l, name_modes(gmm, x_l, y_l, classes)[modes]])
  clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
  return float(clf.score(x_v, y_v))


def d3_curves(settings: Sequence[tuple[int, int]] = ((3, 2), (5, 8), (10, 16)),
              labelled: Sequence[int] = (10, 20, 50, 100, 500), generated: Sequence[int] = (0, 1000, 10_000),
              repeats: int = 3, seed: int = 0) -> list[dict[str, object]]:
  """Fig. D4: accuracy against labelled points, per generated points, for (components, dimensions)."""
  rng = np.random.default_rng(seed)
  out = []
  for classes, dims in settings:
    mixture = TrueMixture.random(classes, dims, rng)
    curves = {str(g): [float(np.mean([gmm_accuracy(mixture, n, g, rng) for _ in range(repeats)]))
                       for n in labelled] for g in generated}
    out.append({"components": classes, "dims": dims, "labelled": list(labelled), "accuracy": curves})
  return out


# --- the page ------------------------------------------------------------------------------------

def write_page(path: str, resamples: int = 1000, d2_repeats: int = 10, d3_repeats: int = 3, seed: int = 0,
               d3_settings: Sequence[tuple[int, int]] = ((3, 2), (5, 8), (10, 16)),
               d3_labelled: Sequence[int] = (10, 20, 50, 100, 500), d3_generated: Sequence[int] = (0, 1000, 10_000)
               ) -> str:
  """Computes D.1-D.3 and writes their figures and numbers to one HTML page (about a minute on a CPU)."""
  p0, phat0, n = 0.2, 0.5, 6
  rng = np.random.default_rng(seed)
  t0 = rng.binomial(n, p0) / n
  single = {"t0": t0, "alpha": optimal_alpha_closed_form(p0, t0, phat0)}
  drawn = optimal_alpha_closed_form(p0, 1 / 6, phat0)
  sweeps = d1_sweeps(resamples, seed)
  d2 = d2_curves(repeats=d2_repeats, seed=seed)
  d3 = d3_curves(d3_settings, d3_labelled, d3_generated, repeats=d3_repeats, seed=seed)

  fig, axes = figure(1, 3, (13, 3.4))
  for ax, (name, rows) in zip(axes, sweeps.items()):
    x = [r["x"] for r in rows]
    ax.plot(x, [r["mean"] for r in rows], "o-")
    ax.fill_between(x, [r["ci"][0] for r in rows], [r["ci"][1] for r in rows], alpha=0.3)
    ax.set_xlabel(name)
    ax.set_ylabel("optimal α (weight of generated data)")
  d1_uri = png_data_uri(fig)

  fig, axes = figure(1, 1, (5, 3.4))
  ax = axes[0]
  for key, style in (("with_generated", "o-"), ("without_generated", "s--")):
    pts = [(r["N"], r[key]) for r in d2 if r[key]["mean"] is not None]
    ax.plot([p[0] for p in pts], [p[1]["mean"] for p in pts], style, label=key.replace("_", " "))
    ax.fill_between([p[0] for p in pts], [p[1]["ci"][0] for p in pts], [p[1]["ci"][1] for p in pts], alpha=0.2)
  ax.set_xscale("log")
  ax.set_xlabel("N")
  ax.set_ylabel("min KL(p ‖ p′)")
  ax.legend()
  d2_uri = png_data_uri(fig)

  fig, axes = figure(1, len(d3), (4.3 * len(d3), 3.4))
  for ax, setting in zip(axes, d3):
    for g, acc in setting["accuracy"].items():
      ax.plot(setting["labelled"], acc, "o-", label=f"{g} generated")
    ax.set_xscale("log")
    ax.set_title(f"{setting['components']} components, {setting['dims']} dims")
    ax.set_xlabel("labelled points")
    ax.set_ylabel("validation accuracy")
    ax.legend()
  d3_uri = png_data_uri(fig)

  d2_rows = "".join(
      f"<tr><td>{r['N']}</td><td>{_fmt(r['with_generated'])}</td><td>{_fmt(r['without_generated'])}</td></tr>"
      for r in d2)
  page = f"""<!DOCTYPE html><html><head><meta charset='utf-8'><title>App. D toys</title></head><body>
<h1>Paper 002, App. D: the toy settings</h1>
<p>Here α is the weight of the <b>generated</b> data, p′ = t(1 − α) + p̂ α, as in App. D; Eq. 3 and
<code>mix.alpha</code> use α for the real fraction.</p>
<h2>D.1: one Bernoulli variable (Fig. D1)</h2>
<p>N = {n}, p(y=0) = {p0}, p̂(y=0) = {phat0}. The paper's drawn example, t(y=0) = 1/6, gives
α* = {drawn:.3f} (the paper: 0.1); this run drew t(y=0) = {single['t0']:.3f}, α* = {single['alpha']:.3f}.
Below, α* (mean over {resamples} draws of t, 95 % CI) as N, p and p̂ vary in turn: it falls towards 0 as N
grows, and rises as p̂ nears p.</p><img src='{d1_uri}'>
<h2>D.2: a label and a hidden attribute (Fig. D2)</h2>
<p>p = {P_TRUE.tolist()}, p̂ = {P_GENERATED.tolist()} (rows y, columns a); the smallest KL(p ‖ p′) over the
label weights, with and without the generated data, over {d2_repeats} draws of t per N (95 % CI; ∞ counts the
draws that missed a cell of p, where only generated data can fill it).</p><img src='{d2_uri}'>
<table border=1><tr><th>N</th><th>with generated</th><th>without</th></tr>{d2_rows}</table>
<h2>D.3: a Gaussian mixture (Figs. D3-D4)</h2>
<p>A GMM fitted to 10,000 unlabelled points, its modes named with the labelled points, supplies the generated
points; logistic regression on labelled + generated points, scored on 2,000 held-out points (mean of
{d3_repeats} repeats).</p><img src='{d3_uri}'>
</body></html>"""
  atomic_write(path, lambda f: f.write(page), "w", ".html")
  return path


def _fmt(s: dict[str, object]) -> str:
  text = "∞" if s["mean"] is None else f"{s['mean']:.4f} [{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]"
  return text + (f" ({s['infinite']} ∞)" if s["infinite"] and s["mean"] is not None else "")


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="app_d_toys.html")
  ap.add_argument("--resamples", type=int, default=1000, help="draws of t per D.1 point")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  path = write_page(os.path.abspath(args.out), args.resamples, seed=args.seed)
  print(f"wrote {html.escape(path)}")


if __name__ == "__main__":
  main()
