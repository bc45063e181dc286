"""Paper 002 end to end on the procedural tissue world (hospital shift), no cascade.

    python launch/main.py --config=configs/histo_study.py --workdir=/tmp/histo_study

Stages: base diffusion at the classifier's size (32 px on CPU; 96 px with
`full`, 002 §3.2.1 needs no upsampler), fair generation uniform over the 3 ID
hospitals (label-only and label + hospital), classifiers (5 seeds each of: no
augmentation, colour augmentation, the two synthetic mixes, synthetic only and
the two controls of the label + hospital mix), evaluation (ID hospitals; OOD
hospitals 1 and 2; gap = best - worst ID hospital accuracy; paired differences
to no_aug) and report.html.
Arguments: smoke, full, baselines (adds the synthetic mixes with colour
augmentation, 002 E.2), less / more / most / unskewed (the caps on hospitals 3 and 4).
"""
from configs import common, histo_classifier, histo_diffusion


def get_config(arg=None):
  words = common.parse_arg(arg, ("smoke", "full", "baselines") + common.SKEW_ARGS)
  classifier, base, _ = common.stage_configs(histo_classifier, histo_diffusion, words, upsampler=False,
                                             base_words=("label_property",))
  mix = common.method(augment="none", synthetic="label_property", alpha=0.5)
  methods = {
      "no_aug": common.method(augment="none"),
      "colour_aug": common.method(augment="standard"),
      "synth_label": common.method(augment="none", synthetic="label", alpha=0.5),
      "synth_label_property": mix,
      "synth_label_property_filtered": common.method(augment="none", synthetic="label_property", alpha=0.5,
                                                     quality_filter=True),
      "synthetic_only": common.method(augment="none", synthetic="label_property", alpha=0.0),
      **common.controls(mix),
      **common.learnt_weight_methods({"synth_label": "label", "synth_label_property": "label_property"},
                                     augment="none", alpha=0.5),
  }
  if "baselines" in words:  # the synthetic mixes with colour augmentation too
    methods["synth_label_colour"] = common.method(augment="standard", synthetic="label", alpha=0.5)
    methods["synth_label_property_colour"] = common.method(augment="standard", synthetic="label_property",
                                                           alpha=0.5)
  config = common.study_base("tissue", "hospital", base, None, classifier, methods)
  common.apply_skew_arg(config, words)
  if "smoke" in words:
    common.study_smoke_sizes(config, base_size=16, size=16)
  elif "full" not in words:  # a 2-core CPU: the 32 px base, w chosen on the validation probe
    config.base.train.steps = 3000
    config.base.train.checkpoint_every = 1000
    config.base.train.sample_every = 0
    config.base.diffusion.min_snr_gamma = 5.0
    config.base.sampler.steps = 25
    config.generate.guidance_grid = (1.0, 2.0, 4.0, 7.0)
    common.converged_classifiers(config, steps=300)
  return common.finalize_study(config, words)
