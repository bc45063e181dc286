"""Paper 001's train-on-synthetic / test-on-real benchmark: the label-combination axes on the data, the
benchmark's settings and checks, and the smoke benchmark end to end through the real main."""
import json

import numpy as np
import pytest

from synth_med.data.label_combinations import CombinationWorld, combination_keys
from synth_med.data.sources import make_world
from synth_med.errors import SynthMedError
from synth_med.experiments.run import validate
from synth_med.experiments.tstr import settings
from tests.conftest import load_config
from tests.test_cli import run_main


def test_combination_world_keeps_the_most_frequent_combinations_and_caps_each(tiny_world_config):
  c = tiny_world_config("chest")
  c.train_size, c.skew.setting = 2000, "none"
  base = make_world(c)
  meta = base.metadata(np.asarray(base.split("train").ids))
  keys = combination_keys(meta["label"], meta["label_mask"])
  values, counts = np.unique(keys, return_counts=True)
  top3 = set(values[np.argsort(-counts, kind="stable")[:3]])
  c.label_combinations, c.per_combination = 3, 25
  w = make_world(c)
  assert isinstance(w, CombinationWorld) and set(w.combinations) == top3
  tm = w.metadata(np.asarray(w.split("train").ids))
  got, n = np.unique(combination_keys(tm["label"], tm["label_mask"]), return_counts=True)
  assert set(got) == top3 and (n == 25).all()
  for split in ("val", "id", "ood1"):  # the test folds keep exactly the chosen combinations
    m = w.metadata(np.asarray(w.split(split).ids))
    assert set(combination_keys(m["label"], m["label_mask"])) <= top3
    assert 0 < len(w.split(split)) < len(base.split(split))
  assert len(w.split("unlabelled")) == len(base.split("unlabelled"))
  c.per_combination = 10_000
  with pytest.raises(SynthMedError, match="data.per_combination=10000, but 3 of the 3 label combinations"):
    make_world(c)
  c.label_combinations, c.per_combination = 500, 0
  with pytest.raises(SynthMedError, match="data.label_combinations=500, but the training split has only"):
    make_world(c)


def test_benchmark_settings_vary_one_axis_at_a_time():
  c = load_config("gan_benchmark", "")
  names = [s["name"] for s in settings(c)]
  assert names == ["m4_n200_px32", "m8_n200_px32", "m2_n200_px32", "m4_n400_px32", "m4_n100_px32", "m4_n200_px16"]
  assert c.seeds >= 4 and c.generator == "cpd_gan"
  validate(c)
  full = load_config("gan_benchmark", "full")
  assert (full.gan.train.batch_size, full.gan.train.optimizer.lr, full.gan.fid.every_images, full.gan.fid.images,
          full.gan.fid.min_images) == (256, 0.005, 400_000, 10_000, 7_000_000)
  assert tuple(full.axes.label_combinations) == (20, 10, 5, 2) and max(full.axes.image_size) == 512
  assert load_config("gan_benchmark", "diffusion").generator == "diffusion"
  assert load_config("gan_benchmark", "prog_gan").gan.model.name == "prog_gan"
  with c.unlocked():
    c.generator = "vae"
  with pytest.raises(SynthMedError, match=r"generator='vae' is not valid; choose one of \['cpd_gan'"):
    validate(c)
  c = load_config("gan_benchmark", "")
  with c.unlocked():
    c.setting_names = "m4_n200_px32,m99"
  with pytest.raises(SynthMedError, match=r"unknown settings \['m99'\]"):
    validate(c)
  c = load_config("gan_benchmark", "")
  with c.unlocked():
    c.gan.model.start_size = 12
    c.generator = "prog_gan"
    c.gan.model.name = "prog_gan"
  with pytest.raises(SynthMedError, match="start_size=12 must be a power of 2"):
    validate(c)


@pytest.mark.slow
def test_gan_benchmark_smoke_writes_the_axis_tables(tmp_path):
  """The :smoke benchmark through the real main: per setting real and synthetic classifiers, a GAN stopped on
  FID with its best generator kept, synthetic folds with the real folds' labels, the axis tables, Δ_syn,
  the nearest-neighbour pairs and the report; a rerun finds everything finished."""
  workdir = tmp_path / "bench"
  r = run_main("--config=configs/gan_benchmark.py:smoke", f"--workdir={workdir}", timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((workdir / "results.json").read_text())
  assert set(res["settings"]) == {"m2_n40_px16", "m3_n40_px16"}
  assert res["axes"]["label_combinations"] == ["m3_n40_px16", "m2_n40_px16"]
  for name, e in res["settings"].items():
    assert len(e["auc_real"]["seeds"]) == 2 == len(e["auc_syn"]["seeds"])
    assert e["gap"]["mean"] == pytest.approx(e["auc_real"]["mean"] - e["auc_syn"]["mean"])
    assert e["gap"]["ci"][0] <= e["gap"]["mean"] <= e["gap"]["ci"][1]
    assert e["metric"] == "mean_auc" and e["generator"]["fid_best"] is not None
    assert len(e["nearest"]["pairs"]) == 8 and (workdir / e["nearest"]["figure"]).exists()
    folder = workdir / "settings" / name
    gan = json.loads((folder / "generator" / "metrics.json").read_text())
    assert (folder / "generator" / "best").is_dir() and len(gan["fid"]["history"]) >= 1
    from synth_med.data.shards import read_shards
    synth = read_shards(str(folder / "synthetic" / "test")).arrays
    from synth_med.evaluation.paired import load_predictions
    real_test = load_predictions(str(folder / "real" / "seed0" / "predictions.npz"))["id"]
    np.testing.assert_array_equal(synth["label"], real_test.label)  # one synthetic image per real test image
  page = (workdir / "report.html").read_text()
  assert "label combinations" in page and "AUC_syn" in page and "Nearest real neighbours" in page
  again = run_main("--config=configs/gan_benchmark.py:smoke", f"--workdir={workdir}", timeout=600)
  assert again.returncode == 0 and "is done; skipping" in again.stdout


@pytest.mark.slow
def test_the_benchmark_takes_the_diffusion_generator(tmp_path):
  """generator=diffusion: the label-conditioned diffusion model (no unlabelled images) on the same fold and axes."""
  workdir = tmp_path / "bench"
  r = run_main("--config=configs/gan_benchmark.py:smoke,diffusion", "--config.setting_names=m2_n40_px16",
               f"--workdir={workdir}", timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((workdir / "results.json").read_text())
  assert res["generator"] == "diffusion" and set(res["settings"]) == {"m2_n40_px16"}
  gen = json.loads((workdir / "settings" / "m2_n40_px16" / "generator" / "metrics.json").read_text())
  assert gen["data"]["unlabelled"] == 0 and gen["conditioning"] == ["label"]
