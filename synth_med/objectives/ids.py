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


# --- the IDS weighting objective on a training batch --------------------------------------------------------
# Everything below runs inside the jitted train step of `learnt_weights.LearntWeightsTask`.

def weighted_vib_loss(g: jax.Array, vib: jax.Array, mask: jax.Array, entropy: float) -> jax.Array:
  """mean_j [g_j (VIB_j − mean VIB) − λ H(g_j)] over the masked pairs, H the Bernoulli entropy.

  Its minimiser over free g_j ∈ (0, 1) is g_j = sigmoid(−(VIB_j − mean VIB) / λ): examples whose VIB is
  above the set's mean (their features do not sit with their label's centroid, or their input is cheap to
  compress) get weights below 1/2. Without the entropy term the weights would saturate at 0 or 1, and
  with the VIB's mean normalised by Σ g instead they collapse onto the few lowest-VIB examples."""
  centred = vib - jnp.sum(vib * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  p = jnp.clip(g, 1e-6, 1.0 - 1e-6)
  h = -(p * jnp.log(p) + (1.0 - p) * jnp.log1p(-p))
  return jnp.sum((g * centred - entropy * h) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def unit_vectors(v: jax.Array) -> jax.Array:
  """Each row centred and scaled to unit length (a vector of zeros stays zero)."""
  v = v - v.mean(-1, keepdims=True)
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)


def pooled_inputs(images: jax.Array, size: int) -> jax.Array:
  """Images [B, H, W, C] in [0, 1] average-pooled to size x size and flattened: the input space x̂ of the
  centroids (004 uses the images themselves; pooling keeps the centroids small on any image size)."""
  b, h, w, c = images.shape
  size = max(1, min(int(size), h, w))
  return images.reshape(b, size, h // size, size, w // size, c).mean((2, 4)).reshape(b, -1)


def _straight_through(value: jax.Array, in_graph: jax.Array) -> jax.Array:
  """`value` in the forward pass; the gradient of `in_graph` in the backward pass."""
  return value + in_graph - jax.lax.stop_gradient(in_graph)


class IDSWeighting:
  """004's weighting objective: θ minimises the per-example VIB of the batch's synthetic examples.

  Statistics (state, not gradients; `init_statistics`): per weight slot l (one slot for single-label
  heads, one per finding for multi-label ones, 004 §3) and class k, the sums of Eq. 2 over the previous
  epoch (`sum_*`, `mass`), those of the epoch under way (`cur_*`), and Q(Z | Y) with its running joint.
  Every `epoch_steps` steps (one pass over the synthetic store) the epoch's sums become the centroids' and
  Q is refreshed from the epoch's soft assignments (004's update rule). Until the first refresh the
  centroids use the sums so far.

  Centroids: the value is Eq. 2 over the previous epoch (all real and g-weighted synthetic examples);
  the gradient with respect to θ is that of Eq. 2 in the batch's own synthetic terms g_j v̂_j (a straight-
  through estimate: the full sums are a constant in θ except for the batch). Vectors are centred and
  scaled to unit length, and φ = softmax(−‖v − c‖² / temperature) (004 writes raw distances, which in pixel
  space make φ one-hot and its gradient zero).
  """

  def __init__(self, num_slots: int, num_classes: int, epoch_steps: int, temperature: float = 0.1,
               input_size: int = 8, weighted: bool = True, entropy: float = 0.1):
    self.num_slots, self.num_classes, self.weighted = int(num_slots), int(num_classes), bool(weighted)
    self.entropy = float(entropy)
    self.epoch_steps, self.temperature, self.input_size = max(int(epoch_steps), 1), float(temperature), int(input_size)

  def init_statistics(self, input_dim: int, feature_dim: int) -> dict[str, jax.Array]:
    l, c = self.num_slots, self.num_classes
    zeros = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    return {"sum_input": zeros(l, c, input_dim), "sum_feature": zeros(l, c, feature_dim), "mass": zeros(l, c),
            "cur_input": zeros(l, c, input_dim), "cur_feature": zeros(l, c, feature_dim), "cur_mass": zeros(l, c),
            "q": jnp.full((l, c, c), 1.0 / c, jnp.float32), "cur_joint": zeros(l, c, c), "cur_count": zeros(l, c)}

  def loss(self, g: jax.Array, images: jax.Array, features: jax.Array, targets: jax.Array, mask: jax.Array,
           synthetic: jax.Array, statistics: dict[str, jax.Array], step: jax.Array, real_weights: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """(mean VIB over the batch's synthetic (example, slot) pairs, metrics, updated statistics).

    g [B, L]: the weights (in graph); images [B, H, W, C] in [0, 1]; features [B, d] (held fixed); targets
    [B, L] class indices; mask [B, L] which (example, slot) pairs are labelled; synthetic [B] bool;
    real_weights [B, L]: the real examples' centroid weights (1, or g when the real data are re-weighted)."""
    c = self.num_classes
    x = unit_vectors(pooled_inputs(images, self.input_size))
    z = unit_vectors(jax.lax.stop_gradient(features))
    syn = synthetic.astype(jnp.float32)[:, None] * mask  # [B, L]
    real = (1.0 - synthetic.astype(jnp.float32))[:, None] * mask
    onehot = jax.nn.one_hot(targets, c, dtype=jnp.float32)  # [B, L, C]
    w = onehot * (syn * g + real * real_weights)[..., None]  # each example's Eq. 2 mass per slot and class
    batch_input = jnp.einsum("blc,bd->lcd", w, x)
    batch_feature = jnp.einsum("blc,bd->lcd", w, z)
    batch_mass = w.sum(0)
    st = statistics
    cur_input = st["cur_input"] + jax.lax.stop_gradient(batch_input)
    cur_feature = st["cur_feature"] + jax.lax.stop_gradient(batch_feature)
    cur_mass = st["cur_mass"] + jax.lax.stop_gradient(batch_mass)
    have = st["mass"] > 0  # [L, C]: the previous epoch saw this class
    base_mass = jnp.where(have, st["mass"], cur_mass)
    base_input = jnp.where(have[..., None], st["sum_input"], cur_input)
    base_feature = jnp.where(have[..., None], st["sum_feature"], cur_feature)
    mass = _straight_through(jnp.maximum(base_mass, 1e-6), batch_mass)
    c_input = _straight_through(base_input, batch_input) / mass[..., None]
    c_feature = _straight_through(base_feature, batch_feature) / mass[..., None]

    def per_slot(xc, zc, t, q):
      phi_x = jax.nn.softmax(-jnp.sum(jnp.square(x[:, None] - xc[None]), -1) / self.temperature, -1)
      phi_z = jax.nn.softmax(-jnp.sum(jnp.square(z[:, None] - zc[None]), -1) / self.temperature, -1)
      return vib_per_example(phi_z, phi_x, t, q), phi_z
    vib, phi_z = jax.vmap(per_slot, in_axes=(0, 0, 1, 0), out_axes=(1, 1))(c_input, c_feature, targets, st["q"])
    n_syn = jnp.maximum(jnp.sum(syn), 1.0)
    mean_vib = jnp.sum(vib * syn) / n_syn
    loss = mean_vib  # 004 as written: θ acts through the centroids only
    if self.weighted:  # our addition: each example's weight also scales its own VIB (see `weighted_vib_loss`)
      loss = loss + weighted_vib_loss(g, jax.lax.stop_gradient(vib), syn, self.entropy)
    # Q's running joint Pr[Ẑ ∈ a, Ŷ = y] over the epoch's synthetic examples (held fixed).
    joint = st["cur_joint"] + jnp.einsum("bla,bly->lay", jax.lax.stop_gradient(phi_z) * syn[..., None], onehot)
    count = st["cur_count"] + jnp.sum(onehot * syn[..., None], 0)
    refresh = (step + 1) % self.epoch_steps == 0
    q_new = jnp.where(count[:, None, :] > 0, joint / jnp.maximum(count[:, None, :], 1e-12), 1.0 / c)
    keep = lambda new, old: jnp.where(refresh, new, old)  # noqa: E731
    zero = jnp.zeros_like
    new_stats = {"sum_input": keep(cur_input, st["sum_input"]), "sum_feature": keep(cur_feature, st["sum_feature"]),
                 "mass": keep(cur_mass, st["mass"]),
                 "cur_input": keep(zero(cur_input), cur_input), "cur_feature": keep(zero(cur_feature), cur_feature),
                 "cur_mass": keep(zero(cur_mass), cur_mass), "q": keep(q_new, st["q"]),
                 "cur_joint": keep(zero(joint), joint), "cur_count": keep(zero(count), count)}
    metrics = {"vib": mean_vib, "q_diagonal": jnp.mean(jnp.diagonal(st["q"], axis1=1, axis2=2))}
    return loss, metrics, new_stats
