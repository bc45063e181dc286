"""Diffusion: schedule maths, conditioning, UNet, samplers, CFG, seeding, cascade, preprocessing,
checkpoint load, loss going down and the resumable generation job."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth_med.data.schema import AttributeSpec, DatasetSpec
from synth_med.diffusion import gaussian, samplers, superres_preprocess
from synth_med.diffusion.conditioning import ConditioningSpec, condition_table, make_spec
from synth_med.diffusion.generator import CascadeGenerator, Generator
from synth_med.diffusion.schedules import from_betas, make_schedule, respaced_timesteps
from synth_med.errors import SynthMedError
from synth_med.models import superres_unet, unet
from synth_med.infra import sharding
from synth_med.ops import select_ops, xla, xla_ops
from synth_med.ops.cpu_native import kernels
from synth_med.ops.cpu_native import layers as cpu_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = select_ops(jax.default_backend())  # what build_model gives a float32 model here
OPS_BF16 = select_ops(jax.default_backend(), "bfloat16")


# --- schedules and the closed-form maths -------------------------------------------------------

def test_posterior_constants_match_hand_computed_values():
  s = from_betas(np.array([0.1, 0.2, 0.3]))
  np.testing.assert_allclose(s.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod_prev, [1.0, 0.9, 0.72], rtol=1e-6)
  # t=1: β̃ = β(1-ᾱ_prev)/(1-ᾱ) = 0.2*0.1/0.28; coef1 = β sqrt(ᾱ_prev)/(1-ᾱ); coef2 = (1-ᾱ_prev) sqrt(α)/(1-ᾱ)
  np.testing.assert_allclose(s.posterior_variance[1], 0.2 * 0.1 / 0.28, rtol=1e-6)
  np.testing.assert_allclose(s.posterior_mean_coef1[1], 0.2 * np.sqrt(0.9) / 0.28, rtol=1e-6)
  np.testing.assert_allclose(s.posterior_mean_coef2[1], 0.1 * np.sqrt(0.8) / 0.28, rtol=1e-6)
  assert s.posterior_variance[0] == 0.0
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(0.2 * 0.1 / 0.28), rtol=1e-6)


def test_q_posterior_is_the_product_of_the_two_gaussians():
  s = make_schedule("linear", 50)
  x0, xt = jnp.asarray([[0.3, -0.7]]), jnp.asarray([[1.1, 0.2]])
  for t in (1, 10, 49):
    mean, var, _ = gaussian.q_posterior(s, x0, xt, jnp.asarray([t]))
    ac_prev, beta = float(s.alphas_cumprod_prev[t]), float(s.betas[t])
    # q(x_{t-1}|x_0) = N(sqrt(ᾱ_{t-1}) x0, 1-ᾱ_{t-1}); q(x_t|x_{t-1}) = N(sqrt(1-β) x_{t-1}, β)
    prec = 1 / (1 - ac_prev) + (1 - beta) / beta
    want_mean = (np.sqrt(ac_prev) * x0 / (1 - ac_prev) + np.sqrt(1 - beta) * xt / beta) / prec
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4)
    np.testing.assert_allclose(var[0, 0], 1 / prec, rtol=1e-4)
  # q_sample and predict_x0 invert each other.
  t = jnp.asarray([7])
  noise = jnp.asarray([[0.5, -1.5]])
  np.testing.assert_allclose(gaussian.predict_x0(s, gaussian.q_sample(s, x0, t, noise), t, noise), x0, atol=1e-5)
  # v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 by hand, and ε back from (x_t, v).
  a, b = float(s.sqrt_alphas_cumprod[7]), float(s.sqrt_one_minus_alphas_cumprod[7])
  v = gaussian.v_target(s, x0, t, noise)
  np.testing.assert_allclose(v, a * noise - b * x0, rtol=1e-5)
  np.testing.assert_allclose(gaussian.eps_from_v(s, gaussian.q_sample(s, x0, t, noise), t, v), noise, atol=1e-5)


def test_linear_and_cosine_schedules():
  lin = make_schedule("linear", 1000)
  np.testing.assert_allclose([lin.betas[0], lin.betas[-1]], [1e-4, 0.02], rtol=1e-5)
  cos = make_schedule("cosine", 1000)
  f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
  for t in (0, 250, 500, 900):
    np.testing.assert_allclose(cos.alphas_cumprod[t], f(t + 1) / f(0), rtol=1e-4)
  ts = respaced_timesteps(1000, 50)
  assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) > 0)
  with pytest.raises(SynthMedError, match="schedule"):
    make_schedule("quadratic")


# --- conditioning ------------------------------------------------------------------------------

SKIN = DatasetSpec("skin", ("a", "b", "c"), "softmax", (AttributeSpec("sex", ("f", "m")),
                                                     AttributeSpec("age_bucket", tuple("0123456"))),
                   ("id",), 3)
CHEST = DatasetSpec("chest", ("x", "y"), "multilabel", (AttributeSpec("sex", ("f", "m")),), ("id",), 1)
TISSUE = DatasetSpec("tissue", ("tumour",), "binary", (AttributeSpec("hospital", ("h0", "h3", "h4")),),
                     ("h0",), 3)


def test_condition_parts_can_be_null_on_their_own():
  cs = make_spec(SKIN, True, ("sex", "age_bucket"))
  assert cs.part_widths == (3, 2, 7) and cs.dim == 12
  batch = {"label": np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]), "labelled": np.array([True, False]),
           "attrs/sex": np.array([1, -1]), "attrs/age_bucket": np.array([-1, 6])}
  v = np.asarray(cs.encode(batch))
  np.testing.assert_allclose(v[0], [0.5, 0.5, 0, 0, 1] + [0] * 7)
  np.testing.assert_allclose(v[1], [0, 0, 0, 0, 0] + [0] * 6 + [1])  # unlabelled: label part null

  chest = make_spec(CHEST, True, ())
  b = {"label": np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]), "labelled": np.array([True, True, False]),
       "label_mask": np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])}
  v = np.asarray(chest.encode(b))
  np.testing.assert_allclose(v, [[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])  # uncertain finding -> zeros;
  # "no finding" differs from "no label"

  tissue = make_spec(TISSUE, True, ("hospital",))
  v = np.asarray(tissue.encode({"label": np.array([[1.0], [0.0]]), "labelled": np.array([True, False]),
                                "attrs/hospital": np.array([0, 2])}))
  np.testing.assert_allclose(v, [[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])  # unlabelled patch keeps its hospital
  with pytest.raises(SynthMedError, match="skin_tone"):
    make_spec(CHEST, True, ("skin_tone",))


def test_condition_dropout_nulls_each_part_with_its_probability():
  cs = make_spec(SKIN, True, ("sex",))
  n = 20000
  batch = {"label": np.tile([[1.0, 0, 0]], (n, 1)), "labelled": np.ones(n, bool),
           "attrs/sex": np.zeros(n, np.int32)}
  v = np.asarray(cs.encode(batch, jax.random.key(0), 0.1))
  label_null, sex_null = v[:, :3].sum(1) == 0, v[:, 3:].sum(1) == 0
  se = np.sqrt(0.1 * 0.9 / n)
  assert abs(label_null.mean() - 0.1) < 4 * se and abs(sex_null.mean() - 0.1) < 4 * se
  assert abs((label_null & sex_null).mean() - 0.01) < 0.004  # independent parts
  np.testing.assert_array_equal(np.asarray(cs.encode(batch))[:, :3].sum(1), 1.0)  # no rng: no dropout


# --- the UNet ----------------------------------------------------------------------------------

def tiny_unet(**kw):
  args = dict(out_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
              attention_resolutions=(2,), num_head_channels=8, ops=OPS)
  args.update(kw)
  return unet.Model(**args)


def perturbed_params(model, x, cond, low=None, scale=0.05):
  """Init params plus noise, so that zero-initialised layers no longer hide the rest."""
  t = jnp.zeros((x.shape[0],), jnp.int32)
  p = jax.jit(lambda: model.init(jax.random.key(0), x, t, cond, low)["params"])()
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


@pytest.mark.slow
def test_unet_zero_init_output_and_conditioning_path():
  m = tiny_unet()
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  t = jnp.array([3, 700])
  cond = jnp.asarray([[1.0, 0, 0], [0, 0, 1.0]])
  apply = jax.jit(lambda p, c: m.apply({"params": p}, x, t, c))
  p = jax.jit(lambda: m.init(jax.random.key(0), x, t, cond)["params"])()
  assert float(jnp.max(jnp.abs(apply(p, cond)))) == 0.0  # zero-initialised output
  p = perturbed_params(m, x, cond)
  assert float(jnp.max(jnp.abs(apply(p, cond) - apply(p, cond[::-1])))) > 1e-4  # the condition changes ε
  # The all-null condition adds exactly nothing (bias-free projection).
  no_cond = jax.jit(lambda p: m.apply({"params": p}, x, t, None))(
      {k: v for k, v in p.items() if k != "cond_embed"})
  np.testing.assert_allclose(apply(p, jnp.zeros_like(cond)), no_cond, atol=1e-6)
  with pytest.raises(SynthMedError, match="not divisible"):
    unet.check_image_size(20, (1, 2, 2, 2))


@pytest.mark.slow
def test_superres_unet_upsamples_a_smaller_low_res_input():
  m = superres_unet.Model(out_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, ops=OPS)
  x = jnp.zeros((2, 16, 16, 3))
  t = jnp.zeros((2,), jnp.int32)
  low = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
  p = perturbed_params(m, x, jnp.zeros((2, 0)), low)
  apply = jax.jit(lambda lo: m.apply({"params": p}, x, t, None, lo))
  a = apply(low)
  np.testing.assert_allclose(a, apply(superres_unet.upsample_bilinear(low, (16, 16))), atol=1e-5)
  assert float(jnp.max(jnp.abs(a - apply(-low)))) > 1e-4
  with pytest.raises(SynthMedError, match="low-resolution"):
    m.apply({"params": p}, x, t, None, None)


def test_conv3x3_gradient_matches_xla_convolution():
  # h != w and c != o, so a swapped tap (i, j) or a mixed-up row shift cannot pass.
  x = jax.random.normal(jax.random.key(0), (2, 6, 9, 5))
  k = jax.random.normal(jax.random.key(1), (3, 3, 5, 4))
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
  for conv in (cpu_layers.conv3x3, xla.conv3x3_matmul_grad):  # native kernels; one matmul
    for a, b in zip(jax.grad(loss(conv), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("c, groups", [(12, 3), (32, 8), (48, 3)])
def test_group_norm_act_matches_autodiff_of_the_plain_chain(c, groups):
  # Groups of several channels, h != w, per-image scale/shift: a group or image mix-up fails.
  # 12 channels run XLA's path; 32 and 48 the native C++ kernels where a compiler exists
  # (48 in 3 groups: a group spans several SIMD vectors).
  ks = jax.random.split(jax.random.key(c), 5)
  x = 2.0 * jax.random.normal(ks[0], (2, 5, 7, c)) + 1.0
  gamma, beta = 1.0 + 0.3 * jax.random.normal(ks[1], (c,)), 0.3 * jax.random.normal(ks[2], (c,))
  scale, shift = 0.5 * jax.random.normal(ks[3], (2, c)), 0.5 * jax.random.normal(ks[4], (2, c))

  def plain(x, gamma, beta, scale, shift, silu):
    xg = x.reshape(2, 5, 7, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * gamma + beta
    y = y * (1 + scale[:, None, None]) + shift[:, None, None]
    return jax.nn.silu(y) if silu else y

  def fused(op):
    def norm(x, gamma, beta, scale, shift, silu):
      return op(x, gamma * (1 + scale), beta * (1 + scale) + shift, groups, silu)
    return norm

  weight = jax.random.normal(jax.random.key(9), x.shape)
  args = (x, gamma, beta, scale, shift)
  native = kernels.norm_fits(x, groups)
  assert native == (c != 12 and kernels.simd_width() is not None)
  hlo = jax.jit(jax.grad(lambda *a: jnp.sum(fused(cpu_layers.group_norm_act)(*a, True)), range(5))).lower(*args).as_text()
  assert (kernels.NORM_FWD in hlo and kernels.NORM_BWD in hlo) == native
  for op in (cpu_layers.group_norm_act, xla.group_norm_act):
    for silu in (True, False):
      loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args, silu)) * weight)  # noqa: E731
      np.testing.assert_allclose(fused(op)(*args, silu), plain(*args, silu), rtol=1e-4, atol=1e-5)
      for a, b in zip(jax.grad(loss(fused(op)), range(5))(*args), jax.grad(loss(plain), range(5))(*args)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_resampling_ops_match_nearest_resize_and_avg_pool():
  from flax import linen as nn
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3))
  np.testing.assert_array_equal(unet._upsample(x), jax.image.resize(x, (2, 8, 12, 3), "nearest"))
  np.testing.assert_allclose(unet._avg_pool(x), nn.avg_pool(x, (2, 2), strides=(2, 2)), rtol=1e-6, atol=1e-6)
  # exact values: each output pixel of the pool is the mean of its 2x2 block
  np.testing.assert_allclose(unet._avg_pool(x)[0, 1, 2], x[0, 2:4, 4:6].mean((0, 1)), rtol=1e-6)


def test_down_conv_is_the_strided_nn_conv_it_replaced():
  """Conv3x3(stride=2) named Conv_<k> has nn.Conv's parameters (checkpoints are interchangeable), its
  float32 outputs, and out[i, j] = the stride-1 convolution at (2i, 2j), which its AMX path computes."""
  from flax import linen as nn
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 16))  # odd height: ceil(9 / 2) = 5 rows out
  ref = nn.Conv(32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  ours = unet.Conv3x3(32, stride=2)
  p_ref, p_ours = ref.init(jax.random.key(1), x), ours.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, p_ref, p_ours)
  y = ours.apply(p_ours, x)
  assert y.shape == (2, 5, 4, 32)
  np.testing.assert_allclose(y, ref.apply(p_ref, x), rtol=1e-5, atol=1e-5)
  k = p_ours["params"]["kernel"]
  np.testing.assert_allclose(xla.down_conv3x3(x, k), xla.conv3x3(x, k)[:, ::2, ::2], rtol=1e-5, atol=1e-5)
  model = unet.Model(out_channels=3, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(), num_head_channels=16)
  params = model.init(jax.random.key(2), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32))["params"]
  assert {k for k in params if k.startswith("Conv_")} == {"Conv_0", "Conv_1"}
  assert params["Conv_1"]["kernel"].shape == (3, 3, 32, 32)


# --- samplers ----------------------------------------------------------------------------------

MU = jnp.asarray([-0.5, 0.0, 0.3, 0.8]).reshape(1, 2, 2, 1)
SD = 0.2


def gaussian_eps(schedule):
  """The exact ε-predictor for data x_0 ~ N(MU, SD²) per pixel."""
  ac = jnp.asarray(schedule.alphas_cumprod)

  def apply(params, x, t, cond, low):
    a = ac[t][:, None, None, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * SD ** 2 + 1 - a)
  return apply


def run_sampler(schedule, cfg, n=4000):
  keys = samplers.image_keys(0, jnp.arange(n))
  fn = jax.jit(lambda k: samplers.sample_loop(gaussian_eps(schedule), schedule, cfg, None, k,
                                              jnp.zeros((n, 0)), None, None, (2, 2, 1)))
  return np.asarray(fn(keys)).reshape(n, -1)


def test_ddim_full_steps_eta1_matches_ddpm_statistics():
  s = make_schedule("cosine", 200)
  ddpm = run_sampler(s, samplers.SamplerConfig("ddpm", 200, clip_denoised=False))
  ddim = run_sampler(s, samplers.SamplerConfig("ddim", 200, eta=1.0, clip_denoised=False))
  np.testing.assert_allclose(ddim.mean(0), ddpm.mean(0), atol=0.01)
  np.testing.assert_allclose(ddim.std(0), ddpm.std(0), rtol=0.03)
  # Both sample the data distribution N(MU, SD²).
  np.testing.assert_allclose(ddpm.mean(0), np.asarray(MU).ravel(), atol=0.02)
  np.testing.assert_allclose(ddpm.std(0), SD, rtol=0.1)
  # DDIM respaced to 25 deterministic steps keeps the means.
  fast = run_sampler(s, samplers.SamplerConfig("ddim", 25, eta=0.0, clip_denoised=False))
  np.testing.assert_allclose(fast.mean(0), np.asarray(MU).ravel(), atol=0.02)


def test_truncated_start_begins_at_the_noised_low_res_image():
  """start < 1 (SDEdit): the chain runs t0 = start*T-1 .. 0 from q(x_t0 | low_res)."""
  s = make_schedule("cosine", 1000)
  ts = respaced_timesteps(1000, 5, last=499)
  np.testing.assert_array_equal(ts, [0, 125, 250, 374, 499])
  n, shape = 256, (4, 4, 3)
  low = jnp.asarray(np.random.default_rng(0).uniform(-0.8, 0.8, (n,) + shape), jnp.float32)
  zero_eps = lambda params, x, t, cond, low_res: jnp.zeros_like(x)  # noqa: E731
  keys = samplers.image_keys(0, jnp.arange(n))

  def run(start):
    cfg = samplers.SamplerConfig("ddim", 5, clip_denoised=False, start=start)
    return np.asarray(samplers.sample_loop(zero_eps, s, cfg, None, keys, jnp.zeros((n, 0)), low, None, shape))

  # With ε ≡ 0 deterministic DDIM returns x_t0 / sqrt(ᾱ_t0) = low + sqrt((1-ᾱ)/ᾱ) z: at
  # start 0.05 (t0 = 49) that is low plus noise of std sqrt((1-ᾱ_49)/ᾱ_49).
  a = float(s.alphas_cumprod[49])
  resid = run(0.05) - np.asarray(low)
  np.testing.assert_allclose(resid.mean(), 0.0, atol=0.01)
  np.testing.assert_allclose(resid.std(), np.sqrt((1 - a) / a), rtol=0.05)
  # From pure noise (start 1) the output does not depend on low_res at all.
  assert abs(np.corrcoef(run(1.0).ravel(), np.asarray(low).ravel())[0, 1]) < 0.05
  with pytest.raises(SynthMedError, match="upsampler"):
    samplers.sample_loop(zero_eps, s, samplers.SamplerConfig("ddim", 5, start=0.5), None, keys,
                         jnp.zeros((n, 0)), None, None, shape)
  with pytest.raises(SynthMedError, match="start"):
    samplers.SamplerConfig("ddpm", 5, start=1.5)


def tiny_generator(batch_size=4, guidance=0.0, mesh=None, name="ddim", steps=3, low_res=False, size=8):
  spec = ConditioningSpec("softmax", 3, (("sex", 2),))
  model = (superres_unet.Model(out_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, ops=OPS)
           if low_res else tiny_unet())
  x = jnp.zeros((1, size, size, 3))
  params = perturbed_params(model, x, jnp.zeros((1, spec.dim)),
                            jnp.zeros((1, size, size, 3)) if low_res else None, scale=0.1)
  mesh = mesh or sharding.make_mesh({"data": 1}, jax.devices()[:1])
  return Generator(model, params, make_schedule("linear", 50), spec,
                   samplers.SamplerConfig(name, steps, 0.0, guidance), (size, size, 3), mesh, batch_size,
                   low_res=low_res)


def conds(n=6):
  spec = ConditioningSpec("softmax", 3, (("sex", 2),))
  return condition_table(spec, n, np.eye(3, dtype=np.float32)[np.arange(n) % 3], {"sex": np.arange(n) % 2})


@pytest.mark.slow
def test_cfg_w0_equals_plain_conditional_sampling():
  from synth_med.diffusion.generator import model_apply
  g = tiny_generator(guidance=0.0)
  c = conds(4)
  with_w0 = g.generate(c, seed=3)  # two passes (conditional and null), combined with w = 0
  keys = samplers.image_keys(jnp.int32(3), jnp.arange(4, dtype=jnp.int32))
  plain = jax.jit(lambda p, k, cond: samplers.sample_loop(  # one conditional pass, no guidance
      model_apply(g.model), g.schedule, g.sampler, p, k, cond, None, None, g.image_shape))(
          g.params, keys, g.cond_spec.encode(c))
  np.testing.assert_array_equal(with_w0, np.asarray(samplers.to_uint8(plain)))
  guided = g.generate(c, seed=3, guidance=3.0)
  assert np.abs(guided.astype(int) - with_w0.astype(int)).mean() > 1.0


def test_cfg_pushes_towards_the_condition_not_away_from_it():
  """ε̃ = (1 + w) ε(c) - w ε(∅): with a stand-in model whose ε is the condition vector's sum (∅ gives 0),
  guidance scales the conditional ε by (1 + w). The flipped sign, (1 + w) ε(∅) - w ε(c), gives -w ε(c)."""
  def apply(params, x, t, cond, low_res):
    del params, t, low_res
    return jnp.ones_like(x) * cond.sum(-1)[:, None, None, None]
  x = jnp.zeros((2, 4, 4, 3))
  cond = jnp.array([[1.0, 0.0, 2.0], [0.0, 0.5, 0.0]])
  w = jnp.float32(2.0)
  eps = samplers.guided_eps(apply, None, x, jnp.zeros(2, jnp.int32), cond, None, w)
  e_c = np.asarray(cond.sum(-1))
  np.testing.assert_allclose(np.asarray(eps)[:, 0, 0, 0], (1 + 2.0) * e_c - 2.0 * 0.0)
  assert not np.allclose(np.asarray(eps)[:, 0, 0, 0], (1 + 2.0) * 0.0 - 2.0 * e_c)
  np.testing.assert_allclose(np.asarray(samplers.guided_eps(apply, None, x, jnp.zeros(2, jnp.int32), cond, None,
                                                            None))[:, 0, 0, 0], e_c)


@pytest.mark.slow
def test_image_k_depends_only_on_seed_and_k():
  c = conds(6)
  full = tiny_generator(batch_size=4).generate(c, seed=7)
  again = tiny_generator(batch_size=8).generate(c, seed=7)
  np.testing.assert_array_equal(full, again)
  part = tiny_generator(batch_size=4).generate({k: v[2:5] for k, v in c.items()}, seed=7, start_index=2)
  np.testing.assert_array_equal(part, full[2:5])
  other = tiny_generator(batch_size=4).generate(c, seed=8)
  assert np.abs(other.astype(int) - full.astype(int)).mean() > 1.0
  ddpm = tiny_generator(name="ddpm", steps=20).generate(c, seed=7)
  assert ddpm.shape == full.shape and ddpm.dtype == np.uint8


@pytest.mark.slow
def test_cascade_base_then_upsampler():
  base = tiny_generator(size=8)
  up = tiny_generator(size=16, low_res=True)
  cascade = CascadeGenerator(base, up)
  c = conds(4)
  imgs = cascade.generate(c, seed=1)
  assert imgs.shape == (4, 16, 16, 3) and imgs.dtype == np.uint8
  np.testing.assert_array_equal(imgs, cascade.generate(c, seed=1))
  low = base.generate(c, seed=1)
  # The upsampler follows its low-resolution input.
  flipped = up.generate(c, seed=1 + 1_000_003, low_res=255 - low)
  assert np.abs(flipped.astype(int) - imgs.astype(int)).mean() > 1.0
  with pytest.raises(SynthMedError, match="super-resolution"):
    CascadeGenerator(base, base)
  with pytest.raises(SynthMedError, match="low_res"):
    up.generate(c)


MESH_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, sys
    sys.path.insert(0, %r)
    from tests.test_diffusion import tiny_generator, conds
    from synth_med.infra import sharding
    assert len(jax.devices()) == 8
    c = conds(12)
    one = tiny_generator(batch_size=8, mesh=sharding.make_mesh({"data": 1}, jax.devices()[:1])).generate(c, seed=5)
    eight = tiny_generator(batch_size=8, mesh=sharding.make_mesh({"data": -1})).generate(c, seed=5)
    diff = np.abs(one.astype(int) - eight.astype(int))
    print("max", diff.max(), "frac", (diff > 0).mean())
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
""")


@pytest.mark.slow
def test_8_device_mesh_sampling_equals_1_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", MESH_SCRIPT % ROOT], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


# --- upsampler preprocessing -------------------------------------------------------------------

def test_low_res_preprocessing_probabilities_and_values():
  n = 4000
  rng = np.random.default_rng(0)
  imgs = jnp.asarray(rng.integers(0, 256, (n, 8, 8, 1)), jnp.uint8)
  aug = superres_preprocess.LowResAugment(low_size=4)
  out, flags = jax.jit(lambda x, k: superres_preprocess.training_low_res(x, k, aug))(imgs, jax.random.key(0))
  out = np.asarray(out)
  for name, p in (("antialias", 0.5), ("noise", 0.2), ("blur", 0.5)):
    freq = float(np.mean(flags[name]))
    assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n), (name, freq)
  sig = np.asarray(flags["blur_sigma"])
  assert abs(sig.mean() - 0.2 * np.sqrt(2 / np.pi)) < 0.01  # E|N(0, 0.2)|
  levels = (out + 1) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # quantised to 256 levels
  assert out.min() >= -1 and out.max() <= 1
  # Noise of σ=4 (0-255 scale): compare noisy, unblurred examples with the same path without noise.
  clean_aug = superres_preprocess.LowResAugment(low_size=4, noise_prob=0.0)
  clean, cflags = superres_preprocess.training_low_res(imgs, jax.random.key(0), clean_aug)
  sel = np.asarray(flags["noise"]) & ~np.asarray(flags["blur"]) & ~np.asarray(cflags["blur"])
  sel &= np.asarray(flags["antialias"]) == np.asarray(cflags["antialias"])
  resid = ((out - np.asarray(clean)) * 127.5)[sel]
  inner = np.abs(resid) < 100  # ignore clipping at 0/255
  assert 3.6 < resid[inner].std() < 4.5


def test_sampling_low_res_is_bilinear_and_quantised():
  low = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)), jnp.uint8)
  up = np.asarray(superres_preprocess.sampling_low_res(low, (8, 8)))
  assert up.shape == (2, 8, 8, 3)
  levels = (up + 1) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)


# --- training, checkpoints and the generation job ---------------------------------------------

def tiny_diffusion_config(steps=40, lr=2e-3):
  from tests.conftest import load_config
  c = load_config("derm_diffusion", "smoke")
  with c.unlocked():
    c.train.steps = steps
    c.train.optimizer.lr = lr
    c.train.batch_size = 16
    c.train.checkpoint_every = steps
    c.train.log_every = steps
    c.model.model_channels = 16
  return c


def _train_tiny(c, workdir):
  """Trains config c's generator; (mean loss on one fixed batch before, after, the train result, mean_loss)."""
  from synth_med.data.sources import make_world
  from synth_med.experiments import diffusion as stage
  from synth_med.data.pipeline import TrainStream
  from synth_med.diffusion.training import DiffusionTask
  from synth_med.train.loop import train

  world = make_world(c.data)
  source, counts = stage.training_source(world, c)
  assert counts["labelled"] > 0 and counts["unlabelled"] == c.data.unlabelled_size
  model = stage.build_model(c.model, world.spec.channels)
  assert model.ops is select_ops(jax.default_backend(), c.model.matmul_precision)
  task = DiffusionTask(model, stage.build_schedule(c), stage.build_cond_spec(c, world.spec), 0.1)
  stream = TrainStream(source, 16, seed=0, num_threads=0)
  batch = jax.tree.map(jnp.asarray, stream.batch(0))
  loss_fn = jax.jit(lambda p, k: task.loss(p, batch, k)[0])

  def mean_loss(params):  # same batch, same 16 (t, noise) draws
    return float(np.mean([loss_fn(params, jax.random.key(i)) for i in range(16)]))

  init = jax.jit(task.init)(jax.random.key(0), batch)
  result = train(task, c, stream, str(workdir))
  return mean_loss(init), mean_loss(result.state.params), result, mean_loss


@pytest.mark.slow
def test_loss_decreases_and_checkpoint_round_trips_through_load(tmp_path):
  c = tiny_diffusion_config()
  before, after, result, mean_loss = _train_tiny(c, tmp_path)
  assert after < 0.6 * before, (before, after)

  ema, step = unet.load(str(tmp_path))
  assert step == c.train.steps
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(jax.device_get(result.state.ema_params))):
    np.testing.assert_array_equal(a, b)
  raw, _ = unet.load(str(tmp_path / "checkpoints"), ema=False)
  assert mean_loss(raw) == pytest.approx(after, rel=1e-5)
  with pytest.raises(SynthMedError, match="no checkpoint folder"):
    unet.load(str(tmp_path / "missing"))


@pytest.mark.slow
def test_bfloat16_products_train_the_generator_as_well(tmp_path):
  """model.matmul_precision='bfloat16' (AMX kernels where the CPU has them, else the same maths in
  float32 on rounded operands): the tiny run's loss falls as far as in float32."""
  c = tiny_diffusion_config()
  with c.unlocked():
    c.model.matmul_precision = "bfloat16"
  before, after, _, _ = _train_tiny(c, tmp_path)
  assert after < 0.6 * before, (before, after)


def test_min_snr_weighting_scales_the_eps_loss_by_min_snr_gamma_over_snr():
  from synth_med.diffusion.training import DiffusionTask

  class ZeroModel:  # predicts ε = 0, so each example's loss is mean(noise²) ≈ 1
    def apply(self, variables, x, *args, **kw):
      return jnp.zeros_like(x)

  s = make_schedule("cosine", 1000)
  batch = {"image": jnp.zeros((8192, 8, 8, 3), jnp.uint8), "label": jnp.zeros((8192, 1)),
           "labelled": jnp.zeros((8192,), bool)}
  spec = ConditioningSpec("softmax", 0)
  plain = float(DiffusionTask(ZeroModel(), s, spec).loss(None, batch, jax.random.key(0))[0])
  weighted = float(DiffusionTask(ZeroModel(), s, spec, min_snr_gamma=5.0).loss(None, batch, jax.random.key(0))[0])
  snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
  expected = np.mean([1.0 if r <= 5.0 else 5.0 / r for r in snr])  # t ~ U{0..T-1}
  assert plain == pytest.approx(1.0, abs=0.01)
  assert weighted == pytest.approx(expected, abs=0.02) and expected < 0.9
  with pytest.raises(SynthMedError, match="min_snr_gamma"):
    DiffusionTask(ZeroModel(), s, spec, min_snr_gamma=-1.0)
  # v-prediction: with x_0 = -1 (black images) the zero model's v-MSE is ᾱ + (1 - ᾱ) = 1 per pixel, and
  # min-SNR weights it by min(SNR, γ) / (SNR + 1).
  v_weighted = float(DiffusionTask(ZeroModel(), s, spec, min_snr_gamma=5.0, prediction="v").loss(
      None, batch, jax.random.key(0))[0])
  assert v_weighted == pytest.approx(np.mean(np.minimum(snr, 5.0) / (snr + 1.0)), abs=0.02)
  with pytest.raises(SynthMedError, match="prediction"):
    DiffusionTask(ZeroModel(), s, spec, prediction="x0")


def test_generation_job_resumes_without_rewriting_or_losing_shards(tmp_path):
  from synth_med.data import shards
  from synth_med.experiments.generation import run_generation

  g = tiny_generator(batch_size=4)
  c = conds(10)
  whole = run_generation(g, c, str(tmp_path / "whole"), seed=2, shard_size=3, generator_step=7)

  class Killed(Exception):
    pass

  def kill_after_second(i):
    if i == 1:
      raise Killed()

  out = str(tmp_path / "killed")
  with pytest.raises(Killed):
    run_generation(g, c, out, seed=2, shard_size=3, generator_step=7, on_shard=kill_after_second)
  done = shards.list_shards(out)
  assert len(done) == 2 and not os.path.exists(os.path.join(out, "DONE"))
  mtimes = {p: os.stat(p).st_mtime_ns for p in done}
  written = []
  run_generation(g, c, out, seed=2, shard_size=3, generator_step=7, on_shard=written.append)
  assert written == [2, 3]  # only the missing shards
  assert {p: os.stat(p).st_mtime_ns for p in done} == mtimes  # finished shards untouched
  a, b = shards.read_shards(whole).arrays, shards.read_shards(out).arrays
  np.testing.assert_array_equal(a["index"], np.arange(10))  # every image exactly once, in order
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert set(a) >= {"image", "label", "labelled", "attrs/sex", "seed", "generator_step", "index"}
  assert a["generator_step"][0] == 7 and a["image"].shape == (10, 8, 8, 3)
  with pytest.raises(SynthMedError, match="other settings"):
    run_generation(g, c, out, seed=3, shard_size=3, generator_step=7)


def band_world(n, seed, k=3):
  """8x8 grey images whose class is the position of a bright vertical band (plus pixel noise)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  img = 40 + rng.normal(0, 12, (n, 8, 8, 1))
  for c in range(k):
    img[y == c, :, 2 * c + 1:2 * c + 3] += 150
  return {"image": np.clip(img, 0, 255).astype(np.uint8), "label": np.eye(k, dtype=np.float32)[y],
          "label_mask": np.ones((n, k), np.float32), "labelled": np.ones(n, bool),
          "index": np.arange(n)}, y


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_conditioning_works_samples_hit_the_requested_label(tmp_path, prediction):
  """A tiny UNet trained 300 steps (ε- or v-prediction); its samples are classified by a classifier
  trained on real data. Threshold: 0.8 accuracy of the requested label (chance 1/3)."""
  from sklearn.linear_model import LogisticRegression
  from synth_med.data.pipeline import ArraySource, TrainStream
  from synth_med.diffusion.training import DiffusionTask
  from synth_med.train.loop import train
  from tests.conftest import loop_config

  data, y = band_world(1024, 0)
  # 10 % of the training images are unlabelled (null label part), as in the method.
  data["labelled"][::10] = False
  data["label"][::10] = 0.0
  c = loop_config(steps=300, batch=32, lr=2e-3)
  with c.unlocked():
    c.train.optimizer.name = "adam"
    c.train.ema_decay = 0.95
    c.train.log_every = 100
    c.train.checkpoint_every = 300
  model = unet.Model(out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), num_head_channels=16, ops=OPS)
  spec = ConditioningSpec("softmax", 3)
  schedule = make_schedule("cosine", 1000)
  res = train(DiffusionTask(model, schedule, spec, 0.1, prediction=prediction), c,
              TrainStream(ArraySource(data), 32, seed=0, num_threads=0), str(tmp_path))
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  g = Generator(model, jax.device_get(res.state.ema_params), schedule, spec,
                samplers.SamplerConfig("ddim", 25, 0.0, 1.0), (8, 8, 1), mesh, 96, prediction=prediction)
  requested = np.arange(96) % 3
  imgs = g.generate(condition_table(spec, 96, np.eye(3, dtype=np.float32)[requested]), seed=0)
  flat = lambda a: a.reshape(len(a), -1) / 255.0  # noqa: E731
  clf = LogisticRegression(max_iter=2000).fit(flat(data["image"]), y)
  test, y_test = band_world(300, 1)
  assert clf.score(flat(test["image"]), y_test) > 0.95  # the judge itself is reliable
  acc = float(np.mean(clf.predict(flat(imgs)) == requested))
  print(f"conditioning accuracy of samples: {acc:.3f} (chance 0.333)")
  assert acc >= 0.8, acc


FIXTURE = os.path.join(ROOT, "tests", "fixtures", "unet_checkpoint")


@pytest.mark.parametrize("name", ["unet", "superres_unet"])
def test_a_stored_checkpoint_loads_and_computes_its_stored_output(name):
  """`tests/fixtures/unet_checkpoint`: orbax checkpoints (step 7) of a tiny base UNet (strided
  downsampling, attention) and super-resolution UNet (resblock up/down), with random parameters
  and their outputs on fixed inputs (`expected.npz`). The parameter names are the checkpoint
  format: the models must load them and compute the same outputs on every set of ops."""
  expected = np.load(os.path.join(FIXTURE, "expected.npz"))
  module = unet if name == "unet" else superres_unet
  params, step = module.load(os.path.join(FIXTURE, name))
  assert step == 7
  args = (expected["x"], expected["t"], expected["cond"]) + ((expected["low_res"],) if name != "unet" else ())
  for ops, tol in ((select_ops(jax.default_backend()), 1e-5), (xla_ops(), 1e-5), (OPS_BF16, 3e-2)):
    model = module.Model(3, 8, (1, 2), 1, (2,) if name == "unet" else (), 8, resblock_updown=name != "unet", ops=ops)
    out = np.asarray(model.apply({"params": params}, *args))
    want = expected[f"{name}_out"]
    assert np.abs(out - want).max() <= tol * np.abs(want).max(), ops.name


def test_a_fixed_number_of_heads_equals_heads_of_that_width():
  """guided-diffusion's num_heads (paper 000: 4 heads) when num_head_channels <= 0: 4 heads over 32
  channels are heads of 8 channels; a count that does not divide the channels fails clearly."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 32))
  by_count = unet.Attention(num_head_channels=-1, num_heads=4, ops=OPS)
  by_width = unet.Attention(num_head_channels=8, ops=OPS)
  one_head = unet.Attention(num_head_channels=-1, num_heads=1, ops=OPS)
  params = by_count.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  np.testing.assert_allclose(by_count.apply(params, x), by_width.apply(params, x), rtol=1e-6, atol=1e-6)
  assert not np.allclose(by_count.apply(params, x), one_head.apply(params, x), atol=1e-4)
  with pytest.raises(SynthMedError, match="cannot be split into 3 heads; choose num_heads"):
    unet.Attention(num_head_channels=-1, num_heads=3, ops=OPS).init(jax.random.PRNGKey(1), x)
