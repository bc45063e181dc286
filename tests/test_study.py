"""The method end to end (experiment 'study'): configs, clear errors, and the real main on
`derm_cascade:smoke`, killed mid-way and resumed, down to report.html."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from synth_med.experiments.run import validate
from synth_med.experiments.study import classifier_config
from synth_med.data.shards import read_shards
from synth_med.errors import SynthMedError
from synth_med.infra import artifacts
from tests.conftest import ROOT, load_config
from tests.test_cli import MAIN, run_main

STUDIES = ["derm_cascade", "cxr_cascade", "histo_study", "cxr_supplement"]


@pytest.mark.parametrize("name", STUDIES)
@pytest.mark.parametrize("arg", ["", "smoke", "full"])
def test_study_configs_validate(name, arg):
  c = load_config(name, arg)
  validate(c)
  assert c.experiment == "study" and c.seeds >= 1
  if name == "derm_cascade" and arg == "":
    assert c.seeds == 5 and c.data.skew.setting == "more" and c.data.skew.attribute == "sex"
    assert c.upsampler.data.image_size == c.classifier.data.image_size
    assert set(c.methods) == {"real", "oversample", "focal", "synth_label", "synth_label_property",
                              "synth_label_property_filtered", "synthetic_only", "control_real_images",
                              "control_label_prior", "ids", "ids_property", "mwnet"}
    # paper 004: IDS on each store, MW-Net on the label + property one, each with its mix's alpha and w2
    for m, mix in (("ids", "synth_label"), ("ids_property", "synth_label_property"), ("mwnet", "synth_label_property")):
      assert c.methods[m].also_against[0] == mix and c.methods[m].synthetic == c.methods[mix].synthetic
      assert (c.methods[m].alpha, c.methods[m].filter_dominant) == (c.methods[mix].alpha, c.methods[mix].filter_dominant)
    assert (c.methods.ids.reweight, c.methods.mwnet.reweight) == ("ids", "mwnet")
    assert tuple(c.methods.ids_property.also_against) == ("synth_label_property", "mwnet")
    assert c.methods.synth_label_property_filtered.quality_filter and "analyze" in c.stages
    assert c.methods.control_real_images.alpha == c.methods.synth_label_property.alpha
    assert set(load_config(name, "baselines").methods) >= {"randaugment", "imagenet_aug", "randaugment_imagenet",
                                                           "pretrained", "synth_label_property_w1"}
    assert c.tune.converge and c.classifier.train.optimizer.grad_clip == 1.0 and c.generate.guidance_grid
    assert c.methods.synth_label_property.filter_dominant == 4 and c.methods.synthetic_only.alpha == 0.0
  if name == "cxr_cascade":
    assert tuple(c.generate.modes) == ("label",) and not c.base.diffusion.condition.attributes
  if name == "histo_study":
    assert c.upsampler is None and "upsampler" not in c.stages
  if name == "cxr_supplement":  # paper 000: findings + age decade + sex + race, one replica store
    assert tuple(c.generate.modes) == ("replica", "replica_w0", "replica_w4", "replica_w7.5")
    assert c.generate.replica_copies == (2 if arg == "smoke" else 10)
    assert tuple(c.base.diffusion.condition.attributes) == ("sex", "age_decade", "race")
    shares = {m: c.methods[m] for m in c.methods if m.startswith("supplement_")}
    for m, method in shares.items():  # p % supplementation: real with probability 1 / (1 + p / 100)
      assert method.alpha == pytest.approx(1 / (1 + method.copies))
    assert c.data.label_policy == "mask_uncertain" and c.base.sampler.guidance == 0.0
    if arg == "full":  # paper 000 Table E1: 4 attention heads
      assert c.base.model.num_head_channels <= 0 and c.base.model.num_heads == 4
    # paper 000's two sites: the OOD site's real images, alone and with this site's replicas
    two = {m for m in c.methods if m.startswith("two_site")}
    assert two == {"two_site_real", "two_site_supplement_" + ("200" if arg == "smoke" else "1000")}
    assert all(c.methods[m].site == "external" for m in two)
    sup = next(m for m in two if "supplement" in m)
    assert c.methods[sup].baseline == "two_site_real" and c.methods[sup].synthetic == "replica"
    cc = classifier_config(c, "/tmp", sup, 0)
    assert tuple(cc.data.train_domains) == ("ood1",) and tuple(cc.data.ood_domains) == ("ood1",)
    assert tuple(classifier_config(c, "/tmp", "real", 0).data.train_domains) == ()


def test_attribute_axis_and_skew_are_config_choices():
  c = load_config("derm_cascade", "age,less")
  assert c.data.skew.attribute == "age_bucket" and c.data.skew.setting == "less"
  assert c.generate.attribute == "age_bucket" and tuple(c.base.diffusion.condition.attributes) == ("age_bucket",)
  assert c.classifier.mix.attribute == "age_bucket"
  assert load_config("derm_cascade", "tone").data.skew.minority_values == (3, 4, 5)


def test_supplement_arguments_fail_clearly():
  with pytest.raises(ValueError, match="multiples of 100 from 100 to 1000"):
    load_config("cxr_supplement", "percents=250")
  with pytest.raises(ValueError, match="multiples of 100"):
    load_config("cxr_supplement", "percents=x")
  with pytest.raises(ValueError, match="guidance values are numbers >= 0"):
    load_config("cxr_supplement", "guidance=-1/4")
  assert {m for m in load_config("cxr_supplement", "guidance=2").methods if m.startswith("cfg")} == {"cfg_w2"}
  assert set(load_config("cxr_supplement", "percents=200/500").methods) == {
      "real", "supplement_200", "supplement_500", "synthetic_only_200", "synthetic_only_500",
      "cfg_w0", "cfg_w4", "cfg_w7p5", "two_site_real", "two_site_supplement_500"}
  assert {m for m in load_config("cxr_supplement", "all").methods if m.startswith("two_site_supplement")} == {
      f"two_site_supplement_{p}" for p in range(100, 1001, 100)}
  real = load_config("cxr_supplement", "chexpert,percents=100")
  assert real.data.source == "chexpert" and real.data.train_size == 0  # every training image replicated
  assert not any(m.startswith("two_site") for m in real.methods)  # one site, no second site's real data
  assert "two_site_real" in load_config("cxr_supplement", "csv").methods  # its site column may name two
  c = load_config("cxr_supplement", "")
  with c.unlocked():
    c.data.ood_domains = ()
  with pytest.raises(SynthMedError, match="trains on the external site's real images, but data.ood_domains is empty"):
    validate(c)
  c = load_config("cxr_supplement", "")
  with c.unlocked():
    c.methods.two_site_supplement_1000.baseline = "mimic"
  with pytest.raises(SynthMedError, match="baseline='mimic'; name another of the study's methods"):
    validate(c)
  with pytest.raises(ValueError, match="unknown config argument"):
    load_config("cxr_supplement", "ham10000")  # a skin data set
  c = load_config("cxr_supplement", "")
  with c.unlocked():
    c.generate.replica_copies = 3  # fewer copies than supplement_1000 reads
  with pytest.raises(SynthMedError, match="generate.replica_copies >= 10"):
    validate(c)


def test_bad_stage_names_alpha_and_methods_fail_clearly():
  c = load_config("derm_cascade", "smoke")
  with c.unlocked():
    c.stages = "base,evaluate,sample"
  with pytest.raises(SynthMedError, match=r"stages has \['sample'\]; choose from"):
    validate(c)
  c = load_config("histo_study", "smoke")
  with c.unlocked():
    c.stages = "upsampler"
  with pytest.raises(SynthMedError, match="upsampler"):
    validate(c)
  c = load_config("derm_cascade", "smoke")
  with c.unlocked():
    c.methods.synth_label.alpha = 1.5
  with pytest.raises(SynthMedError, match=r"mix.alpha=1.5 must lie in \[0, 1\]"):
    validate(c)
  c = load_config("derm_cascade", "smoke")
  with c.unlocked():  # a stage's key is named as the study names it
    c.upsampler.model.matmul_precision = "fp16"
  with pytest.raises(SynthMedError, match=r"--config.upsampler.model.matmul_precision='fp16' is not valid"):
    validate(c)
  c = load_config("derm_cascade", "smoke")
  with c.unlocked():  # ... but the data keys the study shares keep their study name
    c.data.label_policy = "bogus"
  with pytest.raises(SynthMedError, match=r"^--config.data.label_policy='bogus' is not valid"):
    validate(c)
  c = load_config("derm_cascade", "smoke")
  with c.unlocked():
    c.method_names = "real,magic"
  with pytest.raises(SynthMedError, match=r"unknown methods \['magic'\]"):
    validate(c)
  # Through the real main: a clear one-line error and exit code 1, no traceback.
  r = run_main("--config=configs/derm_cascade.py:smoke", "--config.stages=trian", "--workdir=/tmp/unused")
  assert r.returncode == 1 and "stages has ['trian']" in r.stderr and "Traceback" not in r.stderr
  # A key each method sets, or a per-stage data key, does not exist at the study's level: no silent no-op.
  for key in ("classifier.mix.alpha=0.7", "classifier.data.augment=none", "data.image_size=64"):
    r = run_main("--config=configs/derm_cascade.py:smoke", f"--config.{key}", "--workdir=/tmp/unused")
    assert r.returncode == 2 and f"unknown config key --config.{key.split('=')[0]}" in r.stderr, r.stderr


def _mtimes(paths):
  return {p: os.stat(p).st_mtime_ns for p in paths}


@pytest.mark.slow
def test_derm_cascade_smoke_killed_and_resumed_writes_report(tmp_path):
  """The main command on the smoke study: killed once a classifier has finished, rerun to the end.
  Finished stages are skipped (their files untouched), the report has every section."""
  workdir = tmp_path / "study"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = [sys.executable, MAIN, "--config=configs/derm_cascade.py:smoke", f"--workdir={workdir}"]
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          start_new_session=True)
  first_done = workdir / "classifiers" / "real" / "seed0" / "DONE"
  deadline = time.time() + 900
  while not first_done.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  assert first_done.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  finished = [workdir / "base" / "metrics.json", workdir / "upsampler" / "metrics.json",
              workdir / "classifiers" / "real" / "seed0" / "metrics.json"]
  finished += [workdir / "synthetic" / m / f for m in ("label", "label_property")
               for f in os.listdir(workdir / "synthetic" / m) if f.startswith("shard-")]
  before = _mtimes(finished)

  t0 = time.time()
  r = run_main("--config=configs/derm_cascade.py:smoke", f"--workdir={workdir}", timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "study finished" in r.stdout
  print(f"resumed smoke study: {time.time() - t0:.0f} s")
  assert _mtimes(finished) == before  # nothing finished was redone
  timings = json.loads((workdir / "timings.json").read_text())
  assert all(timings[s]["skipped_last_run"] for s in ("base", "upsampler", "generate", "tune"))
  assert not timings["classifiers"]["skipped_last_run"]

  # The fair store: uniform sex within each label; the label-only store has no property.
  store = read_shards(str(workdir / "synthetic" / "label_property")).arrays
  y = store["label"].argmax(-1)
  for c in np.unique(y):
    counts = np.bincount(store["attrs/sex"][y == c], minlength=2)
    assert abs(counts[0] - counts[1]) <= 1
  assert np.all(read_shards(str(workdir / "synthetic" / "label")).arrays["attrs/sex"] == -1)

  res = json.loads((workdir / "results.json").read_text())
  c = load_config("derm_cascade", "smoke")
  assert set(res["methods"]) == set(c.method_names.split(",")) and not res["missing"]
  for entry in res["methods"].values():
    for split in ("id", "ood1", "ood2"):
      assert entry[split]["top3"]["n"] == c.seeds and entry[split]["top3"]["std"] is not None
  assert res["methods"]["synthetic_only"]["mix"]["alpha"] == 0.0
  assert res["methods"]["synth_label_property"]["mix"]["dominant_classes"]

  fid = res["fidelity"]
  assert set(fid) == {"label", "label_property"} and fid["label_property"]["sex"]["n_synthetic_scored"] > 0
  assert fid["label"]["sex"]["synthetic_as_requested"] is None  # label-only store: no property requested
  # Tuning (002 App. E): the real baseline per grid point on ID val; the best lr is every method's lr.
  tuning = json.loads((workdir / "tune" / "best.json").read_text())
  assert tuning["method"] == "real" and tuning["split"] == "val" and len(tuning["points"]) == 2
  val_scores = []
  for point in sorted(os.listdir(workdir / "tune")):
    if point.startswith("p"):
      m = json.loads((workdir / "tune" / point / "seed0" / "metrics.json").read_text())
      val_scores.append(m["splits"]["val"]["overall"]["top3"])
  assert [p["mean"] for p in tuning["points"]] == val_scores
  best_lr = tuning["points"][int(np.argmax(val_scores))]["overrides"]["train.optimizer.lr"]
  assert tuning["overrides"] == {"train.optimizer.lr": best_lr} and res["tuning"]["best"] == tuning["best"]
  for method in res["methods"]:
    used = json.loads((workdir / "classifiers" / method / "seed1" / "config.json").read_text())
    assert used["train"]["optimizer"]["lr"] == best_lr

  # Paired comparisons with the real baseline, the controls among them.
  assert res["reference"] == "real"
  learnt = {"ids": "synth_label", "ids_property": "synth_label_property", "mwnet": "synth_label_property"}
  assert set(res["comparisons"]) == (set(c.method_names.split(",")) - {"real"} | {f"{m} vs {x}" for m, x in learnt.items()}
                                     | {"ids_property vs mwnet"})
  for m, mix in learnt.items():  # each learnt-weights mix also against its fixed-weight mix
    assert res["comparisons"][f"{m} vs {mix}"]["against"] == mix
    cell = res["comparisons"][f"{m} vs {mix}"]["id"]["top3"]
    assert cell["diff"] == pytest.approx(res["methods"][m]["id"]["top3"]["mean"] - res["methods"][mix]["id"]["top3"]["mean"],
                                         abs=1e-9)
  assert {"control_real_images", "control_label_prior"} <= set(res["comparisons"])
  for split in ("id", "ood1", "ood2"):
    cell = res["comparisons"]["synth_label_property"][split]["top3"]
    ref, mine = res["methods"]["real"][split]["top3"]["mean"], res["methods"]["synth_label_property"][split]["top3"]["mean"]
    assert cell["diff"] == pytest.approx(mine - ref, abs=1e-9)  # the same runs as the table
    assert cell["ci"][0] <= cell["diff"] <= cell["ci"][1] and 0 <= cell["p_mann_whitney"] <= 1
  control = json.loads((workdir / "classifiers" / "control_real_images" / "seed0" / "metrics.json").read_text())
  assert control["mix"]["control"] == "real_images" and control["mix"]["control_matched"] > 0.5
  # The second fidelity judge: the real-data classifier on each store.
  cfid = res["fidelity_classifier"]
  assert set(cfid) == {"label", "label_property"} and cfid["label_property"]["runs"] == c.seeds
  assert set(cfid["label_property"]["synthetic_per_value"]) == {"female", "male"}

  # The analyze stage: every analysis ran, on this study's files.
  analyses = res["analyses"]
  assert set(analyses) == {"memorisation", "mmd", "pca", "improvement", "generation_quality", "underserved",
                           "beta_posterior", "group_metrics", "quality_filter", "learnt_weights"}
  assert not [k for k, v in analyses.items() if "skipped" in v], analyses
  for mode in ("label", "label_property"):  # a briefly trained generator copies nothing
    for space in ("pixel", "feature"):
      assert analyses["memorisation"]["stores"][mode][space]["flagged_fraction"] < 0.01
  assert analyses["mmd"]["stores"]["label_property"]["all"]["n"] > 0
  assert set(analyses["improvement"]["methods"]["synth_label_property"]["id"]) == {"female", "male"}
  assert set(analyses["pca"]["methods"]) == set(res["methods"])
  filt = analyses["quality_filter"]["methods"]["synth_label_property_filtered"]
  assert 0 < filt["filter"]["kept"] <= filt["filter"]["total"] == 32 and filt["against"] == "synth_label_property"
  assert set(filt["comparison"]) == {"id", "ood1", "ood2"}
  assert analyses["beta_posterior"]["methods"]["real"]["id"]["sex"]["spread"]["seeds"] == c.seeds
  assert all((workdir / e["figure"]).exists() for e in analyses.values() if "figure" in e)
  weights = analyses["learnt_weights"]
  assert set(weights["methods"]) == set(learnt) and (workdir / weights["images"]).exists()
  for m, entry in weights["methods"].items():
    w = np.mean([np.load(workdir / "classifiers" / m / f"seed{s}" / "learnt_weights.npz")["weight"]
                 for s in range(c.seeds)], 0)
    assert w.shape == (32, 1) and np.all((w >= 0) & (w <= 1)) and entry["mean"] == pytest.approx(w.mean(), rel=1e-5)
    assert entry["confirmation"]["pairs"] == 32
    assert set(entry.get("per_value", {})) == ({"female", "male"} if entry["store"] == "label_property" else set())
  feats = np.load(workdir / "classifiers" / "real" / "seed0" / "features.npz")
  assert {"val", "id", "ood1", "ood2", "train", "synthetic/label", "synthetic/label_property"} <= set(feats.files)
  assert set(np.load(workdir / "classifiers" / "synth_label" / "seed0" / "features.npz").files) == {
      "val", "id", "ood1", "ood2"}  # other methods: their splits only

  page = (workdir / "report.html").read_text()
  assert "Analyses" in page and "Memorisation check" in page
  assert page.index("Paired differences to real") < page.index("Samples: real next to synthetic")
  for section in ("Samples: real next to synthetic", "Results (mean ± std over seeds)",
                  "Performance against fairness gap", "Hyper-parameter tuning", "Generator fidelity",
                  "Stage timings"):
    assert section in page
  assert page.count("data:image/png;base64,") >= 2 and "synth_label_property" in page


@pytest.mark.slow
def test_memorisation_check_alone_flags_a_store_of_copied_training_images(tmp_path):
  """`--config.stages=analyze` on a workdir holding only a 'synthetic' store made of the generator's own
  training images: the memorisation check flags all of them; the analyses that need classifiers say why
  they did not run."""
  from synth_med.data.shards import shard_path, write_shard
  from synth_med.data.sources import make_world
  from synth_med.experiments.diffusion import training_source
  from synth_med.experiments.study import stage_config
  c = load_config("derm_cascade", "smoke")
  part = stage_config(c, "upsampler")
  train = training_source(make_world(part.data), part)[0].arrays
  rows = np.random.default_rng(0).choice(len(train["image"]), 40, replace=False)
  store = tmp_path / "study" / "synthetic" / "label_property"
  write_shard(shard_path(str(store), 0), {k: v[rows] for k, v in train.items()})
  artifacts.mark_done(str(store))
  r = run_main("--config=configs/derm_cascade.py:smoke", f"--workdir={tmp_path / 'study'}", "--config.stages=analyze",
               timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  analyses = json.loads((tmp_path / "study" / "results.json").read_text())["analyses"]
  check = analyses["memorisation"]["stores"]["label_property"]["pixel"]
  assert check["flagged_fraction"] == 1.0 and check["n_synthetic"] == 40
  assert "feature" not in analyses["memorisation"]["stores"]["label_property"]  # no classifier yet
  assert "classifiers stage" in analyses["pca"]["skipped"]


@pytest.mark.parametrize("name,methods,metric", [("histo_study", "no_aug,synth_label_property", "accuracy"),
                                                 ("cxr_cascade", "real,synth_label", "mean_auc")])
@pytest.mark.slow
def test_tissue_and_chest_studies_run_end_to_end(name, methods, metric, tmp_path):
  workdir = tmp_path / name
  r = run_main(f"--config=configs/{name}.py:smoke", f"--workdir={workdir}", f"--config.method_names={methods}",
               "--config.seeds=1", "--config.tune.grid=", timeout=900)  # tuning: the derm smoke test
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((workdir / "results.json").read_text())
  assert set(res["methods"]) == set(methods.split(",")) and res["metrics"][0] == metric
  assert (workdir / "report.html").stat().st_size > 10_000
  if name == "histo_study":  # no cascade; fair over the 3 ID hospitals
    assert not (workdir / "upsampler").exists()
    store = read_shards(str(workdir / "synthetic" / "label_property")).arrays
    assert set(np.unique(store["attrs/hospital"])) == {0, 1, 2}
    assert res["splits"] == ["id", "h1", "h2"]
  else:  # label-only conditioning, as in 002
    assert not (workdir / "synthetic" / "label_property").exists()
    assert res["splits"] == ["id", "ood1"]


def test_stage_timings_add_up_over_resumed_runs(tmp_path):
  from synth_med.experiments.study import Timings
  Timings(str(tmp_path)).record("classifiers", 100.0, skipped=False)  # killed part-way
  t = Timings(str(tmp_path))
  t.record("classifiers", 20.0, skipped=False)  # the rerun finishes it
  t.record("base", 7.0, skipped=True)
  data = json.loads((tmp_path / "timings.json").read_text())
  assert data["classifiers"] == {"seconds": 20.0, "total_seconds": 120.0, "skipped_last_run": False}
  assert data["base"]["skipped_last_run"] and data["base"]["total_seconds"] == 0.0


def test_pretrained_baseline_runs_only_with_a_bit_checkpoint():
  from synth_med.experiments.study import classifier_config, method_names
  c = load_config("derm_cascade", "baselines")
  assert "pretrained" in c.methods and "pretrained" not in method_names(c)
  with c.unlocked():
    c.pretrained_npz = "/data/BiT-M-R50x1.npz"
  assert "pretrained" in method_names(c)
  assert classifier_config(c, "/w", "pretrained", 0).model.pretrained_npz == "/data/BiT-M-R50x1.npz"
  assert classifier_config(c, "/w", "real", 0).model.pretrained_npz == ""
  c = load_config("derm_cascade", "baselines")
  with c.unlocked():
    c.method_names = "real,pretrained"
  with pytest.raises(SynthMedError, match="needs --config.pretrained_npz"):
    validate(c)


@pytest.mark.slow
def test_cxr_supplement_smoke_writes_the_curve_and_the_per_finding_table(tmp_path):
  """Paper 000's study on the chest world: one replica store serves every share, and the analyze stage
  writes the supplementation curve, the per-finding table and the co-occurrence correlations."""
  workdir = tmp_path / "supp"
  r = run_main("--config=configs/cxr_supplement.py:smoke", f"--workdir={workdir}", "--config.seeds=1",
               "--config.tune.grid=", timeout=900)  # tuning and seeds: the derm smoke test
  assert r.returncode == 0, r.stderr[-3000:]
  c = load_config("cxr_supplement", "smoke")
  store = read_shards(str(workdir / "synthetic" / "replica")).arrays
  n_train = int(np.max(store["replica/source"])) + 1
  assert len(store["label"]) == 2 * n_train and set(np.unique(store["replica/copy"])) == {0, 1}
  for name in ("supplement_100", "synthetic_only_200"):
    mix = json.loads((workdir / "classifiers" / name / "seed0" / "metrics.json").read_text())["mix"]
    assert mix["synthetic_examples"] == n_train * int(name.rsplit("_", 1)[1]) // 100
  assert json.loads((workdir / "classifiers" / "supplement_100" / "seed0" / "metrics.json").read_text())[
      "mix"]["alpha"] == pytest.approx(0.5)
  supp = json.loads((workdir / "results.json").read_text())["analyses"]["supplementation"]
  assert set(supp["curve"]) == {"id", "ood1"}
  assert set(supp["curve"]["id"]["real+synthetic"]) == {"100", "200"} == set(supp["curve"]["id"]["synthetic only"])
  assert supp["cooccurrence"]["synthetic replicas"]["pearson_vs_real_train"] == pytest.approx(1.0)
  table = supp["findings"]["id"]
  assert set(table) == {"real", "supplement_100", "supplement_200", "synthetic_only_100", "synthetic_only_200",
                        "two_site_real", "two_site_supplement_200"}
  # paper 000's two sites: the OOD site's real images (its training split) with this site's replicas,
  # compared with that site's real data alone on the same test images
  two = json.loads((workdir / "classifiers" / "two_site_supplement_200" / "seed0" / "metrics.json").read_text())
  one = json.loads((workdir / "classifiers" / "real" / "seed0" / "metrics.json").read_text())
  assert two["train_domains"] == ["ood1"] and one["train_domains"] == ["id"]
  assert two["mix"]["synthetic_examples"] == 2 * n_train and two["mix"]["alpha"] == pytest.approx(1 / 3)
  assert set(supp["curve"]["ood1"]["two sites"]) == {"200"}
  assert supp["curve"]["ood1"]["two sites baseline"]["method"] == "two_site_real"
  assert table["two_site_supplement_200"]["Atelectasis"]["against"] == "two_site_real"
  res = json.loads((workdir / "results.json").read_text())
  assert res["comparisons"]["two_site_supplement_200"]["against"] == "two_site_real"
  assert "against" not in res["comparisons"]["supplement_100"]
  for split in ("id", "ood1"):  # the same test images for every model
    assert two["splits"][split]["n"] == one["splits"][split]["n"]
  # 000's CFG matrix: the real model and one per guidance, on real test images and each store's held-out part
  matrix = supp["cfg_matrix"]["auroc"]
  stores = {"replica_w0", "replica_w4", "replica_w7.5"}
  assert set(matrix) == {"real", "cfg_w0", "cfg_w4", "cfg_w7p5"}
  assert all(set(row) == {"real id"} | stores for row in matrix.values())
  assert set(supp["cfg_matrix"]["fid"]) == stores
  mix = json.loads((workdir / "classifiers" / "cfg_w4" / "seed0" / "metrics.json").read_text())["mix"]
  assert mix["synthetic_examples"] == n_train - len(range(0, n_train, 10))  # every 10th example held out
  assert "p_bonferroni" in table["supplement_100"]["Atelectasis"]
  page = (workdir / "report.html").read_text()
  assert c.generate.replica_copies == 2 and "Supplementation with label-matched replicas" in page
  assert "trained on" in page and "replica_w7.5" in page  # the matrix's table


@pytest.mark.slow
def test_cxr_supplement_runs_on_a_fake_chexpert_copy_with_race(tmp_path):
  """Paper 000's study on a local CheXpert copy (a tiny fake tree) with a demographics CSV: the replicas
  carry race from it, and every stage runs on a test split too small for some findings' AUROC."""
  from tests import fake_datasets as fake
  root = fake.write_chexpert(str(tmp_path / "cx"), patients=40)
  workdir = tmp_path / "supp"
  r = run_main("--config=configs/cxr_supplement.py:smoke,chexpert,percents=100", f"--workdir={workdir}",
               f"--config.data.manual_dir={root}",
               f"--config.data.chexpert_demographics_csv={tmp_path / 'cx' / 'chexpert_demo.csv'}",
               f"--config.data.preprocessed_dir={tmp_path / 'pre'}", "--config.seeds=1", "--config.tune.grid=",
               timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  store = read_shards(str(workdir / "synthetic" / "replica")).arrays
  assert (store["attrs/race"] >= 0).any() and (store["attrs/race"] == -1).any()  # 'Other' / 'Unknown' rows
  res = json.loads((workdir / "results.json").read_text())
  assert "supplementation" in res["analyses"] and "skipped" not in res["analyses"]["supplementation"]
