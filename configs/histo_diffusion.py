"""Conditional diffusion on the procedural tissue world (hospital shift).

Unlabelled patches come from the 3 ID hospitals and keep their hospital id.
Arguments: smoke, full (Table E1: 96 px, ch 128, 2 res blocks, mult
(1,1,2,3,4), lr 1e-4, batch 64; no upsampler at 96 px), label_property
(label + hospital), less / more / most / unskewed (hospital 3/4 caps).
"""
from configs import common


def get_config(arg=None):
  words = common.parse_arg(arg, common.DIFFUSION_ARGS)
  if "upsampler" in words:
    raise ValueError("histopathology is generated at 96 px directly; it has no upsampler (002 §3.2.1).")
  config = common.diffusion_base("tissue", image_size=32, upsampler=False)
  if "full" in words:
    common.diffusion_full(config, base_size=96, up_size=0, ch=128, res=2, mult=(1, 1, 2, 3, 4), lr=1e-4,
                          batch=64)
  return common.finalize_diffusion(config, words, "hospital")
