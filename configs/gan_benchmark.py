"""Paper 001's train-on-synthetic / test-on-real benchmark (DuMont Schütte et al.) on the procedural chest
world: how well a classifier trained on a synthetic copy of the data does on real test images, along
the number of label combinations, the training images per combination and the resolution.

    python launch/main.py --config=configs/gan_benchmark.py --workdir=/tmp/gan_benchmark

Per setting (one axis varied at a time from the base setting): 4 seeds of the chest classifier on the
real training fold; the generator (cpD-GAN by default, `prog_gan`, or `diffusion`: the chest study's
base diffusion model, so GAN and diffusion meet on the same axes) on the same fold, with FID early
stopping on the seed-0 real classifier's features; synthetic train / validation / test folds with the
real folds' labels; 4 seeds of the classifier on the synthetic training fold. The evaluate stage
reports AUC_real − AUC_syn (mean AUROC over the findings on the real test fold, paired over seeds, 95 %
CI and t-test), Δ_syn, FID and the nearest real neighbours of synthetic images (001's Fig. 4).

Arguments (comma list):
  smoke                         tiny (tests): two settings, 2 seeds
  full                          001's GAN training (batch 256, lr 0.005, FID on 10k images every 400K
                                images, at least 7M images) and classifier (the chest study's :full); axes
                                20/10/5/2 combinations, 5950/3000/1000/200 images per combination,
                                32 to 512 px, on a local data set (001 uses CheXpert)
  cpd_gan / prog_gan / diffusion  the generator
  chexpert / mimic_cxr / chestxray14 / csv   a local data set (--config.data.manual_dir=...)
Expected at the CPU default (commit 2979024, 2-core AMD EPYC, 16.6 min for 6 settings): at the base
setting (4 combinations x 200 images, 32 px) AUC_real 0.830, AUC_syn 0.731, real − syn +0.100
[+0.065, +0.133]; the gap is 0.29-0.31 at 8 and 2 combinations, flat (0.090-0.100) from 400 to 100
images per combination, and not detectable at 16 px (README, "Paper 001's benchmark").
The axes are config keys too: --config.axes.label_combinations='(8, 4, 2)', --config.base.image_size=...
"""
from configs import common, cxr_classifier, cxr_diffusion

BASE = {"label_combinations": 4, "per_combination": 200, "image_size": 32}
AXES = {"label_combinations": (8, 4, 2), "per_combination": (400, 200, 100), "image_size": (16, 32)}
FULL_BASE = {"label_combinations": 10, "per_combination": 3000, "image_size": 128}
FULL_AXES = {"label_combinations": (20, 10, 5, 2), "per_combination": (5950, 3000, 1000, 200),
             "image_size": (32, 64, 128, 256, 512)}
GENERATORS = ("cpd_gan", "prog_gan", "diffusion")


def get_config(arg=None):
  words = common.parse_arg(arg, ("smoke", "full") + GENERATORS + common.sources_of("chest"))
  source = common.real_source(words, "chest")
  generator = next((g for g in GENERATORS if g in words), "cpd_gan")
  config = common.ConfigDict()
  config.experiment = "tstr"
  config.seed = 0
  config.distributed = False
  config.stages = "real,generator,synthesize,synthetic,evaluate,report"
  config.generator = generator
  config.seeds = 4  # 001: at least 4 repeats
  config.bootstrap = 1000
  config.setting_names = ""  # '' = every setting; or a comma list of setting names (m4_n200_px32, ...)
  config.data = common.data_config("chest", BASE["image_size"])
  config.data.skew.setting = "none"
  config.data.train_size = 12_000  # a pool from which each setting keeps its combinations and images
  config.data.val_size, config.data.test_size = 500, 1000
  config.base = common.ConfigDict(dict(FULL_BASE if "full" in words else BASE))
  config.axes = common.ConfigDict(dict(FULL_AXES if "full" in words else AXES))
  size = "full" if "full" in words else ""
  config.classifier = cxr_classifier.get_config(size)
  config.gan = common.gan_base("chest", BASE["image_size"], "prog_gan" if generator == "prog_gan" else "cpd_gan")
  config.diffusion = cxr_diffusion.get_config(size)
  if "full" in words:
    common.gan_full(config.gan)
  else:
    c = config.classifier  # the chest study's CPU classifier: seeds agree within about 0.01 mean AUROC
    c.model.width = 0.125
    c.train.steps, c.train.batch_size = 300, 64
    c.train.optimizer.lr, c.train.optimizer.warmup_steps, c.train.optimizer.grad_clip = 3e-3, 30, 1.0
    c.train.checkpoint_every = 300
    c.eval.bootstrap = 0
    g = config.gan  # about 4.7 steps/s at 32 px on 2 cores
    g.train.steps = 600
    g.fid.every_images, g.fid.images, g.fid.min_images = 12_800, 500, 25_600
    g.gan.phase_images = 6_400
    d = config.diffusion
    d.train.steps, d.train.sample_every = 1500, 0
    d.sampler.steps = 20
  config.mesh = common.mesh_config()
  config.cpu_devices = common.CPU_DEVICES
  if source:
    common.use_real_data(config, source)
  if "smoke" in words:
    config.seeds = 2
    config.bootstrap = 50
    config.cpu_devices = common.SMOKE_CPU_DEVICES
    config.data.train_size, config.data.val_size, config.data.test_size, config.data.ood_size = 600, 60, 120, 60
    config.base = common.ConfigDict({"label_combinations": 2, "per_combination": 40, "image_size": 16})
    config.axes = common.ConfigDict({"label_combinations": (3, 2), "per_combination": (40,), "image_size": (16,)})
    c = config.classifier
    c.model.width, c.model.block_units = 0.0625, (1, 1, 1, 1)
    c.train.steps, c.train.batch_size, c.eval.batch_size = 6, 16, 64
    common.gan_smoke(config.gan)
    config.diffusion = cxr_diffusion.get_config("smoke")
    config.diffusion.sampler.steps = 4
  config.lock()
  return config
