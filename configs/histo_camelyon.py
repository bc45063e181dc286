"""Paper 002's histopathology study on a local copy of CAMELYON17-WILDS (hospital shift), no cascade.

    python launch/main.py --config=configs/histo_camelyon.py:wilds \
        --config.data.manual_dir=/data/wilds --workdir=/tmp/histo_camelyon

`manual_dir` holds camelyon17_v1.0/ (metadata.csv + patches/) and, optionally,
camelyon17_unlabeled_v1.0/. The WILDS split: train centres 0, 3, 4 (ID),
centre 1 (OOD val) and centre 2 (OOD test) as hospitals h1 and h2; 002's Table
A1 swaps the names of the last two. Everything else is configs/histo_study.py.
Arguments: wilds (the default, may be omitted), smoke, full, less / more / most / unskewed.
"""
from configs import common, histo_study


def get_config(arg=None):
  words = common.parse_arg(arg, ("wilds", "smoke", "full") + common.SKEW_ARGS)
  config = histo_study.get_config(",".join(sorted(words - {"wilds"})))
  with config.unlocked():
    common.use_real_data(config, "camelyon17")
    common.apply_skew_arg(config, words)  # a skew word caps hospitals 3 and 4 on the real data too
  return config
