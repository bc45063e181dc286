"""BiT-ResNet on the procedural chest X-ray world (5 findings, multi-label, sex/age).

Arguments: smoke, full (002 Table E1), less / more / most (skew against females).
"""
from configs import common


def get_config(arg=None):
  words = common.parse_arg(arg, ("smoke", "full") + common.SKEW_ARGS)
  config = common.classifier_base("chest", image_size=64)
  config.data.skew.setting = "none"  # 002 does not skew chest X-rays
  config.model = common.model_config(depth=50, width=0.25, block_units=(2, 2, 2, 2))
  config.train = common.train_config(steps=1000, batch_size=64, optimizer="adam", lr=1e-3,
                                     schedule="cosine", weight_decay=1e-5, warmup_steps=50)
  if "full" in words:  # 002 Table E1, chest X-ray
    config.data.image_size = 224
    config.data.train_size = 50000
    config.model = common.model_config(depth=152, width=2.0)
    config.train = common.train_config(steps=50_000, batch_size=64, optimizer="adam", lr=1e-5,
                                       schedule="cosine", weight_decay=1e-5)
    config.train.checkpoint_every = 2000
  return common.finalize(config, words)
