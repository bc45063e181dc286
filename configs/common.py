"""Shared pieces of the experiment configs (big_vision style: plain functions)."""
from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from synth_med.data.tables import DATA_SOURCES
from synth_med.experiments.study import SHARED_DATA_KEYS


def parse_arg(arg: str | None, known: tuple[str, ...]) -> set[str]:
  """'smoke,less' -> {'smoke', 'less'}; an unknown word fails with the choices."""
  words = {w.strip() for w in (arg or "").split(",") if w.strip()}
  bad = sorted(words - set(known))
  if bad:
    raise ValueError(f"unknown config argument(s) {bad}; valid arguments: {sorted(known)}")
  return words


SKEW_ARGS = ("less", "more", "most", "unskewed")


def data_config(world: str, image_size: int) -> ConfigDict:
  """The procedural world and its splits (see synth_med/data/worlds)."""
  minority = {"skin": (1,), "chest": (0,), "tissue": (1, 2)}[world]
  skew_attr = {"skin": "sex", "chest": "sex", "tissue": "hospital"}[world]
  unlabelled = {"skin": ("id", "ood1", "ood2"), "chest": ("id",), "tissue": ("h0", "h3", "h4")}[world]
  id_domains = {"skin": ("id",), "chest": ("id",), "tissue": ("h0", "h3", "h4")}[world]
  ood_domains = {"skin": ("ood1", "ood2"), "chest": ("ood1",), "tissue": ("h1", "h2")}[world]
  return ConfigDict({
      "source": "world",
      "world": world,
      "seed": 0,
      "image_size": image_size,
      "num_classes": {"skin": 27, "chest": 5, "tissue": 2}[world],
      "id_domains": id_domains,
      "ood_domains": ood_domains,
      # Where the labelled training and validation images come from; () = id_domains. A study sets it per
      # method (method(site='external'): paper 000's two-site setting); the test splits do not change.
      "train_domains": (),
      # Paper 001's benchmark axes: keep the m most frequent label combinations (0 = all) and at most n
      # training images per combination (0 = all); see synth_med/data/label_combinations.py.
      "label_combinations": 0,
      "per_combination": 0,
      "unlabelled_domains": unlabelled,
      "train_size": 4000,
      "val_size": 500,
      "test_size": 1000,
      "ood_size": 1000,
      "unlabelled_size": 2000,
      # > 0: every example carries `report`, int32 token ids of this length (worlds that write reports: chest;
      # paper 003's joint image + report generation)
      "report_length": 0,
      "label_policy": "drop_uncertain",
      "skew": {
          "attribute": skew_attr,
          # Codes of the under-represented group(s): male for sex, hospitals 3
          # and 4 (codes 1, 2 of (h0, h3, h4)) for tissue.
          "minority_values": minority,
          "setting": "more",  # none | less | more | most (002 Table A2)
          "cap": -1,  # >= 0 overrides the setting with an absolute cap
      },
      # Per-domain label prevalence; () keeps the world's default. E.g.
      # --config.data.domain_prevalence.ood1='(0.5, 0.5)' for a 2-class skin world.
      "domain_prevalence": {d: () for d in id_domains + ood_domains},
      "augment": "standard",  # none | standard (002 App. E.1, per modality)
      # Real data (data.source != 'world'; see docs/data.md).
      "manual_dir": "",  # the data set's folder, as its owners distribute it
      "preprocessed_dir": "",  # where resized shards go ('' = ~/.cache/synth_med/preprocessed)
      "corrupt_images": "skip",  # skip (and count) | fail
      "equalize": False,  # histogram equalisation (paper 000, chest X-ray)
      "frontal_only": True,  # CheXpert / MIMIC-CXR: frontal views only
      "val_fraction": 0.1,  # patient-level slices where the data set has no such split
      "id_test_fraction": 0.1,
      "mimic_patients_csv": "",  # MIMIC-IV patients.csv(.gz) for sex and age
      "mimic_admissions_csv": "",  # MIMIC-IV admissions.csv(.gz) for race (paper 000)
      "chexpert_demographics_csv": "",  # CheXpert's demographics table (PATIENT, PRIMARY_RACE) as CSV
      "fitzpatrick_partition": "three",  # three | nine | label
      "use_unlabelled_set": True,  # CAMELYON17-WILDS: camelyon17_unlabeled_v1.0 when present
      "csv": "",  # data.source='csv': the CSV
      "channels": 3,
      "columns": {"image": "image", "label": "label", "label_format": "class", "findings": "",
                  "attributes": "", "buckets": "", "domain": "", "split": "", "patient": "", "labelled": "",
                  "report": ""},
  })


def real_source(words: set[str], modality: str) -> str | None:
  """The real data set named among the config words (at most one, of this modality)."""
  named = [w for w in words if w in DATA_SOURCES]
  if len(named) > 1:
    raise ValueError(f"name one data set, not {sorted(named)}")
  if named and DATA_SOURCES[named[0]].modality not in (None, modality):
    raise ValueError(f"{named[0]} is {DATA_SOURCES[named[0]].modality} data; this config is for {modality}")
  return named[0] if named else None


def use_real_data(config: ConfigDict, source: str) -> None:
  """Points `config.data` at a local real data set: every row (no size caps), no extra skew, its domains.
  Set data.manual_dir (or data.csv) on the command line."""
  src = DATA_SOURCES[source]
  d = config.data
  d.source = source
  d.id_domains, d.ood_domains, d.unlabelled_domains = src.id_domains, src.ood_domains, src.unlabelled_domains
  for k in ("train_size", "val_size", "test_size", "ood_size", "unlabelled_size"):
    d[k] = 0  # 0 = the whole split
  d.skew.setting = "none"


def apply_skew_arg(config: ConfigDict, words: set[str]) -> None:
  for w in ("less", "more", "most"):
    if w in words:
      config.data.skew.setting = w
  if "unskewed" in words:
    config.data.skew.setting = "none"


def mesh_config() -> ConfigDict:
  """Device mesh: axis name -> size; -1 takes the remaining devices."""
  return ConfigDict({"data": -1, "model": 1})


# On CPU, split the host into this many single-threaded XLA devices and shard the batch over them
# (synth_med/train/host_devices.py): 0 = one per core (a power of two, at most 8), 1 = one
# multi-threaded device. Ignored on accelerators and when XLA_FLAGS already sets a device count.
CPU_DEVICES = 0
# Smoke runs are compile-bound, and one device compiles each program once (measured: derm_cascade:smoke
# 163 s on one device, 186 s on two).
SMOKE_CPU_DEVICES = 1


def model_config(depth: int = 50, width: float = 1.0, block_units: tuple[int, ...] = ()) -> ConfigDict:
  """BiT-ResNet; block_units/fractional width give CPU-scale variants."""
  return ConfigDict({
      "name": "bit_resnet",
      "depth": depth,
      "width": width,
      "block_units": block_units,
      "root_pool": True,
      "pretrained_npz": "",  # a local BiT .npz; the head is re-initialised
  })


def train_config(steps: int, batch_size: int, optimizer: str, lr: float, schedule: str,
                 weight_decay: float = 0.0, warmup_steps: int = 0) -> ConfigDict:
  return ConfigDict({
      "steps": steps,
      "batch_size": batch_size,
      "optimizer": {"name": optimizer, "lr": lr, "schedule": schedule, "warmup_steps": warmup_steps,
                    "weight_decay": weight_decay, "grad_clip": 0.0},
      # a classifier with learnt example weights (reweight.method): the weighting network's optimizer
      "weighting_optimizer": {"name": "adam", "lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
                              "weight_decay": 0.0, "grad_clip": 0.0},
      "ema_decay": 0.0,
      "log_every": 50,
      "eval_every": 0,
      "checkpoint_every": 200,
      "keep_checkpoints": 2,
  })


def eval_config() -> ConfigDict:
  return ConfigDict({
      "batch_size": 256,
      "top_k": (1, 3),
      "min_group_size": 20,  # smaller subgroups are flagged and left out of gaps
      "bootstrap": 200,  # resamples for 95 % CIs of every group metric
      "beta_samples": 100_000,  # 002 App. F.2
      "seed": 0,
      "use_ema": False,
  })


def mix_config(world: str) -> ConfigDict:
  """Real + synthetic mixing and weighting (002 Eq. 3, 8, 9) and the oversampling baseline."""
  return ConfigDict({
      "synthetic_dir": "",  # a generation folder (shard-*.npz); needed when alpha < 1
      "alpha": 1.0,  # probability that a training example is real (1 = real only, 0 = synthetic only)
      "equality_level": 0.0,  # l of w1 = (p_f(a|y) / p_train(a|y))^l on real examples; 0 = off
      "filter_dominant": 0,  # w2: drop synthetic examples of the k most frequent classes; 0 = off
      # A replica store (paper 000): mix in only its first k copies of the training set; 0 = every row.
      "synthetic_copies": 0,
      # > 0: leave out the replica rows of every k-th training example (validation, paper 000's Table 2).
      "synthetic_holdout": 0,
      "attribute": {"skin": "sex", "chest": "sex", "tissue": "hospital"}[world],  # for w1 and oversampling
      "oversample": False,  # repeat rows so the attribute's values are equally frequent (E.2 baseline)
      # Controls that keep the synthetic store's rows but swap in real training images (docs/design.md, "Controls"):
      # '' (synthetic images) | real_images (same label and property) | label_prior (same label).
      "control": "",
  })


def reweight_config() -> ConfigDict:
  """Learnt weights of the synthetic examples (objectives/learnt_weights.py): paper 004's IDS
  (information-bottleneck re-weighting) or MW-Net, its re-weighting baseline. Needs mix.alpha < 1."""
  return ConfigDict({
      "method": "",  # '' (off) | ids | mwnet
      "input": "features",  # IDS's g_θ reads the classifier's features (held fixed) or the pooled 'image'
      "hidden": 64,  # g_θ's hidden units
      "temperature": 0.1,  # φ = softmax(−‖v − c‖² / temperature) on unit-length centred vectors
      "input_size": 8,  # the centroids' input space: images average-pooled to this many pixels a side
      "weighted_vib": True,  # our addition: each weight also scales its example's VIB (ids.weighted_vib_loss)
      "entropy": 0.1,  # λ of that term's weight entropy: g = sigmoid(−(VIB − mean) / λ) at its optimum
      "reweight_real": False,  # 004's option: the real examples take g_θ's weights too
      "virtual_lr": 1.0,  # MW-Net: the look-ahead step on the head
  })


def smoke(config: ConfigDict) -> None:
  """Shrinks any classifier config to run in well under a minute on a CPU."""
  config.cpu_devices = SMOKE_CPU_DEVICES
  config.data.image_size = 16
  config.data.train_size = 256
  config.data.val_size = 64
  config.data.test_size = 128
  config.data.ood_size = 128
  config.data.unlabelled_size = 64
  if config.data.skew.setting != "none":
    config.data.skew.setting = "less"  # keeps a few minority examples in 256
  config.model.depth = 50
  config.model.width = 0.125
  config.model.block_units = (1, 1, 1, 1)
  config.train.steps = 6
  config.train.batch_size = 16
  config.train.log_every = 2
  config.train.checkpoint_every = 3
  config.eval.batch_size = 64
  config.eval.bootstrap = 10
  config.eval.beta_samples = 1000
  config.eval.min_group_size = 5


def finalize(config: ConfigDict, words: set[str]) -> ConfigDict:
  """Applies the shared arguments (smoke, skew) and locks the config."""
  if "smoke" in words:
    smoke(config)
  apply_skew_arg(config, words)
  config.lock()
  return config


def classifier_base(world: str, image_size: int) -> ConfigDict:
  config = ConfigDict()
  config.experiment = "classifier"
  config.seed = 0
  config.distributed = False  # True: call jax.distributed.initialize() (multi-host)
  config.data = data_config(world, image_size)
  config.data.cache = True  # render the finite splits once into memory
  config.data.num_threads = 2
  config.loss = ConfigDict({"name": "ce", "focal_gamma": 2.0})
  config.mix = mix_config(world)
  config.reweight = reweight_config()
  config.eval = eval_config()
  config.mesh = mesh_config()
  config.cpu_devices = CPU_DEVICES
  # (regex over the train-state path, partition spec): first match wins,
  # otherwise replicated. E.g. (("head/kernel", (None, "model")),) shards the
  # classifier head over the 'model' axis.
  config.sharding_rules = ()
  return config


# --- diffusion (002 §3.1 step 1, App. E, Table E1) ---------------------------

def unet_config(model_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                attention_resolutions: tuple[int, ...] = (2, 4, 8), num_head_channels: int = 64,
                name: str = "unet") -> ConfigDict:
  """guided-diffusion hyper-parameter names; attention_resolutions are downsample factors."""
  return ConfigDict({
      "name": name,  # unet | superres_unet
      "model_channels": model_channels,
      "channel_mult": channel_mult,
      "num_res_blocks": num_res_blocks,
      "attention_resolutions": attention_resolutions,
      "num_head_channels": num_head_channels,  # channels per attention head; <= 0: num_heads heads
      "num_heads": 1,
      "dropout": 0.0,
      "use_scale_shift_norm": True,
      "resblock_updown": False,
      "dtype": "float32",  # float32 | bfloat16 (compute dtype; params stay float32)
      # float32 | bfloat16: the 3x3 convolutions' products on bfloat16-rounded operands, summed
      # in float32 (AMX tiles on recent Xeons, about 4x; see docs/design.md, "Precision").
      "matmul_precision": "float32",
  })


def stage_base(experiment: str, world: str, image_size: int) -> ConfigDict:
  """What every generator stage config starts with: the experiment, seed and the world's data, cached."""
  config = ConfigDict()
  config.experiment = experiment
  config.seed = 0
  config.distributed = False  # True: call jax.distributed.initialize() (multi-host)
  config.data = data_config(world, image_size)
  config.data.cache = True
  config.data.num_threads = 2
  return config


def diffusion_base(world: str, image_size: int, upsampler: bool) -> ConfigDict:
  """A CPU-sized diffusion stage on a procedural world; Table E1 sizes come with `full`."""
  config = stage_base("diffusion", world, image_size)
  config.data.unlabelled_size = 4000
  # CPU default: ~1M parameters at 32 px; attention only at 8 px (downsample factor 4).
  config.model = unet_config(32, (1, 2, 2), 1, (4,), 32, "superres_unet" if upsampler else "unet")
  if upsampler:
    config.model.attention_resolutions = ()
  config.diffusion = ConfigDict({
      # Choices 002 leaves open: cosine schedule (better than linear at 16-64 px).
      "schedule": "cosine",  # linear | cosine
      "num_steps": 1000,  # T (Table E1)
      "variance": "small",  # fixed variance (Table E1): posterior β̃_t ('small') or β_t ('large')
      # Which parts the condition vector has (each can be null on its own).
      "condition": {"label": True, "attributes": ()},
      "drop_prob": 0.1,  # per-part null probability for classifier-free guidance (paper 000: 0.1)
      # > 0: Min-SNR-γ loss weighting (Hang et al. 2023); 0: the plain ε-MSE of 002 Table E1.
      "min_snr_gamma": 0.0,
      # What the network predicts: 'eps' (the noise, 002 Table E1) or 'v' = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0
      # (Salimans & Ho 2022); the sampler turns either into ε.
      "prediction": "eps",
      # The upsampler's low-resolution input (002 App. E); ignored by the base model.
      "low_res": {"size": image_size // 2, "antialias_prob": 0.5, "noise_prob": 0.2, "noise_std": 4.0,
                  "blur_prob": 0.5, "blur_sigma_scale": 0.2, "blur_size": 7},
  })
  config.sampler = ConfigDict({
      # DDPM on a respaced chain: with briefly trained CPU models DDIM (eta=0) kept the initial
      # noise in our samples while respaced DDPM gave skin-like images (see docs/design.md).
      "name": "ddpm",  # ddpm | ddim
      "steps": 100,
      "eta": 0.0,
      "guidance": 1.0,  # w in eps = (1 + w) eps(c) - w eps(null); 0 = plain conditional
      "clip_denoised": True,
      # Upsampler only: < 1 runs the chain from t = start * T, starting at the upsampled low-res image
      # noised to that level (SDEdit), so few steps are spent where the fine detail is made.
      "start": 1.0,
      "batch_size": 64,
  })
  config.grid = ConfigDict({"max_rows": 8, "per_cell": 2, "seed": 0})
  config.generate = ConfigDict({"num_images": 0, "shard_size": 256, "seed": 0})
  config.train = diffusion_train(steps=2000, batch=32, lr=1e-3, warmup=100, ema=0.995, every=(1000, 100, 500))
  config.mesh = mesh_config()
  config.cpu_devices = CPU_DEVICES
  config.sharding_rules = ()
  return config


def gan_base(world: str, image_size: int, kind: str) -> ConfigDict:
  """A CPU-sized GAN stage (paper 001's cpD-GAN or prog-GAN) on a procedural world; 001's sizes come with
  `gan_full`. Adam with beta1 = 0, beta2 = 0.99 (prog-GAN's) for the generator and the critic, WGAN-GP."""
  config = stage_base("gan", world, image_size)
  # CPU default: 16 channels at the image size, doubling per halving up to 64 (about 4.7 steps/s at 32 px,
  # batch 64, on 2 cores); 001's 512 with `gan_full`.
  config.model = ConfigDict({"name": kind, "z_dim": 128 if kind == "cpd_gan" else 512, "base_channels": 16,
                             "max_channels": 64, "start_size": 8})
  config.gan = ConfigDict({"gp_weight": 10.0, "drift": 1e-3, "ac_weight": 1.0,
                           # prog-GAN: images per fade-in and per stabilisation phase (001: 1.4M at 32 px)
                           "phase_images": 40_000})
  config.fid = ConfigDict({"every_images": 16_000, "images": 1000, "min_images": 64_000, "patience": 2})
  config.train = train_config(steps=1500, batch_size=64, optimizer="adam", lr=2e-3, schedule="constant")
  config.train.optimizer.b1, config.train.optimizer.b2 = 0.0, 0.99
  config.train.critic_optimizer = copy_unlocked(config.train.optimizer)
  config.train.ema_decay = 0.999
  config.train.log_every, config.train.checkpoint_every = 100, 250
  config.mesh = mesh_config()
  config.cpu_devices = CPU_DEVICES
  config.sharding_rules = ()
  return config


def gan_full(config: ConfigDict) -> None:
  """Paper 001's GAN training: batch 256, lr 0.005, n_critic 1; FID on 10k images every 400K images,
  at least 7M images (z of 512 and 512 channels for prog-GAN)."""
  config.train.batch_size = 256
  config.train.optimizer.lr = config.train.critic_optimizer.lr = 0.005
  config.train.steps = 20_000_000 // 256  # an upper bound; FID early stopping ends training
  config.train.checkpoint_every = 2000
  config.model.max_channels = 512
  config.model.base_channels = 64
  config.fid.every_images, config.fid.images, config.fid.min_images = 400_000, 10_000, 7_000_000
  config.gan.phase_images = 1_400_000


def gan_smoke(config: ConfigDict) -> None:
  """A GAN stage that runs in seconds (tests): 16 px, a few steps, FID twice."""
  config.data.image_size = 16
  config.data.train_size, config.data.val_size, config.data.test_size, config.data.ood_size = 128, 32, 32, 32
  config.model.base_channels, config.model.max_channels, config.model.z_dim = 8, 16, 16
  config.train.steps, config.train.batch_size = 12, 16
  config.train.log_every, config.train.checkpoint_every = 4, 6
  config.gan.phase_images = 48
  config.fid.every_images, config.fid.images, config.fid.min_images = 96, 32, 0
  config.cpu_devices = SMOKE_CPU_DEVICES


def diffusion_train(steps: int, batch: int, lr: float, warmup: int, ema: float,
                    every: tuple[int, int, int]) -> ConfigDict:
  """Adam at a constant lr with warm-up, grad clip 1, EMA; every = (sample, log, checkpoint) steps."""
  train = train_config(steps=steps, batch_size=batch, optimizer="adam", lr=lr, schedule="constant",
                       warmup_steps=warmup)
  train.optimizer.grad_clip = 1.0
  train.ema_decay = ema
  train.sample_every, train.log_every, train.checkpoint_every = every
  return train


def diffusion_smoke(config: ConfigDict) -> None:
  """Shrinks a diffusion config to run in seconds."""
  config.cpu_devices = SMOKE_CPU_DEVICES
  upsampler = config.model.name == "superres_unet"
  config.data.image_size = 32 if upsampler else 16
  config.diffusion.low_res.size = 16
  config.data.train_size = 128
  config.data.val_size = 32
  config.data.unlabelled_size = 64
  if config.data.skew.setting != "none":
    config.data.skew.setting = "less"
  config.model.model_channels = 16
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = () if upsampler else (2,)
  config.model.num_head_channels = 16
  config.diffusion.num_steps = 100
  config.sampler.steps = 4
  config.sampler.batch_size = 16
  config.grid.max_rows = 2
  config.grid.per_cell = 1
  config.train.steps = 6
  config.train.batch_size = 8
  config.train.ema_decay = 0.5
  config.train.optimizer.warmup_steps = 0
  config.train.log_every = 2
  config.train.checkpoint_every = 3
  config.train.sample_every = 0


DIFFUSION_ARGS = ("smoke", "full", "upsampler", "label_property") + SKEW_ARGS


def finalize_diffusion(config: ConfigDict, words: set[str], property_attr: str) -> ConfigDict:
  """Shared arguments of the diffusion configs, then lock."""
  if "label_property" in words:
    config.diffusion.condition.attributes = (property_attr,)
  if "smoke" in words:
    diffusion_smoke(config)
  apply_skew_arg(config, words)
  config.lock()
  return config


def diffusion_full(config: ConfigDict, base_size: int, up_size: int, ch: int, res: int,
                   mult: tuple[int, ...], lr: float, batch: int) -> None:
  """002 Table E1: T=1000, fixed variance, head channels 64, attention at downsample factors
  2, 4, 8 (32/16/8 px at 64 px; the same factors at 96/224/256 px); the upsampler is
  ch 128, 2 res blocks, mult (1,1,2,2,4,4), lr 1e-4, batch 32 from 64 px."""
  upsampler = config.model.name == "superres_unet"
  config.diffusion.num_steps = 1000
  config.data.train_size = 20000
  config.data.unlabelled_size = 20000
  if upsampler:
    config.data.image_size = up_size
    config.diffusion.low_res.size = 64
    config.model = unet_config(128, (1, 1, 2, 2, 4, 4), 2, (2, 4, 8), 64, "superres_unet")
    lr, batch = 1e-4, 32
  else:
    config.data.image_size = base_size
    config.model = unet_config(ch, mult, res, (2, 4, 8), 64, "unet")
  config.model.dtype = "bfloat16"
  config.train = diffusion_train(steps=200_000, batch=batch, lr=lr, warmup=1000, ema=0.9999,
                                 every=(10_000, 200, 5000))
  config.sampler.steps = 250
  config.sampler.batch_size = 128


# --- the method end to end (002 §3.1; experiment 'study') ----------------------

# The attribute axes of the skin study: (skew/fair attribute, minority codes of Table A2).
SKIN_AXES = {"sex": ("sex", (1,)), "age": ("age_bucket", (4, 5, 6)), "tone": ("skin_tone", (3, 4, 5))}
STUDY_ARGS = ("smoke", "full", "age", "tone") + SKEW_ARGS + tuple(DATA_SOURCES)


def sources_of(modality: str) -> tuple[str, ...]:
  """The real data sets a config of this modality can name as an argument (the CSV included)."""
  return tuple(n for n, s in DATA_SOURCES.items() if s.modality in (None, modality))


def stage_configs(classifier_module, diffusion_module, words: set[str], upsampler: bool = True,
                  base_words: tuple[str, ...] = ()) -> tuple[ConfigDict, ConfigDict, ConfigDict | None]:
  """(classifier, base, upsampler) stage configs of a study, with its `smoke`/`full` words."""
  size_words = sorted(words & {"full", "smoke"})
  classifier = classifier_module.get_config(",".join(size_words))
  base = diffusion_module.get_config(",".join(size_words + list(base_words)))
  up = diffusion_module.get_config(",".join(size_words + ["upsampler"])) if upsampler else None
  if "full" in words:
    ids_full(classifier)
  return classifier, base, up


def ids_full(classifier: ConfigDict) -> None:
  """Paper 004's optimiser (its App. D.1: Adam β = (0.9, 0.999), weight decay 0.05, cosine decay) for the
  weighting network. The classifier keeps its own recipe (004 fine-tunes an MAE-pretrained ViT-S/B at batch
  1024 for 75 epochs; here the BiT of 002), so a learnt-weights mix differs from its fixed-weight mix only in
  the weights."""
  classifier.train.weighting_optimizer = ConfigDict({"name": "adam", "lr": 1e-3, "schedule": "cosine",
                                                     "warmup_steps": 0, "weight_decay": 0.05, "grad_clip": 0.0,
                                                     "b1": 0.9, "b2": 0.999})


def method(augment: str = "standard", loss: str = "ce", synthetic: str = "", alpha: float = 1.0,
           equality_level: float = 0.0, filter_dominant: int = 0, oversample: bool = False,
           pretrained: bool = False, control: str = "", quality_filter: bool = False, copies: int = 0,
           holdout: int = 0, site: str = "", baseline: str = "", reweight: str = "",
           also_against: tuple[str, ...] = ()) -> ConfigDict:
  """One classifier recipe of a study (a baseline, a synthetic mix, or a control of one: `control`
  swaps the synthetic images for real ones, see mix_config). `quality_filter` mixes in only the store's
  images whose requested label the real-data classifier, and whose requested property a probe on real
  images, confirm (experiments/synthetic_store.filter_store). `copies` > 0 mixes in the first k copies
  of a 'replica' store (paper 000's graded supplementation). `site='external'` trains on the real images
  of the study's first OOD domain instead of its ID domains (paper 000's two-site setting: MIMIC-CXR's real
  images with synthetic replicas of CheXpert's); the test splits are the other methods'. `baseline` names the
  method it is compared with ('' = the study's real-data baseline; a two-site mix: the external site's real
  data alone). `reweight` learns the synthetic examples' weights ('ids': paper 004's information bottleneck;
  'mwnet': its MW-Net baseline); `also_against` names methods on the same store that the evaluate stage also
  compares it with (`<method> vs <other>`), e.g. the fixed-weight mix with the same alpha and w2 (the learnt
  weights' own effect) and MW-Net."""
  return ConfigDict({"augment": augment, "loss": loss, "synthetic": synthetic, "alpha": alpha,
                     "equality_level": equality_level, "filter_dominant": filter_dominant,
                     "oversample": oversample, "pretrained": pretrained, "control": control,
                     "quality_filter": quality_filter, "copies": copies, "holdout": holdout, "site": site,
                     "baseline": baseline, "reweight": reweight,
                     "also_against": tuple(also_against)})


def controls(mix: ConfigDict) -> dict[str, ConfigDict]:
  """The controls of a synthetic mix: its store's rows, weights and alpha with real images in place of the
  synthetic ones. `control_real_images` takes a real image of the same label and property value;
  `control_label_prior` one of the same label only, i.e. the real data oversampled to the store's label
  distribution. A mix that does no better than these gains from its label (and property) mix, not its images."""
  out = {}
  for name in ("real_images", "label_prior"):
    c = copy_unlocked(mix)
    c.control = name
    out[f"control_{name}"] = c
  return out


def learnt_weight_methods(mixes: dict[str, str], **mix_kwargs: Any) -> dict[str, ConfigDict]:
  """Paper 004's methods next to a study's fixed-weight mixes ({mix name: its store}, all with `mix_kwargs`):
  `ids` (the label store) and `ids_property` (the label + property store) with IDS weights, and `mwnet`
  (MW-Net, 004's re-weighting baseline) on the richest store; each is also compared with its fixed-weight mix,
  and the IDS method on MW-Net's store with MW-Net (004's claim: IDS beats prior re-weighting)."""
  last_mix, last_store = list(mixes.items())[-1]
  out = {}
  for mix, store in mixes.items():
    name = "ids" if store == "label" else "ids_property"
    also = (mix, "mwnet") if store == last_store else (mix,)
    out[name] = method(synthetic=store, reweight="ids", also_against=also, **mix_kwargs)
  out["mwnet"] = method(synthetic=last_store, reweight="mwnet", also_against=(last_mix,), **mix_kwargs)
  return out


TUNE_METRIC = {"skin": "top3", "chest": "mean_auc", "tissue": "accuracy"}


# The classifier keys a study's methods set (common.method -> experiments.study.classifier_config).
METHOD_KEYS = (("data", "augment"), ("loss", "name"), ("model", "pretrained_npz"), ("mix", "alpha"),
               ("mix", "synthetic_dir"), ("mix", "equality_level"), ("mix", "filter_dominant"),
               ("mix", "oversample"), ("mix", "control"), ("mix", "synthetic_copies"), ("mix", "synthetic_holdout"),
               ("reweight", "method"))


def study_base(world: str, attribute: str, base: ConfigDict, upsampler: ConfigDict | None,
               classifier: ConfigDict, methods: dict[str, ConfigDict], modes: tuple[str, ...] = ("label", "label_property"),
               minority_values: tuple[int, ...] | None = None) -> ConfigDict:
  """A study: shared data + the stage configs (each a complete stage config) + methods.

  `attribute` is the sensitive property: fair sampling is uniform over it, w1 and oversampling use
  it, and with the 'label_property' mode the generator is conditioned on it. `minority_values`
  (codes) makes it the skewed attribute too (Table A2); None keeps the world's skew."""
  config = ConfigDict()
  config.experiment = "study"
  config.seed = 0
  config.distributed = False
  # The world and splits every stage shares; the rest of data (image size, augmentation, threads) is per stage.
  data = copy_unlocked(classifier.data)
  config.data = ConfigDict({k: data[k] for k in SHARED_DATA_KEYS})
  config.mesh = mesh_config()
  config.cpu_devices = CPU_DEVICES
  config.stages = "base,upsampler,generate,tune,classifiers,evaluate,analyze,report" if upsampler is not None else \
      "base,generate,tune,classifiers,evaluate,analyze,report"
  config.base = copy_unlocked(base)
  config.upsampler = copy_unlocked(upsampler) if upsampler is not None else None
  config.classifier = copy_unlocked(classifier)
  for part, key in METHOD_KEYS:  # each method sets these, so the study config has no such key
    del config.classifier[part][key]
  if minority_values is not None:
    config.data.skew.attribute = attribute
    config.data.skew.minority_values = minority_values
  config.classifier.mix.attribute = attribute
  if "label_property" in modes:
    for part in (config.base, config.upsampler) if upsampler is not None else (config.base,):
      part.diffusion.condition.attributes = (attribute,)
  config.generate = ConfigDict({
      "modes": modes,
      "attribute": attribute,  # fair sampling is uniform over this property
      # ... over these codes of it; () = every value seen in labelled or unlabelled training data.
      "property_values": (),
      # The base model's CFG scale w, chosen from this grid on a probe fitted to the real validation images
      # (synthetic_store.choose_guidance); () keeps base.sampler.guidance.
      "guidance_grid": (),
      "guidance_probe_images": 300,
      "num_images": 2000,  # per mode (our choice; 002 leaves it open)
      "replica_copies": 10,  # the 'replica' mode (paper 000): label-matched copies of each training example
      "seed": 0,
      "shard_size": 256,
  })
  lr = float(classifier.train.optimizer.lr)
  config.tune = ConfigDict({  # 002 App. E: tuned on the baseline's ID validation split, then fixed
      "grid": f"train.optimizer.lr={lr / 3:.4g}|{lr:.4g}|{lr * 3:.4g}",  # 'key=v|v;key=v'; '' = no tuning
      "method": next(iter(methods)),  # the first method is each study's real-data baseline
      "split": "val",
      "metric": TUNE_METRIC[world],
      "seeds": 1,
      # True: after the grid, the winner's train.steps doubles while its score gains >= plateau (tuning.py).
      "converge": False,
      "plateau": 0.01,
      "widen": 2,  # times a winner on the grid's edge adds the next value past it (and steps double)
  })
  config.methods = ConfigDict(methods)
  config.method_names = ""  # comma list to run a subset; "" = all
  # Paired comparisons with the first method (evaluation/paired.py): image x seed bootstrap replicates.
  config.comparisons = ConfigDict({"bootstrap": 1000})
  config.seeds = 5
  config.pretrained_npz = ""  # a local BiT .npz; runs the methods marked pretrained (else they are skipped)
  config.output_name = ""  # "" -> results.json / report.html; "x" -> results_x.json / report_x.html
  return config


def copy_unlocked(config: ConfigDict) -> ConfigDict:
  import copy
  c = copy.deepcopy(config)
  c.unlock()
  return c


def study_smoke(config: ConfigDict) -> None:
  """A study that runs end to end in a few minutes (tests): 2 seeds of the real-data baseline and of
  every synthetic method and its baseline (the other baselines differ only in augmentation or loss, tested apart),
  one-level UNets, a few steps each."""
  config.seeds = 2
  config.cpu_devices = SMOKE_CPU_DEVICES
  chosen = [m for m in config.methods if m in ("real", "no_aug") or config.methods[m].synthetic]
  baselines = {config.methods[m].get("baseline", "") for m in chosen}  # and what they are compared with
  config.method_names = ",".join(m for m in config.methods if m in chosen or m in baselines)
  config.generate.num_images = 32
  config.generate.shard_size = 16
  for part in ("base", "upsampler"):
    if config[part] is not None:
      config[part].model.channel_mult = (1,)
      config[part].model.attention_resolutions = ()
      config[part].sampler.steps = 3
      config[part].train.steps = 4
      config[part].train.checkpoint_every = 4
      config[part].grid.max_rows = 2
  if config.upsampler is not None:
    config.upsampler.sampler.start = 0.5
  config.classifier.train.steps = 4
  config.classifier.train.checkpoint_every = 4
  config.classifier.train.eval_every = 0
  config.tune.grid = "train.optimizer.lr=0.003|0.03"
  config.tune.widen = 0


def study_smoke_sizes(config: ConfigDict, base_size: int, size: int) -> None:
  """Smoke image sizes: the base model at base_size, the upsampler and classifier at size."""
  config.classifier.data.image_size = size
  config.base.data.image_size = base_size if config.upsampler is not None else size
  if config.upsampler is not None:
    config.upsampler.data.image_size = size
    config.upsampler.diffusion.low_res.size = base_size


def converged_classifiers(config: ConfigDict, steps: int) -> None:
  """CPU study classifiers that converge, and converge alike over seeds.

  Gradients are clipped at norm 1: without it, 1 of 5 real-data seeds of the skin study diverged at
  the tuned lr (ID top-3 0.586 +- 0.119 over seeds; with clipping 0.720 +- 0.011). The tune
  stage runs each learning rate on 2 seeds for `steps` steps, then doubles the winner's steps while
  its mean validation score gains at least 0.01 (at most twice)."""
  config.classifier.train.optimizer.grad_clip = 1.0
  config.classifier.train.steps = steps
  config.classifier.train.eval_every = 0
  config.classifier.train.checkpoint_every = 200
  config.classifier.eval.bootstrap = 0  # the study's CIs are the paired ones over seeds and images
  lr = float(config.classifier.train.optimizer.lr)
  config.tune.grid = f"train.optimizer.lr={lr / 3:.4g}|{lr:.4g}|{lr * 3:.4g}"
  config.tune.seeds = 2
  config.tune.converge = True
  config.tune.widen = 2


def finalize_study(config: ConfigDict, words: set[str]) -> ConfigDict:
  if "smoke" in words:
    study_smoke(config)
  config.lock()
  return config
