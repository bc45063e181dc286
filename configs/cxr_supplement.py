"""Paper 000's supplementation study (Khosravi et al., a conditional DDPM for chest X-rays) on the
procedural chest world.

    python launch/main.py --config=configs/cxr_supplement.py --workdir=/tmp/cxr_supplement

The generator is conditioned as in 000 on the findings, the age decade, sex and race, each part
dropped with p = 0.1. Every labelled training image gets `generate.replica_copies` label-matched
synthetic replicas (its findings and demographics, each its own noise), made once; a method that
supplements with p % reads the first p/100 copies. Classifiers (3 seeds): real data only; real +
synthetic at each p % (a training example is real with probability 1 / (1 + p/100), as when the two
sets are pooled); synthetic only at the same sizes; and 000's CFG matrix: one replica copy made at
each guidance w (0, 4, 7.5), a model trained on each (10 % of the training examples held out), each
model scored on real test images and on every store's held-out part, next to the store's FID. Two
sites (000's MIMIC-CXR + synthetic CheXpert): `two_site_real` trains on the real images of the world's
OOD hospital alone, `two_site_supplement_<p>` adds this hospital's replicas; those are compared with
`two_site_real`, every other method with `real`.
Evaluation: the internal test split (ID) and the
external one (the world's OOD hospital), the same images for every model, macro and per-finding AUROC;
the analyze stage adds 000's statistics (bootstrap CIs per finding, paired t-tests with Bonferroni,
co-occurrence correlation).

Arguments (comma list):
  smoke            tiny, runs in about two minutes (tests; 100 and 200 %)
  guidance=A/B/..  the CFG matrix's guidance values (default 0/4/7.5, 000's Table 2)
  full             paper 000's Table E1 sizes for accelerators: 256 px, UNet ch 128 (1,1,2,2,4,4), cosine
                   T = 1000, 4 attention heads, DDIM 200 steps; the classifier with Lion (lr 1e-5, weight decay 3e-4), EMA 0.9999
  quick            supplementation at 100, 300 and 1000 % (the default); two sites at the largest share
  all              at 100, 200, ..., 1000 %, two sites too
  percents=A/B/..  these percentages (multiples of 100, up to 1000)
  chexpert / mimic_cxr / chestxray14 / csv   a local copy of that data set (--config.data.manual_dir=...;
                   docs/data.md); race needs --config.data.chexpert_demographics_csv or
                   --config.data.mimic_admissions_csv. A one-site data set has no two-site methods; :csv
                   keeps them (name the second site with --config.data.ood_domains, or leave them out
                   with --config.method_names)
Defaults we chose where 000 is silent at this scale: a 32 px generator with 2,000 steps sampled in 20,
500 real training images, 10 replicas each (000: every CheXpert image, 10 variants), the classifier of
the chest study.
Expected at the default (commit af75ffb, 2-core AMD EPYC, 30.5 min): real data macro AUROC 0.920 (ID) /
0.912 (OOD); real + synthetic at 100 % not detectably different, at 300 and 1000 % worse on ID; synthetic
only worse at every share; two sites: + 1000 % replicas n.d. on ID, worse on the OOD site (README).
"""
from configs import common, cxr_classifier, cxr_diffusion

PERCENTS = {"quick": (100, 300, 1000), "all": tuple(range(100, 1001, 100))}
GUIDANCE = (0.0, 4.0, 7.5)  # paper 000's Table 2
CONDITION = ("sex", "age_decade", "race")  # with the findings: paper 000's conditioning


def parse_percents(words: set[str]) -> tuple[tuple[int, ...], set[str]]:
  """The supplementation percentages the arguments ask for, and the other arguments."""
  chosen = [w for w in words if w.startswith("percents=")]
  rest = {w for w in words if not w.startswith("percents=")}
  if not chosen:
    default = (100, 200) if "smoke" in rest else PERCENTS["all" if "all" in rest else "quick"]
    return default, rest - {"all", "quick"}
  try:
    values = tuple(int(v) for v in chosen[0].split("=", 1)[1].split("/") if v)
  except ValueError:
    values = ()
  bad = [v for v in values if v % 100 or not 100 <= v <= 1000]
  if not values or bad:
    raise ValueError(f"{chosen[0]!r}: supplementation percentages are multiples of 100 from 100 to 1000, "
                     "e.g. percents=100/300/1000")
  return tuple(sorted(set(values))), rest


def parse_guidance(words: set[str]) -> tuple[tuple[float, ...], set[str]]:
  """The CFG matrix's guidance values (000: 0, 4, 7.5) and the other arguments."""
  chosen = [w for w in words if w.startswith("guidance=")]
  rest = {w for w in words if not w.startswith("guidance=")}
  if not chosen:
    return GUIDANCE, rest
  try:
    values = tuple(float(v) for v in chosen[0].split("=", 1)[1].split("/") if v)
  except ValueError:
    values = ()
  if not values or any(not 0 <= v < 100 for v in values):
    raise ValueError(f"{chosen[0]!r}: guidance values are numbers >= 0, e.g. guidance=0/4/7.5")
  return tuple(sorted(set(values))), rest


def get_config(arg=None):
  parts = {w.strip() for w in (arg or "").split(",") if w.strip()}
  guidance, parts = parse_guidance(parts)
  percents, words = parse_percents(parts)
  words = common.parse_arg(",".join(sorted(words)), ("smoke", "full", "quick", "all") + common.sources_of("chest"))
  source = common.real_source(words, "chest")
  classifier, base, _ = common.stage_configs(cxr_classifier, cxr_diffusion, words, upsampler=False)
  # paper 000's two sites need a second site's real images: the world's OOD hospital, or a CSV's site column
  two_sites = not source or source == "csv" or bool(common.DATA_SOURCES[source].ood_domains)
  methods = {"real": common.method()}
  if two_sites:
    methods["two_site_real"] = common.method(site="external")
  for p in percents:
    methods[f"supplement_{p}"] = common.method(synthetic="replica", alpha=1.0 / (1.0 + p / 100.0), copies=p // 100)
  for p in percents:
    methods[f"synthetic_only_{p}"] = common.method(synthetic="replica", alpha=0.0, copies=p // 100)
  for p in (percents if "all" in parts else percents[-1:]) if two_sites else ():  # paper 000's two sites: the external site's real images + this site's replicas
    methods[f"two_site_supplement_{p}"] = common.method(synthetic="replica", alpha=1.0 / (1.0 + p / 100.0),
                                                        copies=p // 100, site="external", baseline="two_site_real")
  for w in guidance:  # the CFG matrix: synthetic only on one copy made at w, 10 % of it held out
    methods[f"cfg_w{w:g}".replace(".", "p")] = common.method(synthetic=f"replica_w{w:g}", alpha=0.0, holdout=10)
  modes = ("replica",) + tuple(f"replica_w{w:g}" for w in guidance)
  config = common.study_base("chest", "sex", base, None, classifier, methods, modes=modes)
  config.data.label_policy = "mask_uncertain"  # paper 000 masks uncertain findings
  if source:  # a local copy: every training image is replicated (race from data.mimic_admissions_csv or
    common.use_real_data(config, source)  # data.chexpert_demographics_csv when given)
  config.base.diffusion.condition.attributes = CONDITION
  config.base.sampler.guidance = 0.0  # 000 chose CFG scale 0 (plain conditional sampling) for its replicas
  config.generate.replica_copies = max(percents) // 100
  config.seeds = 3
  if "smoke" in words:
    common.study_smoke_sizes(config, base_size=16, size=16)
  elif "full" in words:  # paper 000 Table E1, for accelerators
    config.base.data.image_size = config.classifier.data.image_size = 256
    # attention at 32, 16 and 8 px of 256 px (downsample factors 8, 16, 32) with 4 heads, as in 000
    config.base.model = common.unet_config(128, (1, 1, 2, 2, 4, 4), 2, (8, 16, 32), -1)
    config.base.model.num_heads = 4
    config.base.model.dtype = "bfloat16"
    config.base.diffusion.schedule, config.base.diffusion.num_steps = "cosine", 1000
    config.base.sampler.name, config.base.sampler.steps, config.base.sampler.eta = "ddim", 200, 0.0
    opt = config.classifier.train.optimizer  # 000 trains a ConvNeXt-base; here the chest study's BiT
    opt.name, opt.lr, opt.weight_decay = "lion", 1e-5, 3e-4
    config.classifier.train.ema_decay = 0.9999
    config.classifier.eval.use_ema = True
  else:
    if not source:  # 500 real training images, so 1000 % is 5,000 replicas: the 2-core budget of 30 min
      config.data.train_size = 500
    config.classifier.data.image_size = 32
    config.base.data.image_size = 32
    config.base.train.steps = 2000
    config.base.train.checkpoint_every = 1000
    config.base.train.sample_every = 0
    config.base.diffusion.min_snr_gamma = 5.0
    config.base.sampler.steps = 20
    config.classifier.model.width = 0.125
    config.classifier.train.optimizer.warmup_steps = 30
    common.converged_classifiers(config, steps=300)
  return common.finalize_study(config, words)
