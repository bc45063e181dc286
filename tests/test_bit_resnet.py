"""BiT-ResNet: architecture, heads, and loading BiT .npz files (written here in BiT naming)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth_med.errors import SynthMedError
from synth_med.models import bit_resnet


def _init(model, channels=3, size=32):
  return model.init(jax.random.key(0), jnp.zeros((2, size, size, channels)))["params"]


def test_r50_has_bit_parameter_count_and_names():
  m = bit_resnet.Model(num_outputs=10, depth=50)
  p = jax.eval_shape(lambda: _init(m))
  flat = bit_resnet._flatten(p)
  backbone = sum(int(np.prod(v.shape)) for k, v in flat.items() if k[0] != "head")
  assert abs(backbone - 23.5e6) < 0.1e6  # BiT-R50x1 backbone
  assert ("block4", "unit03", "c", "standardized_conv2d", "kernel") in flat
  assert ("block1", "unit01", "a", "proj", "standardized_conv2d", "kernel") in flat
  assert ("block3", "unit23", "a", "group_norm", "scale") in bit_resnet._flatten(
      jax.eval_shape(lambda: _init(bit_resnet.Model(num_outputs=2, depth=101))))


@pytest.mark.slow
@pytest.mark.parametrize("outputs", [1, 5, 27])
def test_heads_and_zero_init(outputs):
  m = bit_resnet.Model(num_outputs=outputs, width=0.125, block_units=(1, 1, 1, 1))
  p = _init(m)
  logits, feats = m.apply({"params": p}, jnp.ones((2, 32, 32, 3)))
  assert logits.shape == (2, outputs) and feats.shape[0] == 2
  np.testing.assert_allclose(logits, 0.0)  # zero-initialised head


def test_weight_standardisation():
  conv = bit_resnet.StdConv(4, (3, 3), use_bias=False)
  x = jax.random.normal(jax.random.key(1), (1, 5, 5, 2))
  p = conv.init(jax.random.key(0), x)
  scaled = jax.tree.map(lambda w: 7.0 * w + 3.0, p)
  np.testing.assert_allclose(conv.apply(p, x), conv.apply(scaled, x), rtol=1e-4, atol=1e-4)


def _write_bit_npz(path, params, rgb_root=False, drop=None):
  out = {}
  for k, v in bit_resnet._flatten(params).items():
    if k[0] == "head":
      continue
    name = "resnet/" + "/".join({"scale": "gamma", "bias": "beta"}.get(p, p) for p in k)
    if name == drop:
      continue
    arr = np.random.default_rng(len(out)).normal(size=v.shape).astype(np.float32)
    if rgb_root and k[0] == "root_block":
      arr = np.repeat(arr, 3, axis=2)
    out[name] = arr
  out["resnet/head/conv2d/kernel"] = np.zeros((1, 1, 8, 1000), np.float32)
  np.savez(path, **out)
  return out


def test_load_bit_npz_maps_names_and_keeps_new_head(tmp_path):
  m = bit_resnet.Model(num_outputs=3, width=0.125, block_units=(1, 1, 1, 1))
  p = _init(m)
  path = str(tmp_path / "BiT-tiny.npz")
  written = _write_bit_npz(path, p)
  loaded = bit_resnet.load(p, path)
  np.testing.assert_array_equal(loaded["block2"]["unit01"]["b"]["standardized_conv2d"]["kernel"],
                                written["resnet/block2/unit01/b/standardized_conv2d/kernel"])
  np.testing.assert_array_equal(loaded["group_norm"]["scale"], written["resnet/group_norm/gamma"])
  np.testing.assert_array_equal(loaded["head"]["kernel"], p["head"]["kernel"])  # re-initialised
  logits, _ = m.apply({"params": loaded}, jnp.ones((1, 32, 32, 3)))
  assert logits.shape == (1, 3)


def test_load_sums_rgb_root_for_greyscale(tmp_path):
  m = bit_resnet.Model(num_outputs=2, width=0.125, block_units=(1, 1, 1, 1))
  p = _init(m, channels=1)
  path = str(tmp_path / "rgb.npz")
  written = _write_bit_npz(path, p, rgb_root=True)
  loaded = bit_resnet.load(p, path)
  np.testing.assert_allclose(loaded["root_block"]["standardized_conv2d"]["kernel"],
                             written["resnet/root_block/standardized_conv2d/kernel"].sum(2, keepdims=True))


@pytest.mark.slow
def test_load_errors_name_the_problem(tmp_path):
  m = bit_resnet.Model(num_outputs=2, width=0.125, block_units=(1, 1, 1, 1))
  p = _init(m)
  with pytest.raises(SynthMedError, match="does not exist"):
    bit_resnet.load(p, str(tmp_path / "missing.npz"))
  path = str(tmp_path / "partial.npz")
  _write_bit_npz(path, p, drop="resnet/block1/unit01/b/group_norm/gamma")
  with pytest.raises(SynthMedError, match="block1/unit01/b/group_norm/gamma"):
    bit_resnet.load(p, path)
  bigger = _init(bit_resnet.Model(num_outputs=2, width=0.25, block_units=(1, 1, 1, 1)))
  path2 = str(tmp_path / "wider.npz")
  _write_bit_npz(path2, bigger)
  with pytest.raises(SynthMedError, match="has shape"):
    bit_resnet.load(p, path2)
  bad = tmp_path / "corrupt.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(SynthMedError, match="cannot read"):
    bit_resnet.load(p, str(bad))


def test_unknown_depth_is_rejected():
  with pytest.raises(SynthMedError, match="not a BiT depth"):
    _init(bit_resnet.Model(num_outputs=2, depth=34))
