"""Diffusion configs: Table E1 under :full, CPU-sized defaults, :smoke end to end through launch/main.py."""
import json
import os

import pytest

from synth_med import configuration
from synth_med.errors import SynthMedError
from tests.conftest import load_config
from tests.test_cli import run_main

E1 = {  # 002 Table E1: (image size, ch, res blocks, channel mult, lr, batch)
    ("derm_diffusion", "full"): (64, 192, 3, (1, 2, 3, 4), 1.5e-4, 128),
    ("cxr_diffusion", "full"): (64, 192, 3, (1, 2, 3, 4), 1.5e-5, 128),
    ("histo_diffusion", "full"): (96, 128, 2, (1, 1, 2, 3, 4), 1e-4, 64),
    ("derm_diffusion", "full,upsampler"): (256, 128, 2, (1, 1, 2, 2, 4, 4), 1e-4, 32),
    ("cxr_diffusion", "full,upsampler"): (224, 128, 2, (1, 1, 2, 2, 4, 4), 1e-4, 32),
}


@pytest.mark.parametrize("name,arg", sorted(E1))
def test_full_is_table_e1(name, arg):
  c = load_config(name, arg)
  configuration.validate(c)
  size, ch, res, mult, lr, batch = E1[(name, arg)]
  assert c.data.image_size == size
  assert (c.model.model_channels, c.model.num_res_blocks, tuple(c.model.channel_mult)) == (ch, res, mult)
  assert c.train.optimizer.lr == lr and c.train.batch_size == batch
  assert c.model.num_head_channels == 64 and tuple(c.model.attention_resolutions) == (2, 4, 8)
  assert c.diffusion.num_steps == 1000 and c.diffusion.variance in ("small", "large")
  if "upsampler" in arg:
    assert c.model.name == "superres_unet" and c.diffusion.low_res.size == 64
    assert c.data.image_size % 2 ** (len(mult) - 1) == 0


@pytest.mark.parametrize("name", ["derm_diffusion", "cxr_diffusion", "histo_diffusion"])
@pytest.mark.parametrize("arg", ["", "smoke", "label_property", "smoke,more"])
def test_diffusion_configs_load_and_validate(name, arg):
  c = load_config(name, arg)
  configuration.validate(c)
  assert 16 <= c.data.image_size <= 64 and c.model.model_channels <= 64  # fits a 2-core CPU
  if "label_property" in arg:
    assert len(c.diffusion.condition.attributes) == 1


def test_histo_has_no_upsampler_and_bad_values_are_named():
  with pytest.raises(ValueError, match="no upsampler"):
    load_config("histo_diffusion", "upsampler")
  c = load_config("derm_diffusion", "smoke")
  with c.unlocked():
    c.sampler.steps = 500
  with pytest.raises(SynthMedError, match="sampler.steps"):
    configuration.validate(c)
  c = load_config("derm_diffusion", "smoke")
  with c.unlocked():
    c.diffusion.drop_prob = 1.5
  with pytest.raises(SynthMedError, match="drop_prob"):
    configuration.validate(c)
  c = load_config("derm_diffusion", "smoke")
  with c.unlocked():
    c.model.matmul_precision = "float16"
  with pytest.raises(SynthMedError, match=r"model.matmul_precision='float16' is not valid; choose one of \['float32', 'bfloat16'\]"):
    configuration.validate(c)


@pytest.mark.slow
def test_main_trains_base_and_upsampler_and_writes_grids(tmp_path):
  base = tmp_path / "base"
  r = run_main("--config=configs/derm_diffusion.py:smoke,label_property", f"--workdir={base}",
               "--config.generate.num_images=10", "--config.generate.shard_size=4")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "train:" in r.stdout and "generating" in r.stdout
  m = json.loads((base / "metrics.json").read_text())
  assert m["conditioning"] == ["label", "sex"] and m["data"]["unlabelled"] > 0
  assert (base / "samples.png").stat().st_size > 100 and (base / "DONE").exists()
  assert sorted(os.listdir(base / "generated"))[:3] == ["DONE", "manifest.json", "shard-00000.npz"]
  assert len([f for f in os.listdir(base / "generated") if f.startswith("shard-")]) == 3
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(base / "tensorboard" / "samples"))
  up = tmp_path / "up"
  r = run_main("--config=configs/derm_diffusion.py:smoke,upsampler", f"--workdir={up}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((up / "metrics.json").read_text())["model"] == "superres_unet"
  r = run_main("--config=configs/derm_diffusion.py:smoke", f"--workdir={base}")
  assert r.returncode == 0 and "skipping" in r.stdout
