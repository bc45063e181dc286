"""App. E.1 augmentations: jittable, in range, random per key, and doing what they say."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth_med.data import augment
from synth_med.errors import SynthMedError


@pytest.mark.parametrize("modality,channels", [("skin", 3), ("chest", 1), ("tissue", 3)])
def test_augment_is_jittable_in_range_and_random(modality, channels):
  fn = jax.jit(augment.make_augment(modality, "standard"))
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, channels))
  a = fn(x, jax.random.key(1))
  b = fn(x, jax.random.key(2))
  assert a.shape == x.shape
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  assert not np.allclose(a, b)
  np.testing.assert_allclose(a, fn(x, jax.random.key(1)))


def test_none_is_identity_and_unknown_kind_fails():
  assert augment.make_augment("skin", "none") is None
  with pytest.raises(SynthMedError, match="choose one of"):
    augment.make_augment("skin", "heavy")


def test_hue_rotation_preserves_grey_and_full_turn():
  grey = jnp.full((4, 4, 3), 0.4)
  np.testing.assert_allclose(augment._hue(grey, 0.3), grey, atol=1e-5)
  img = jax.random.uniform(jax.random.key(0), (4, 4, 3))
  np.testing.assert_allclose(augment._hue(img, 1.0), img, atol=1e-4)


def test_affine_flip_and_identity():
  img = jnp.arange(16.0).reshape(4, 4, 1)
  same = augment._affine(img, 0.0, 1.0, False, False, jnp.zeros(2))
  np.testing.assert_allclose(same, img, atol=1e-5)
  flipped = augment._affine(img, 0.0, 1.0, True, False, jnp.zeros(2))
  np.testing.assert_allclose(flipped, img[:, ::-1], atol=1e-5)


def test_blur_keeps_mean_and_smooths():
  img = jnp.zeros((9, 9, 1)).at[4, 4, 0].set(1.0)
  out = augment._blur(img, jnp.asarray(1.0), 3)
  assert abs(float(out.sum()) - 1.0) < 1e-4
  assert float(out[4, 4, 0]) < 0.5
