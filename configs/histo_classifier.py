"""BiT-ResNet on the procedural tissue world (tumour vs normal, 5 hospitals, WILDS split).

Arguments: smoke, full (002 Table E1: R152x1, Adam 1e-4, 200K steps), less / more
/ most (hospitals 3 and 4 capped, hospital 0 fixed).
"""
from configs import common


def get_config(arg=None):
  words = common.parse_arg(arg, ("smoke", "full") + common.SKEW_ARGS)
  config = common.classifier_base("tissue", image_size=32)
  config.data.skew.setting = "less"
  config.data.augment = "none"  # 002's histopathology baseline; 'standard' = colour augmentation
  config.model = common.model_config(depth=50, width=0.25, block_units=(1, 1, 1, 1))
  config.train = common.train_config(steps=600, batch_size=64, optimizer="adam", lr=1e-3,
                                     schedule="constant")
  if "full" in words:  # 002 Table E1, histopathology
    config.data.image_size = 96
    config.data.train_size = 100000
    config.model = common.model_config(depth=152, width=1.0)
    config.train = common.train_config(steps=200_000, batch_size=32, optimizer="adam", lr=1e-4,
                                       schedule="constant")
    config.train.checkpoint_every = 5000
  return common.finalize(config, words)
