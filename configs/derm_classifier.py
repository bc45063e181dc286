"""BiT-ResNet on the procedural skin world (27 conditions, soft labels, sex/age/tone).

Arguments (comma list): smoke (tiny, for tests), full (002 Table E1 for
accelerators), and less / more / most / unskewed (the sex skew of Table A2).
  python launch/main.py --config=configs/derm_classifier.py --workdir=/tmp/run1
"""
from configs import common


def get_config(arg=None):
  words = common.parse_arg(arg, ("smoke", "full") + common.SKEW_ARGS)
  config = common.classifier_base("skin", image_size=64)
  config.data.train_size = 6000  # ID pool before the skew cap
  config.data.val_size = 500
  config.data.test_size = 1000
  config.data.ood_size = 1000
  # CPU scale: R26 layout (2,2,2,2) at a quarter of BiT's width.
  config.model = common.model_config(depth=50, width=0.25, block_units=(2, 2, 2, 2))
  config.train = common.train_config(steps=1000, batch_size=64, optimizer="momentum", lr=0.03,
                                     schedule="cosine", weight_decay=1e-4, warmup_steps=100)
  config.train.eval_every = 500
  config.train.checkpoint_every = 250
  if "full" in words:  # 002 Table E1, dermatology
    config.data.image_size = 256  # our choice of the classifier input size
    config.data.train_size = 20000
    config.model = common.model_config(depth=101, width=3.0)
    config.train = common.train_config(steps=10_000, batch_size=96, optimizer="momentum", lr=0.01,
                                       schedule="cosine", weight_decay=1e-4, warmup_steps=500)
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.eval.bootstrap = 1000
  return common.finalize(config, words)
