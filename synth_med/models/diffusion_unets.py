"""Builds the diffusion UNets (base or cascade upsampler) from `config.model`."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from synth_med.errors import SynthMedError
from synth_med.models import superres_unet, unet

MODELS = ("unet", "superres_unet")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_cfg: Any, channels: int) -> Any:
  """unet.Model or superres_unet.Model from `config.model` (guided-diffusion names)."""
  if model_cfg.name not in MODELS:
    raise SynthMedError(f"model.name={model_cfg.name!r}; choose one of {list(MODELS)}.")
  if model_cfg.dtype not in DTYPES:
    raise SynthMedError(f"model.dtype={model_cfg.dtype!r}; choose one of {list(DTYPES)}.")
  precision = str(model_cfg.get("matmul_precision", "float32"))
  if precision not in unet.PRECISIONS:
    raise SynthMedError(f"model.matmul_precision={precision!r}; choose one of {list(unet.PRECISIONS)}.")
  cls = unet.Model if model_cfg.name == "unet" else superres_unet.Model
  return cls(out_channels=channels, model_channels=int(model_cfg.model_channels),
             channel_mult=tuple(model_cfg.channel_mult), num_res_blocks=int(model_cfg.num_res_blocks),
             attention_resolutions=tuple(model_cfg.attention_resolutions),
             num_head_channels=int(model_cfg.num_head_channels), dropout=float(model_cfg.dropout),
             use_scale_shift_norm=bool(model_cfg.use_scale_shift_norm),
             resblock_updown=bool(model_cfg.resblock_updown), dtype=DTYPES[model_cfg.dtype],
             matmul_precision=precision)
