"""Paper 001's conditional GANs on the procedural chest world (DuMont Schütte et al.): cpD-GAN by
default, prog-GAN with `prog_gan`.

    python launch/main.py --config=configs/cxr_gan.py --workdir=/tmp/cxr_gan

Trains on the labelled training split (the findings as the condition y), checks FID every
`fid.every_images` images on fixed image statistics (the tstr study uses its real-data classifier's
features instead), keeps the best generator under best/ and stops after 2 evaluations without
improvement. Arguments: smoke (tiny), full (001: batch 256, lr 0.005, FID on 10k images every 400K
images, at least 7M images, 512 channels), prog_gan, and the image size as size=16 / 32 / 64 / 128.
"""
from configs import common

SIZES = (8, 16, 32, 64, 128, 256, 512)


def parse_size(words: set[str], default: int) -> tuple[int, set[str]]:
  """size=<px> from the arguments (a power of 2 from 8 to 512), and the other arguments."""
  chosen = [w for w in words if w.startswith("size=")]
  rest = {w for w in words if not w.startswith("size=")}
  if not chosen:
    return default, rest
  value = chosen[0].split("=", 1)[1]
  if not value.isdigit() or int(value) not in SIZES:
    raise ValueError(f"{chosen[0]!r}: the image size is one of {list(SIZES)} px, e.g. size=32")
  return int(value), rest


def get_config(arg=None):
  size, rest = parse_size({w.strip() for w in (arg or "").split(",") if w.strip()}, 32)
  words = common.parse_arg(",".join(sorted(rest)), ("smoke", "full", "prog_gan", "cpd_gan"))
  config = common.gan_base("chest", size, "prog_gan" if "prog_gan" in words else "cpd_gan")
  config.data.train_size = 4000
  if "full" in words:
    common.gan_full(config)
  if "smoke" in words:
    common.gan_smoke(config)
  config.lock()
  return config
