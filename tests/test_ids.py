"""Paper 004's information-bottleneck quantities (objectives/ids.py): hand computations and its Theorem 3.1."""
import jax
import jax.numpy as jnp
import numpy as np

from synth_med.objectives import ids


def test_weighted_centroids_match_a_hand_computation():
  real = jnp.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
  real_y = jnp.array([0, 0, 1])
  synth = jnp.array([[4.0, 4.0], [0.0, 8.0], [7.0, 7.0]])
  synth_y = jnp.array([0, 1, 2])
  g = jnp.array([0.5, 0.25, 0.0])
  c = ids.class_centroids(real, real_y, synth, synth_y, g, 3)
  # class 0: (0,0) + (2,0) + 0.5 (4,4) over 2.5 = (4, 2) / 2.5; class 1: ((10,10) + 0.25 (0,8)) / 1.25;
  # class 2: weight 0, no real image -> zero vector
  np.testing.assert_allclose(c, [[1.6, 0.8], [8.0, 9.6], [0.0, 0.0]], rtol=1e-6)


def test_vib_matches_a_hand_computation_on_two_classes():
  z = jnp.array([[0.0], [1.0]])
  x = jnp.array([[0.0], [3.0]])
  cz = jnp.array([[0.0], [1.0]])
  cx = jnp.array([[0.0], [2.0]])
  labels = jnp.array([0, 1])
  phi_z, phi_x = ids.soft_assignment(z, cz), ids.soft_assignment(x, cx)
  e = np.exp(-1.0)
  np.testing.assert_allclose(phi_z, [[1 / (1 + e), e / (1 + e)], [e / (1 + e), 1 / (1 + e)]], rtol=1e-6)
  q = jnp.array([[0.7, 0.2], [0.3, 0.8]])  # Q(a | y), columns sum to 1
  vib = ids.vib_per_example(phi_z, phi_x, labels, q)
  px, pz = np.asarray(phi_x), np.asarray(phi_z)
  hand = [np.sum(px[j] * np.log(px[j])) - np.sum(pz[j] * np.log(np.asarray(q)[:, int(labels[j])]))
          for j in range(2)]
  np.testing.assert_allclose(vib, hand, rtol=1e-6)


def test_vib_bounds_the_information_bottleneck_from_above():
  """004's Theorem 3.1 on random sets: with Q refreshed from the same set, mean VIB >= I(Z, X) - I(Z, Y)."""
  for seed in range(20):
    k = jax.random.split(jax.random.key(seed), 5)
    m, c = 64, 3
    labels = jax.random.randint(k[0], (m,), 0, c)
    phi_z = ids.soft_assignment(jax.random.normal(k[1], (m, 4)), jax.random.normal(k[2], (c, 4)))
    phi_x = ids.soft_assignment(jax.random.normal(k[3], (m, 4)), jax.random.normal(k[4], (c, 4)))
    q = ids.update_q(phi_z, labels, c)
    np.testing.assert_allclose(q.sum(0), 1.0, rtol=1e-5)
    ib = float(ids.information_bottleneck(phi_z, phi_x, labels, c))
    vib = float(ids.vib_per_example(phi_z, phi_x, labels, q).mean())
    assert vib >= ib - 1e-5, (seed, vib, ib)
