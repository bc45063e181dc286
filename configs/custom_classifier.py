"""BiT-ResNet on your own data: one CSV naming images, labels, attributes, sites (docs/data.md "Use your own data").

    python launch/main.py --config=configs/custom_classifier.py --workdir=/tmp/mine \
        --config.data.csv=/data/mine/metadata.csv --config.data.columns.image=file \
        --config.data.columns.label=diagnosis --config.data.columns.attributes=sex,tone \
        --config.data.columns.patient=patient_id

Arguments (comma list): smoke (tiny), full (BiT R101x3 at 256 px, accelerators), grey
(greyscale images, chest-style augmentation; default RGB with the dermatology augmentation).
Every data.columns.* key is documented in synth_med/data/tables/csv_table.py.
"""
from configs import common, cxr_classifier, derm_classifier


def get_config(arg=None):
  words = common.parse_arg(arg, ("smoke", "full", "grey"))
  base = cxr_classifier if "grey" in words else derm_classifier
  config = base.get_config(",".join(sorted(words - {"grey"})))
  with config.unlocked():
    common.use_real_data(config, "csv")
    config.data.channels = 1 if "grey" in words else 3
    config.data.label_policy = "mask_uncertain"  # uncertain findings (label_format 'findings') masked; set 'drop_uncertain' to drop them
  return config
