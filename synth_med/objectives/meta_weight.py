"""MW-Net (Shu et al. 2019, "Meta-Weight-Net"), the re-weighting baseline of paper 004's tables: a small
network V(ℓ; φ) maps a synthetic example's training loss to its weight in [0, 1], and φ is trained so that
one look-ahead step of the classifier on the V-weighted loss lowers the loss on clean (real) examples.

Ours is the cheap form of the look-ahead: the virtual step moves only the classifier's linear head, on the
backbone's features held fixed, and the clean meta batch is the real examples of the same training batch
(MW-Net keeps a separate clean meta set and steps the whole network). The gradient with respect to φ goes
through that virtual step (second order in the head only).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class LossToWeight(nn.Module):
  """V(ℓ): per (example, slot) loss [B, L] -> weight [B, L] in [0, 1] (MW-Net's 1-100-1 MLP)."""
  hidden: int = 100

  @nn.compact
  def __call__(self, losses: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.hidden, name="hidden")(losses[..., None]))
    return jax.nn.sigmoid(nn.Dense(1, name="out")(h))[..., 0]


def meta_loss(net: LossToWeight, net_params: Any, head: Any, features: jax.Array,
              slot_losses: Callable[[Any, jax.Array], jax.Array], mask: jax.Array, synthetic: jax.Array,
              virtual_lr: float) -> tuple[jax.Array, jax.Array]:
  """(the clean examples' loss after one virtual head step on the V-weighted loss, the weights [B, L]).

  `slot_losses(head, features)` -> per (example, slot) losses [B, L]; `mask` [B, L] the labelled pairs;
  `synthetic` [B] bool. Real examples weigh 1 in the virtual step and form the meta batch."""
  features = jax.lax.stop_gradient(features)
  head = jax.lax.stop_gradient(head)
  syn = synthetic.astype(jnp.float32)[:, None] * mask
  real = (1.0 - synthetic.astype(jnp.float32))[:, None] * mask
  weights = net.apply({"params": net_params}, jax.lax.stop_gradient(slot_losses(head, features)))

  def train_loss(h):
    per = slot_losses(h, features)
    return jnp.sum(per * (real + syn * weights)) / jnp.maximum(jnp.sum(real + syn), 1.0)
  grads = jax.grad(train_loss)(head)
  stepped = jax.tree.map(lambda p, g: p - virtual_lr * g, head, grads)
  clean = jnp.sum(slot_losses(stepped, features) * real) / jnp.maximum(jnp.sum(real), 1.0)
  return clean, weights
