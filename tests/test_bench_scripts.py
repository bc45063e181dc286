"""The benchmark scripts still run, at tiny sizes: they are run rarely, often on a borrowed accelerator."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs a script in a subprocess

ROOT = Path(__file__).resolve().parents[1]


def _run_script(*args: str) -> str:
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / args[0]), *args[1:]], capture_output=True, text=True,
                        timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_unet_mfu_runs_every_variant_on_the_smoke_model():
  """`bench/unet_mfu.py` builds the model on swapped `Ops` per variant, so a changed op signature breaks it.
  Each variant must train the same model to the same loss, but the diagnostic `affine_norm` (not a
  valid model)."""
  variants = ["default", "xla_attention", "matmul_conv_grad", "autodiff_norm"]
  out = _run_script("unet_mfu.py", "--config_arg=smoke", "--batch=4", "--steps=1", "--repeats=1",
                    "--variants=" + ",".join(variants))
  losses = {}
  for line in out.splitlines():
    name = line.split(":")[0]
    if name in variants and "loss" in line:
      losses[name] = float(line.rsplit("loss", 1)[1])
  assert sorted(losses) == sorted(variants), out[-2000:]
  assert max(losses.values()) - min(losses.values()) < 1e-3 * max(losses.values()), losses
  assert "model FLOPs/step" in out
  # what each variant's compiled step holds (the next device run reads whether :full fits its memory)
  assert sum("memory: state+batch" in line for line in out.splitlines()) == len(variants), out[-2000:]


def test_unet_benchmark_runs_our_side_without_torch():
  """`bench/unet.py --only ours` (diffusers and torch are bench-only installs) on a tiny run,
  both precisions: every runner (train step, one denoising step, DDIM-50) reports a rate."""
  for precision in ("float32", "bfloat16"):
    out = _run_script("unet.py", "--only", "ours", "--sizes", "1M", "--rounds", "1", "--repeats", "1", "--batch", "4",
                      "--res", "16", "--precision", precision)
    line = next(ln for ln in out.splitlines() if ln.startswith("[1M] ours"))
    rates = [float(line.split(name)[1].split()[0]) for name in ("train", "step", "ddim50")]
    assert all(r > 0 for r in rates), line


def test_classifier_and_data_benchmarks_run():
  assert "img/s" in _run_script("classifier_step.py", "--arg", "smoke", "--steps", "2")
  out = _run_script("data_throughput.py", "--size", "16", "--batch", "32", "--repeats", "1")
  assert all(world in out for world in ("skin", "chest", "tissue")), out


def test_generator_fidelity_prints_a_line_per_guidance(tmp_path):
  """`bench/generator_fidelity.py` on the smoke study's base model: one JSON line per w, with the probe's
  label agreement of both stores and a rate per requested sex."""
  import json
  out = _run_script("generator_fidelity.py", f"--workdir={tmp_path}", "--config_arg=smoke", "--steps=4",
                    "--channels=16", "--guidance=0,2", "--num_images=16")
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["guidance"] for r in rows] == [0.0, 2.0], out[-2000:]
  for r in rows:
    assert 0 <= r["label_property_label"] <= 1 and 0 <= r["label_label"] <= 1
    assert set(r["sex_per_value"]) == {"0", "1"} and r["steps"] == 4 and r["channels"] == 16
  assert "real held-out at 8 px" in out
