"""Paper 003's EMIXER (Biswal et al.): a label-conditioned image generator G(z, y), the report decoder
F(image) (`models.report_decoder`), and three discriminators: image (projection head and a rotation head
for self-supervision), report (an LSTM) and joint image + report. Every weight layer is spectrally
normalised (`SNDense`, `SNConv`: the kernel divided by its largest singular value, found by power
iteration from a fixed start at each call, so the networks keep no state beyond their parameters).

Reports reach the discriminators as word distributions [B, T, V]: one-hot for real reports, F's softmax
for generated ones (`report_decoder.soft_generate`), embedded as distribution @ embedding, so the
discriminators' gradient reaches F and G through the text (003's "appropriate text embeddings").
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_med.models import report_decoder
from synth_med.models.gan_layers import downsample, upsample

ROTATIONS = 4  # 0, 90, 180, 270 degrees


def spectral_normalise(w: jax.Array, iterations: int = 5) -> jax.Array:
  """w / σ_max(w reshaped to [fan_in, fan_out]), σ by power iteration from a fixed vector (held fixed in
  the gradient, as in Miyato et al. 2018)."""
  m = jax.lax.stop_gradient(w.reshape(-1, w.shape[-1]))
  v = jnp.ones((m.shape[1],), m.dtype) / jnp.sqrt(m.shape[1])
  for _ in range(iterations):
    u = m @ v
    u = u / (jnp.linalg.norm(u) + 1e-12)
    v = m.T @ u
    v = v / (jnp.linalg.norm(v) + 1e-12)
  sigma = jnp.dot(u, m @ v)
  return w / jnp.maximum(sigma, 1e-6)


class SNDense(nn.Module):
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("kernel", nn.initializers.orthogonal(), (x.shape[-1], self.features))
    y = x @ spectral_normalise(w)
    return y + self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else y


class SNConv(nn.Module):
  features: int
  kernel: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("kernel", nn.initializers.orthogonal(), (self.kernel, self.kernel, x.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(x, spectral_normalise(w), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.param("bias", nn.initializers.zeros, (self.features,))


class SelfAttention(nn.Module):
  """SAGAN's self-attention block with a learnt gate γ (starts at 0)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    q = SNConv(max(c // 8, 1), 1, name="query")(x).reshape(b, h * w, -1)
    k = SNConv(max(c // 8, 1), 1, name="key")(x).reshape(b, h * w, -1)
    v = SNConv(c, 1, name="value")(x).reshape(b, h * w, c)
    attention = jax.nn.softmax(q @ k.transpose(0, 2, 1), axis=-1)
    gamma = self.param("gamma", nn.initializers.zeros, ())
    return x + gamma * (attention @ v).reshape(b, h, w, c)


class ConditionalNorm(nn.Module):
  """Per-channel normalisation over the pixels with a scale and shift from the condition [z; y]."""

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    mean = x.mean((1, 2), keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(x.var((1, 2), keepdims=True) + 1e-5)
    gamma = 1.0 + SNDense(x.shape[-1], name="gamma")(cond)
    beta = SNDense(x.shape[-1], name="beta")(cond)
    return x * gamma[:, None, None, :] + beta[:, None, None, :]


class _UpBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    h = upsample(nn.relu(ConditionalNorm(name="norm1")(x, cond)))
    h = SNConv(self.features, name="conv1")(h)
    h = SNConv(self.features, name="conv2")(nn.relu(ConditionalNorm(name="norm2")(h, cond)))
    return h + SNConv(self.features, 1, name="skip")(upsample(x))


class _DownBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = SNConv(self.features, name="conv1")(nn.relu(x))
    h = downsample(SNConv(self.features, name="conv2")(nn.relu(h)))
    return h + downsample(SNConv(self.features, 1, name="skip")(x))


class Generator(nn.Module):
  """G(z, y): z and the embedded label through residual up-blocks from 4 px, self-attention at 32 px."""
  image_size: int
  channels: int
  width: int = 32
  label_dim: int = 32

  @nn.compact
  def __call__(self, z: jax.Array, y: jax.Array) -> jax.Array:
    cond = jnp.concatenate([z, SNDense(self.label_dim, use_bias=False, name="label_embed")(y)], -1)
    levels = int(self.image_size).bit_length() - 3  # 4 px doubled to image_size
    c = self.width * 2 ** min(levels, 3)
    x = SNDense(4 * 4 * c, name="input")(cond).reshape(-1, 4, 4, c)
    for k in range(levels):
      c_out = self.width * 2 ** max(min(levels - k - 1, 3), 0)
      x = _UpBlock(c_out, name=f"up{k}")(x, cond)
      if x.shape[1] == 32:
        x = SelfAttention(name="attention")(x)
    x = nn.relu(ConditionalNorm(name="out_norm")(x, cond))
    return jnp.tanh(SNConv(self.channels, name="out")(x))


class ImageDiscriminator(nn.Module):
  """D_image: residual down-blocks (self-attention at 32 px) to features φ; real/fake logit ψ(φ) plus the
  label projection ⟨embed(y), φ⟩ for labelled images, and a rotation logit over the 4 angles."""
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, labelled: jax.Array) -> tuple[jax.Array, jax.Array]:
    k = 0
    while x.shape[1] > 4:
      x = _DownBlock(self.width * 2 ** min(k, 3), name=f"down{k}")(x)
      if x.shape[1] == 32:
        x = SelfAttention(name="attention")(x)
      k += 1
    phi = jnp.sum(nn.relu(x), axis=(1, 2))
    logit = SNDense(1, name="psi")(phi)[:, 0]
    projection = jnp.sum(SNDense(phi.shape[-1], use_bias=False, name="label_embed")(y) * phi, -1)
    rotation = SNDense(ROTATIONS, name="rotation")(phi)
    return logit + labelled * projection, rotation


class ReportEncoder(nn.Module):
  """An LSTM over embedded word distributions [B, T, V] -> its outputs averaged over the words (weighted by
  how much of each position is not <pad>, id 0) and projected."""
  hidden: int = 64

  @nn.compact
  def __call__(self, words: jax.Array) -> jax.Array:
    e = words @ self.param("embedding", nn.initializers.normal(1.0), (words.shape[-1], self.hidden))
    h = nn.RNN(nn.LSTMCell(self.hidden), name="lstm")(e)
    words_mass = 1.0 - words[..., 0]  # how much of each position is a word, not <pad>
    h = jnp.sum(h * words_mass[..., None], 1) / jnp.maximum(jnp.sum(words_mass, 1, keepdims=True), 1e-6)
    return SNDense(self.hidden, name="proj")(h)


class ReportDiscriminator(nn.Module):
  """D_report: LSTM(report) -> linear layers -> real/fake logit."""
  hidden: int = 64

  @nn.compact
  def __call__(self, words: jax.Array) -> jax.Array:
    p = ReportEncoder(self.hidden, name="encoder")(words)
    return SNDense(1, name="out")(nn.leaky_relu(SNDense(self.hidden, name="hidden")(p), 0.2))[:, 0]


class JointDiscriminator(nn.Module):
  """D_joint: [CNN(image) features; LSTM(report) embedding] -> linear layers -> real/fake logit."""
  width: int = 16
  hidden: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, words: jax.Array) -> jax.Array:
    k = 0
    while x.shape[1] > 4:
      x = _DownBlock(self.width * 2 ** min(k, 3), name=f"down{k}")(x)
      k += 1
    image = jnp.sum(nn.relu(x), axis=(1, 2))
    report = ReportEncoder(self.hidden, name="report")(words)
    joint = jnp.concatenate([image, report], -1)
    # 003's linear layers on [image; report], plus a projection term ⟨W image, report⟩ (our addition, as
    # the projection discriminator scores a label) so that the score can depend on whether they match
    match = jnp.sum(SNDense(self.hidden, use_bias=False, name="match")(image) * report, -1)
    return SNDense(1, name="out")(nn.leaky_relu(SNDense(self.hidden, name="hidden")(joint), 0.2))[:, 0] + match


class Model:
  """The EMIXER networks of one configuration (not a Flax module: a bundle the task applies)."""

  def __init__(self, image_size: int, channels: int, num_labels: int, vocab_size: int, z_dim: int = 64,
               width: int = 32, sentences: int = 8, words: int = 16, hidden: int = 64, word_layers: int = 3):
    self.image_size, self.channels, self.num_labels, self.z_dim = image_size, channels, num_labels, z_dim
    self.generator = Generator(image_size, channels, width)
    self.decoder = report_decoder.Model(vocab_size, sentences, words, width=max(width // 2, 8), hidden=hidden,
                                        word_layers=word_layers)
    self.d_image = ImageDiscriminator(width)
    self.d_report = ReportDiscriminator(hidden)
    self.d_joint = JointDiscriminator(max(width // 2, 8), hidden)
    self.vocab_size = vocab_size

  def __repr__(self) -> str:
    return (f"emixer.Model({self.image_size}, {self.channels}, {self.num_labels}, {self.vocab_size}, "
            f"z={self.z_dim}, {self.generator!r}, {self.decoder!r})")


def rotate(x: jax.Array, k: int) -> jax.Array:
  """Images [B, H, W, C] rotated by k × 90 degrees."""
  return jnp.rot90(x, k, axes=(1, 2))


__all__ = ["Model", "ROTATIONS", "rotate", "spectral_normalise"]
