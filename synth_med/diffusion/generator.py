"""`Generator.generate(conditions, n, seed)`: jitted, mesh-sharded sampling of a trained model.

A generator binds a UNet's apply function, its (EMA) parameters, the schedule,
the conditioning spec and a sampler. Batches are padded to a multiple of the
mesh's data axis; image k of a call with `start_index=s` is seeded by
(seed, s + k) only. `CascadeGenerator` chains a base model and the
super-resolution upsampler (002 App. E).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.diffusion import gaussian, samplers, superres_preprocess
from synth_med.diffusion.conditioning import ConditioningSpec
from synth_med.diffusion.schedules import Schedule
from synth_med.errors import SynthMedError
from synth_med.infra import sharding
from synth_med.infra.progress import Progress


def model_apply(model: Any, schedule: Schedule | None = None, prediction: str = "eps") -> samplers.ApplyFn:
  """apply(params, x, t, cond, low_res) -> ε for a unet/superres_unet Model in eval mode; a v-prediction
  model's output is turned into ε with `schedule`."""
  if gaussian.check_prediction(prediction) == "v" and schedule is None:
    raise SynthMedError("model_apply: a v-prediction model needs its schedule to give ε.")

  def apply(params, x, t, cond, low_res):
    out = model.apply({"params": params}, x, t, cond, low_res, train=False)
    return out if prediction == "eps" else gaussian.eps_from_v(schedule, x, t, out)
  return apply


def _broadcast(conditions: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
  out = {}
  for k, v in conditions.items():
    v = np.asarray(v)
    if v.shape[0] == 1 and n != 1:
      v = np.repeat(v, n, axis=0)
    if v.shape[0] != n:
      raise SynthMedError(f"condition {k!r} has {v.shape[0]} rows; expected 1 or n={n}.")
    out[k] = v
  return out


class Generator:
  """Samples images from one diffusion model; see the module docstring."""

  def __init__(self, model: Any, params: Any, schedule: Schedule, cond_spec: ConditioningSpec,
               sampler: samplers.SamplerConfig, image_shape: tuple[int, int, int],
               mesh: jax.sharding.Mesh, batch_size: int = 64, low_res: bool = False,
               name: str = "sampling", prediction: str = "eps"):
    sharding.check_batch_size(batch_size, mesh, "sampler.batch_size")
    self.model, self.schedule = model, schedule
    self.cond_spec, self.sampler, self.image_shape = cond_spec, sampler, tuple(image_shape)
    self.mesh, self.batch_size, self.low_res, self.name = mesh, batch_size, low_res, name
    self.set_params(params)
    data, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    apply = model_apply(model, schedule, prediction)

    def run(params, seed, indices, cond_batch, low, w):
      keys = samplers.image_keys(seed, indices)
      cond = cond_spec.encode(cond_batch)
      if low is not None:
        low = superres_preprocess.sampling_low_res(low, self.image_shape[:2])
      x = samplers.sample_loop(apply, schedule, sampler, params, keys, cond, low, w, self.image_shape)
      return samplers.to_uint8(x)

    self._run = jax.jit(run, in_shardings=(rep, rep, data, data, data, rep), out_shardings=data)

  def set_params(self, params: Any) -> None:
    """New (e.g. newer EMA) parameters of the same shapes; the compiled sampler is reused."""
    self.params = jax.device_put(params, sharding.replicated(self.mesh))

  def generate(self, conditions: Mapping[str, np.ndarray], n: int | None = None, seed: int = 0,
               start_index: int = 0, low_res: np.ndarray | None = None, guidance: float | None = None,
               progress: bool = False) -> np.ndarray:
    """uint8 [n, H, W, C] images for `conditions` (schema keys; 1 row broadcasts to n).

    `guidance` overrides the sampler's w; None uses it. The unconditional pass is
    skipped only when the condition vector is empty.
    """
    if n is None:
      n = int(np.asarray(next(iter(conditions.values()))).shape[0])
    conds = _broadcast(conditions, n)
    if self.low_res and low_res is None:
      raise SynthMedError("this generator is an upsampler; pass the low-resolution images (low_res).")
    w = self.sampler.guidance if guidance is None else guidance
    w_arr = None if self.cond_spec.dim == 0 else jnp.float32(w)
    out, bs = [], self.batch_size
    prog = Progress(self.name, n, unit="image") if progress else None
    for s in range(0, n, bs):
      rows = np.minimum(np.arange(s, s + bs), n - 1)
      cb = {k: v[rows] for k, v in conds.items()}
      idx = (start_index + np.arange(s, s + bs)).astype(np.int32)
      low = None if low_res is None else np.asarray(low_res)[rows]
      put = lambda a: None if a is None else sharding.to_global(a, self.mesh)  # noqa: E731
      imgs = self._run(self.params, jnp.int32(seed), put({"i": idx})["i"], put(cb),
                       None if low is None else put({"l": low})["l"], w_arr)
      out.append(np.asarray(jax.device_get(imgs))[: min(bs, n - s)])
      if prog:
        prog.update(min(s + bs, n))
    return np.concatenate(out, axis=0) if out else np.zeros((0,) + self.image_shape, np.uint8)


class CascadeGenerator:
  """Base model, then the super-resolution upsampler, with the same conditions."""

  def __init__(self, base: Generator, upsampler: Generator):
    if not upsampler.low_res:
      raise SynthMedError("the second stage of a cascade must be a super-resolution generator.")
    self.base, self.upsampler = base, upsampler
    self.image_shape = upsampler.image_shape
    self.cond_spec = base.cond_spec

  def generate(self, conditions: Mapping[str, np.ndarray], n: int | None = None, seed: int = 0,
               start_index: int = 0, progress: bool = False, **kw: Any) -> np.ndarray:
    low = self.base.generate(conditions, n, seed, start_index, progress=progress, **kw)
    # The upsampler's noise is seeded independently of the base model's.
    return self.upsampler.generate(conditions, len(low), seed + 1_000_003, start_index,
                                   low_res=low, progress=progress, **kw)
