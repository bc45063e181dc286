"""Conditional diffusion on the procedural skin world: the 64 px base model or the upsampler.

Arguments (comma list):
  smoke           tiny, runs in seconds (tests)
  full            002 Table E1: base 64 px (ch 192, 3 res blocks, mult (1,2,3,4),
                  lr 1.5e-4, batch 128) or, with `upsampler`, 64->256 px
                  (ch 128, 2 res blocks, mult (1,1,2,2,4,4), lr 1e-4, batch 32);
                  head channels 64, attention at downsample factors 2, 4, 8
  upsampler       the cascade's super-resolution model instead of the base model
  label_property  condition on the label and sex (default: the label only)
  less / more / most / unskewed   the sex skew of the labelled data (Table A2)
Default: a CPU-sized 32 px base model (or 16->32 upsampler).
  python launch/main.py --config=configs/derm_diffusion.py --workdir=/tmp/derm_diffusion
"""
from configs import common


def get_config(arg=None):
  words = common.parse_arg(arg, common.DIFFUSION_ARGS)
  up = "upsampler" in words
  config = common.diffusion_base("skin", image_size=32, upsampler=up)
  config.data.train_size = 6000
  if "full" in words:
    common.diffusion_full(config, base_size=64, up_size=256, ch=192, res=3, mult=(1, 2, 3, 4), lr=1.5e-4,
                          batch=128)
  return common.finalize_diffusion(config, words, "sex")
