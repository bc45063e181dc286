"""Paper 002's method end to end on your own data (docs/data.md "Use your own data").

    python launch/main.py --config=configs/custom_cascade.py:attribute=tone --workdir=/tmp/mine \
        --config.data.csv=/data/mine/metadata.csv --config.data.columns.label=diagnosis \
        --config.data.columns.attributes=tone,sex --config.data.columns.domain=site \
        --config.data.ood_domains="('site_c',)" --config.data.columns.patient=patient_id

Arguments (comma list):
  attribute=<column>  the sensitive attribute to sample fairly over and to report the gap on; it must be
                      one of data.columns.attributes (it sets the generator's property conditioning,
                      which is fixed when the config is built, hence an argument, not an override)
  grey                greyscale images (chest-style augmentation; default RGB, dermatology-style)
  nocascade           one diffusion model at the classifier's size instead of base + upsampler
  smoke / full        tiny (tests) / 002 Table E1 sizes (accelerators)
Methods: real data only, RandAugment, oversampling, focal loss, label- and label+property-
conditioned synthetic mixes (alpha 0.5, w2 on the 4 dominant classes for single-label data),
synthetic only; 5 seeds; tuning of the learning rate on the real baseline's ID validation split.
"""
from configs import common, cxr_classifier, cxr_diffusion, derm_cascade, derm_classifier, derm_diffusion


def get_config(arg=None):
  parts = [w.strip() for w in (arg or "").split(",") if w.strip()]
  attribute = next((w.split("=", 1)[1] for w in parts if w.startswith("attribute=")), "")
  if not attribute:
    raise ValueError("name the sensitive attribute column: --config=configs/custom_cascade.py:attribute=<column>")
  words = common.parse_arg(",".join(w for w in parts if not w.startswith("attribute=")),
                           ("smoke", "full", "grey", "nocascade"))
  grey = "grey" in words
  cls_mod, diff_mod = (cxr_classifier, cxr_diffusion) if grey else (derm_classifier, derm_diffusion)
  cascade = "nocascade" not in words
  classifier, base, up = common.stage_configs(cls_mod, diff_mod, words - {"grey", "nocascade"}, upsampler=cascade)
  methods = {
      "real": common.method(),
      "randaugment": common.method(augment="randaugment"),
      "oversample": common.method(oversample=True),
      "focal": common.method(loss="focal"),
      "synth_label": common.method(synthetic="label", alpha=0.5, filter_dominant=4),
      "synth_label_property": common.method(synthetic="label_property", alpha=0.5, filter_dominant=4),
      "synthetic_only": common.method(synthetic="label_property", alpha=0.0),
  }
  config = common.study_base("chest" if grey else "skin", attribute, base, up if cascade else None, classifier,
                             methods)
  common.use_real_data(config, "csv")
  config.tune.metric = "auto"  # top1 / mean_auc / accuracy, whichever the CSV's label kind gives
  config.data.channels = 1 if grey else 3
  config.data.label_policy = "mask_uncertain"
  config.data.skew.attribute = attribute
  if "smoke" in words:
    common.study_smoke_sizes(config, base_size=8 if cascade else 16, size=16)
  elif "full" not in words:
    if cascade:
      derm_cascade.cpu_scale(config)  # the skin study's CPU cascade
    else:
      config.data.image_size = config.classifier.data.image_size = config.base.data.image_size = 32
  return common.finalize_study(config, words)
