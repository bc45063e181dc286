"""Paper 002 end to end on the procedural skin world: cascade generator, fair sampling, classifiers.

    python launch/main.py --config=configs/derm_cascade.py --workdir=/tmp/derm_cascade

Stages (each resumable, in its own folder): base diffusion (16 px on CPU),
upsampler (16 -> 32 px), fair generation (label-only and label + property),
classifiers (5 seeds each of: real data, the oversampling and focal-loss
baselines, the two synthetic mixes, synthetic only, and the two controls that
put real images in place of the label + property store's synthetic ones, and the
label + property mix restricted to the images the real-data classifier and a probe
confirm), evaluation (ID, OOD1, OOD2, with paired differences to `real`),
analyses (002 App. F-G, memorisation, fairness metrics) and report.html.

Arguments (comma list):
  smoke                 tiny, runs in about two minutes (tests)
  full                  002 Table E1 sizes (64 px base, 64 -> 256 upsampler, R101x3); accelerators
  age / tone            the attribute axis: age buckets or skin tone instead of sex
  baselines             adds the rest of 002's E.2 baselines (RandAugment, ImageNet-style augmentation,
                        both, pretrained) and w1 at equality level 0.5 (synth_label_property_w1)
  sweep                 instead of the baselines: the equality level l in {0, 0.5, 1} with and
                        without w2 (002 G.3.5), and, our addition, alpha in {0.25, 0.5, 0.75}
  less / more / most / unskewed   the skew of that attribute (Table A2; default: more)
  scin / fitzpatrick17k / ddi / ham10000 / csv   a local copy of that data set instead of the procedural
                        world (--config.data.manual_dir=..., or --config.data.csv=...; docs/data.md "Real data
                        sets"); Fitzpatrick17k and DDI have no sex, so they use tone
Defaults we chose where 002 is silent: α = 0.5 for the synthetic mixes, w2 on
the 4 dominant classes of the training data (no w1), 500 images per mode on CPU
(2,000 in `full`).
Add --config.pretrained_npz=/path/BiT-M-R50x1.npz for the pretrained baseline.
"""
from configs import common, derm_classifier, derm_diffusion


def get_config(arg=None):
  words = common.parse_arg(arg, common.STUDY_ARGS + ("sweep", "baselines"))
  source = common.real_source(words, "skin")
  axis = "age" if "age" in words else "tone" if "tone" in words or source in ("fitzpatrick17k", "ddi") else "sex"
  attribute, minority = common.SKIN_AXES[axis]
  classifier, base, up = common.stage_configs(derm_classifier, derm_diffusion, words)
  mix = common.method(synthetic="label_property", alpha=0.5, filter_dominant=4)
  methods = {
      "real": common.method(),
      "oversample": common.method(oversample=True),
      "focal": common.method(loss="focal"),
      "synth_label": common.method(synthetic="label", alpha=0.5, filter_dominant=4),
      "synth_label_property": mix,
      # the same mix with only the images the real-data classifier and a probe confirm (our addition)
      "synth_label_property_filtered": common.method(synthetic="label_property", alpha=0.5, filter_dominant=4,
                                                     quality_filter=True),
      "synthetic_only": common.method(synthetic="label_property", alpha=0.0, filter_dominant=0),
      **common.controls(mix),
      **common.learnt_weight_methods({"synth_label": "label", "synth_label_property": "label_property"},
                                     alpha=0.5, filter_dominant=4),
  }
  if "baselines" in words:  # the rest of 002's E.2 list, and w1 at equality level 0.5 (G.3.5)
    methods.update({
        "randaugment": common.method(augment="randaugment"),
        "imagenet_aug": common.method(augment="imagenet"),
        "randaugment_imagenet": common.method(augment="randaugment_imagenet"),
        "pretrained": common.method(pretrained=True),  # runs only with --config.pretrained_npz
        "synth_label_property_w1": common.method(synthetic="label_property", alpha=0.5, equality_level=0.5,
                                                 filter_dominant=0),
    })
  if "sweep" in words:
    methods = {"real": common.method()}
    for level in (0.0, 0.5, 1.0):
      for k in (0, 4):
        methods[f"l{str(level).replace('.', 'p')}_{'w2' if k else 'no_w2'}"] = common.method(
            synthetic="label_property", alpha=0.5, equality_level=level, filter_dominant=k)
    for alpha in (0.25, 0.75):
      methods[f"alpha{str(alpha).replace('.', 'p')}_w2"] = common.method(synthetic="label_property", alpha=alpha, filter_dominant=4)
  config = common.study_base("skin", attribute, base, up, classifier, methods, minority_values=minority)
  if "sweep" in words:
    config.output_name = "sweep"  # same workdir: reuses the generator, keeps results.json
  common.apply_skew_arg(config, words)
  if source:
    common.use_real_data(config, source)
  if "smoke" in words:
    common.study_smoke_sizes(config, base_size=8, size=16)
  elif "full" not in words:
    cpu_scale(config)
    # The learning-rate grid is centred on the measured winner: tuned on 2 seeds from 0.01 / 0.03 / 0.09
    # and widened twice, lr 0.27 won (validation top-3 0.789; 0.09: 0.743, 0.81: 0.771).
    config.classifier.train.optimizer.lr = 0.27
    config.tune.grid = "train.optimizer.lr=0.09|0.27|0.81"
  return common.finalize_study(config, words)


def cpu_scale(config) -> None:
  """The default cascade for a 2-core CPU (README results): a 16 px base, a 16 -> 32 px upsampler and a
  32 px classifier. `cxr_cascade` and `custom_cascade` use it too.

  Measured with bench/generator_fidelity.py on the skin world (500 images per point, probe agreement
  with the requested label / each requested sex; real 16 px images: label 0.587, sex 0.994; bench/README):
  the label agreement of label + sex samples flattens near 0.37-0.38 (1,000 steps 0.28, 3,000 steps
  0.37, 6,000 steps 0.38; width 64 at 3,000 steps 0.37 for 2.5x the time per step), so the base trains
  6,000 steps at width 32 and the generate stage picks w on the validation probe.
  Classifiers: the tune stage chooses the learning rate, then doubles the step count from 300 while
  the real baseline's validation score still gains (common.converged_classifiers)."""
  config.classifier.data.image_size = 32
  config.base.data.image_size = 16
  config.base.model.channel_mult = (1, 2)
  config.base.model.attention_resolutions = (2,)
  config.base.train.steps = 6000
  config.base.train.checkpoint_every = 1000
  config.base.diffusion.min_snr_gamma = 5.0
  config.base.train.sample_every = 0
  config.base.sampler.steps = 25
  config.upsampler.data.image_size = 32
  config.upsampler.diffusion.low_res.size = 16
  config.upsampler.model.model_channels = 16
  config.upsampler.model.channel_mult = (1, 2)
  config.upsampler.train.steps = 300
  config.upsampler.train.sample_every = 0
  # 4 steps from t = 0.2 T (SDEdit start): the longer the upsampler's chain, the more of its speckle
  # reads as the skin world's male-only hair. Measured on the same 400 base samples (w = 4), requested
  # female rendered female: start 0.5 x 5 steps 66 %, 0.3 x 5 88 %, 0.2 x 4 93 % (the base: 91 %);
  # label agreement 0.22-0.25 throughout.
  config.upsampler.sampler.steps = 4
  config.upsampler.sampler.start = 0.2
  config.generate.num_images = 500
  config.generate.guidance_grid = (1.0, 2.0, 4.0, 7.0)
  config.classifier.model.width = 0.125
  config.classifier.train.optimizer.warmup_steps = 30
  common.converged_classifiers(config, steps=300)
