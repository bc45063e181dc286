"""The information-bottleneck quantities of paper 004 (IDS, Wang et al.: informative synthetic data
selection), as pure functions: the weighted class centroids (its Eq. 2), the soft assignment of a point
to the centroids, the exact IB loss on a synthetic set, the per-example variational bound VIB of its
Theorem 3.1 and the update of the variational distribution Q(Z | Y) between epochs.

Notation (004 §3): C classes; real inputs x_i with labels y_i; synthetic inputs x̂_j with labels ŷ_j
and weights g_j = g_θ(x̂_j) ∈ [0, 1]; ẑ_j = f'_Θ(x̂_j) the classifier's penultimate features.
φ(v, c)_a = softmax_a(−‖v − c_a‖²). Labels are class indices; a multi-label task runs these per label
with C = 2 (004 averages the per-label VIBs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def class_centroids(real: jax.Array, real_labels: jax.Array, synthetic: jax.Array, synthetic_labels: jax.Array,
                    weights: jax.Array, num_classes: int) -> jax.Array:
  """004's Eq. 2: per class k, (Σ_i v_i 1[y_i = k] + Σ_j g_j v̂_j 1[ŷ_j = k]) / (Σ_i 1[y_i = k] + Σ_j g_j 1[ŷ_j = k]).

  `real` [N, d] and `synthetic` [M, d] are the same kind of vector (flattened inputs, or features: 004
  writes the real inputs in the feature centroid too, which we read as their features). A class with
  no mass gets the zero vector. Returns [C, d]."""
  r = jax.nn.one_hot(real_labels, num_classes, dtype=real.dtype)  # [N, C]
  s = jax.nn.one_hot(synthetic_labels, num_classes, dtype=synthetic.dtype) * weights[:, None]  # [M, C]
  total = r.T @ real + s.T @ synthetic
  mass = r.sum(0) + s.sum(0)
  return total / jnp.maximum(mass, 1e-12)[:, None]


def soft_assignment(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """φ: [M, C] with rows softmax(−‖v − c_a‖²) over the classes a."""
  d2 = jnp.sum(jnp.square(points[:, None, :] - centroids[None, :, :]), axis=-1)
  return jax.nn.softmax(-d2, axis=-1)


def _xlogy(p: jax.Array, q: jax.Array) -> jax.Array:
  return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, q, 1.0)), 0.0)


def information_bottleneck(phi_z: jax.Array, phi_x: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """The IB loss I(Ẑ, X̂) − I(Ẑ, Ŷ) of 004 §3.2 from the soft assignments of the features (`phi_z`) and
  the inputs (`phi_x`) of one set of M examples with class `labels`."""
  m = phi_z.shape[0]
  y = jax.nn.one_hot(labels, num_classes, dtype=phi_z.dtype)
  p_z, p_x, p_y = phi_z.mean(0), phi_x.mean(0), y.mean(0)
  p_zx = phi_z.T @ phi_x / m  # [C, C]
  p_zy = phi_z.T @ y / m
  i_zx = jnp.sum(_xlogy(p_zx, p_zx / jnp.maximum(p_z[:, None] * p_x[None, :], 1e-30)))
  i_zy = jnp.sum(_xlogy(p_zy, p_zy / jnp.maximum(p_z[:, None] * p_y[None, :], 1e-30)))
  return i_zx - i_zy


def update_q(phi_z: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Q(Ẑ ∈ a | Y = y) = Pr[Ẑ ∈ a, Ŷ = y] / Pr[Ŷ = y] over the synthetic set, [C (a), C (y)]; computed at the
  end of each epoch (004 §3.2). A label that never occurs gets the uniform column."""
  y = jax.nn.one_hot(labels, num_classes, dtype=phi_z.dtype)
  joint = phi_z.T @ y  # [a, y], unnormalised
  count = y.sum(0)
  return jnp.where(count[None, :] > 0, joint / jnp.maximum(count[None, :], 1e-12), 1.0 / num_classes)


def vib_per_example(phi_z: jax.Array, phi_x: jax.Array, labels: jax.Array, q: jax.Array) -> jax.Array:
  """004's Theorem 3.1 term of each example j:
  Σ_a Σ_b φ(ẑ_j)_a φ(x̂_j)_b log φ(x̂_j)_b − Σ_a φ(ẑ_j)_a log Q(a | ŷ_j). Their mean over the synthetic set is
  the VIB, an upper bound on `information_bottleneck` of the same set."""
  neg_entropy_x = jnp.sum(_xlogy(phi_x, phi_x), axis=-1) * phi_z.sum(-1)
  log_q = jnp.log(jnp.maximum(q[:, labels].T, 1e-30))  # [M, C]: log Q(a | ŷ_j)
  return neg_entropy_x - jnp.sum(phi_z * log_q, axis=-1)
