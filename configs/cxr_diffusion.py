"""Conditional diffusion on the procedural chest X-ray world (label-only, as 002 uses for CXR).

Unlabelled data are the ID images whose labels are uncertain (no OOD images).
Arguments: smoke, full (Table E1: base 64 px ch 192, 3 res blocks, mult
(1,2,3,4), lr 1.5e-5, batch 128; `upsampler` 64->224 px ch 128, mult
(1,1,2,2,4,4), lr 1e-4, batch 32), upsampler, label_property (adds sex),
less / more / most / unskewed.
"""
from configs import common


def get_config(arg=None):
  words = common.parse_arg(arg, common.DIFFUSION_ARGS)
  up = "upsampler" in words
  config = common.diffusion_base("chest", image_size=32, upsampler=up)
  if "full" in words:
    common.diffusion_full(config, base_size=64, up_size=224, ch=192, res=3, mult=(1, 2, 3, 4), lr=1.5e-5,
                          batch=128)
  return common.finalize_diffusion(config, words, "sex")
