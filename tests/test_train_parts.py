"""Optimizers and schedules, clu metric writers, progress lines."""
import glob
import io

import numpy as np
import pytest
from ml_collections import ConfigDict

from synth_med.errors import SynthMedError
from synth_med.train.metric_writers import TensorBoardXWriter, create_writer, interface, tag
from synth_med.train.optimizers import make_optimizer, make_schedule
from synth_med.infra.progress import Progress


def _opt(**kw):
  c = {"name": "momentum", "lr": 0.1, "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.0,
       "grad_clip": 0.0}
  c.update(kw)
  return ConfigDict(c)


def test_schedule_warmup_then_cosine_by_hand():
  s = make_schedule(_opt(), total_steps=110)
  assert float(s(0)) == pytest.approx(0.0)
  assert float(s(5)) == pytest.approx(0.05)
  assert float(s(10)) == pytest.approx(0.1)
  assert float(s(60)) == pytest.approx(0.05, abs=1e-6)  # half way through the cosine
  assert float(s(110)) == pytest.approx(0.0, abs=1e-7)
  assert float(make_schedule(_opt(schedule="constant", warmup_steps=0), 10)(7)) == pytest.approx(0.1)


def test_optimizer_choices_and_errors():
  for name in ("adam", "adamw", "momentum", "sgd", "lion"):
    tx, _ = make_optimizer(_opt(name=name, weight_decay=1e-4, grad_clip=1.0), 10)
    state = tx.init({"w": np.ones(3)})
    upd, _ = tx.update({"w": np.ones(3)}, state, {"w": np.ones(3)})
    assert upd["w"].shape == (3,)
  # Lion's first step is -lr * sign(gradient) (paper 000's classifier optimizer)
  tx, sched = make_optimizer(_opt(name="lion", schedule="constant", warmup_steps=0), 10)
  g = {"w": np.array([0.3, -2.0, 0.0])}
  upd, _ = tx.update(g, tx.init({"w": np.zeros(3)}), {"w": np.zeros(3)})
  np.testing.assert_allclose(upd["w"], -float(sched(0)) * np.sign(g["w"]), rtol=1e-6)
  with pytest.raises(SynthMedError, match="choose one of"):
    make_optimizer(_opt(name="rmsprop"), 10)
  with pytest.raises(SynthMedError, match="schedule"):
    make_optimizer(_opt(schedule="step"), 10)


def test_writer_is_a_clu_writer_and_writes_event_files(tmp_path):
  w = create_writer(str(tmp_path))
  assert isinstance(w, interface.MetricWriter)
  w.write_scalars(1, {"id/top3/sex=male": 0.5})
  w.write_images(1, {"grid": np.zeros((8, 8, 3), np.uint8), "batch": np.zeros((4, 8, 8, 1), np.uint8)})
  w.write_texts(1, {"note": "hello"})
  w.write_histograms(1, {"w": np.arange(10.0)})
  w.write_hparams({"lr": 0.1})
  w.flush()
  files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  data = open(files[0], "rb").read()
  for name in (b"id/top3/sex_male", b"grid", b"batch", b"note", b"hparams"):
    assert data.count(name) >= 1, name
  assert tag("id/top3/age_bucket=(65,75]") == "id/top3/age_bucket_65_75_"
  assert isinstance(TensorBoardXWriter(str(tmp_path / "x")), interface.MetricWriter)


def test_progress_reports_rate_and_eta():
  out = io.StringIO()
  p = Progress("train", 100, start=0, every_s=0.0, stream=out)
  p.update(50, extra="loss 1.0", force=True)
  line = out.getvalue()
  assert "train: 50/100 steps" in line and "ETA" in line and "loss 1.0" in line


def test_image_grid_layout_and_png(tmp_path):
  from PIL import Image
  from synth_med.infra.image_grid import make_grid, save_png
  imgs = np.stack([np.full((4, 4, 3), i * 20, np.uint8) for i in range(5)])
  grid = make_grid(imgs, ncol=3, pad=1)
  assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
  assert (grid[1:5, 6:10] == 20).all() and (grid[6:10, 1:5] == 60).all()
  save_png(str(tmp_path / "g.png"), grid)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)


def test_checkpointer_takes_a_relative_folder_and_reads_back_what_it_saved(tmp_path, monkeypatch):
  """Orbax wants absolute paths; `Checkpointer` and `read_checkpoint` take a run's relative folder."""
  from synth_med.infra.checkpoint import Checkpointer, read_checkpoint
  monkeypatch.chdir(tmp_path)
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(3)}
  ckpt = Checkpointer("run/checkpoints")
  ckpt.save(3, tree)
  ckpt.close()
  got, step = read_checkpoint("run")
  assert step == 3
  np.testing.assert_array_equal(got["w"], tree["w"])
  with pytest.raises(SynthMedError, match="no checkpoint folder"):
    read_checkpoint("elsewhere")
