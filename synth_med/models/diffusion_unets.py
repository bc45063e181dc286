"""Builds the diffusion UNets (base or cascade upsampler) from `config.model`."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from synth_med.errors import SynthMedError
from synth_med.models import superres_unet, unet
from synth_med.ops import Ops, check_precision, select_ops

MODELS = ("unet", "superres_unet")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_cfg: Any, channels: int, ops: Ops | None = None) -> Any:
  """unet.Model or superres_unet.Model from `config.model` (guided-diffusion names).

  `ops` defaults to `select_ops(jax.default_backend(), model.matmul_precision)`: the native
  kernels on CPUs, XLA (with cuDNN's attention on GPUs) elsewhere.
  """
  if model_cfg.name not in MODELS:
    raise SynthMedError(f"model.name={model_cfg.name!r}; choose one of {list(MODELS)}.")
  if model_cfg.dtype not in DTYPES:
    raise SynthMedError(f"model.dtype={model_cfg.dtype!r}; choose one of {list(DTYPES)}.")
  precision = str(model_cfg.get("matmul_precision", "float32"))
  check_precision(precision)
  ops = select_ops(jax.default_backend(), precision) if ops is None else ops
  cls = unet.Model if model_cfg.name == "unet" else superres_unet.Model
  return cls(out_channels=channels, model_channels=int(model_cfg.model_channels),
             channel_mult=tuple(model_cfg.channel_mult), num_res_blocks=int(model_cfg.num_res_blocks),
             attention_resolutions=tuple(model_cfg.attention_resolutions),
             num_head_channels=int(model_cfg.num_head_channels), dropout=float(model_cfg.dropout),
             use_scale_shift_norm=bool(model_cfg.use_scale_shift_norm),
             resblock_updown=bool(model_cfg.resblock_updown), dtype=DTYPES[model_cfg.dtype],
             ops=ops, num_heads=int(model_cfg.get("num_heads", 1)))
