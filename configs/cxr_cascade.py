"""Paper 002 end to end on the procedural chest X-ray world: 5 findings, multi-label.

    python launch/main.py --config=configs/cxr_cascade.py --workdir=/tmp/cxr_cascade

As in 002, the generator is conditioned on the findings only (label-only
conditioning) and trained on the ID images, the uncertain-labelled ones
included; no OOD image is seen. Stages: base diffusion (16 px on CPU), upsampler
(16 -> 32 px), generation (label prevalence and finding co-occurrence of the
training data), classifiers (002 E.2 chest baselines: real data, RandAugment,
RandAugment + ImageNet-style augmentation, focal loss, the synthetic mix and
synthetic only; 5 seeds), evaluation (mean AUC and per-finding AUC, ID and
OOD; gap = best - worst sex on mean AUC) and report.html.
Arguments: smoke, full; chexpert / chestxray14 / mimic_cxr / csv run it on a local copy of that data set
(with --config.data.manual_dir=..., or --config.data.csv=... for csv; docs/data.md "Real data sets").
"""
from configs import common, cxr_classifier, cxr_diffusion, derm_cascade


def get_config(arg=None):
  words = common.parse_arg(arg, ("smoke", "full") + common.sources_of("chest"))
  classifier, base, up = common.stage_configs(cxr_classifier, cxr_diffusion, words)
  methods = {
      "real": common.method(),
      "randaugment": common.method(augment="randaugment"),
      "randaugment_imagenet": common.method(augment="randaugment_imagenet"),
      "focal": common.method(loss="focal"),
      "pretrained": common.method(pretrained=True),  # runs only with --config.pretrained_npz
      "synth_label": common.method(synthetic="label", alpha=0.5),
      "synthetic_only": common.method(synthetic="label", alpha=0.0),
      # The label-only store has no property, so its one control is real images of the same findings.
      "control_label_prior": common.controls(common.method(synthetic="label", alpha=0.5))["control_label_prior"],
      **common.learnt_weight_methods({"synth_label": "label"}, alpha=0.5),
  }
  config = common.study_base("chest", "sex", base, up, classifier, methods, modes=("label",))
  source = common.real_source(words, "chest")
  if source:
    common.use_real_data(config, source)
  if "smoke" in words:
    common.study_smoke_sizes(config, base_size=8, size=16)
  elif "full" not in words:
    derm_cascade.cpu_scale(config)  # the skin study's CPU cascade
  return common.finalize_study(config, words)
