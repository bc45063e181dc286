"""Shared pieces of the experiment configs (big_vision style: plain functions)."""
from __future__ import annotations

from ml_collections import ConfigDict


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
      "unlabelled_domains": unlabelled,
      "train_size": 4000,
      "val_size": 500,
      "test_size": 1000,
      "ood_size": 1000,
      "unlabelled_size": 2000,
      "label_policy": "002",
      "skew": {
          "attribute": skew_attr,
          # Codes of the under-represented group(s): male for sex, hospitals 3
          # and 4 (codes 1, 2 of (h0, h3, h4)) for tissue.
          "minority_values": minority,
          "setting": "more",  # none | less | more | most (002 Table A2)
          "cap": -1,  # >= 0 overrides the setting with an absolute cap
      },
      "domain_prevalence": ConfigDict({}),
      "augment": "standard",  # none | standard (002 App. E.1, per modality)
  })


def apply_skew_arg(config: ConfigDict, words: set[str]) -> None:
  for w in ("less", "more", "most"):
    if w in words:
      config.data.skew.setting = w
  if "unskewed" in words:
    config.data.skew.setting = "none"


def mesh_config() -> ConfigDict:
  """Device mesh: axis name -> size; -1 takes the remaining devices."""
  return ConfigDict({"data": -1, "model": 1})
