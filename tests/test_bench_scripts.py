"""The benchmark scripts still run: a device session has minutes, not time to debug them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_unet_mfu_runs_every_variant_on_the_smoke_model():
  """`bench/unet_mfu.py` patches `unet`'s ops per variant; a changed op signature breaks it
  (as session 12's precision argument did, unseen until this test). Each variant must train
  the same model to the same loss, but the diagnostic `affine_norm` (not a valid model)."""
  variants = ["default", "xla_attention", "matmul_conv_grad", "autodiff_norm"]
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / "unet_mfu.py"), "--config_arg=smoke", "--batch=4",
                         "--steps=1", "--repeats=1", "--variants=" + ",".join(variants)],
                        capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = {}
  for line in proc.stdout.splitlines():
    name = line.split(":")[0]
    if name in variants and "loss" in line:
      losses[name] = float(line.rsplit("loss", 1)[1])
  assert sorted(losses) == sorted(variants), proc.stdout[-2000:]
  assert max(losses.values()) - min(losses.values()) < 1e-3 * max(losses.values()), losses
  assert "model FLOPs/step" in proc.stdout
