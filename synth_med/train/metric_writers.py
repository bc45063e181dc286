"""clu metric writers on a TensorFlow-free TensorBoard backend.

clu's `metric_writers` package imports its TensorFlow `SummaryWriter` at import
time. TensorFlow is ~600 MB and nothing else here needs it, so when it is not
installed we register a placeholder for that one submodule, keep clu's
interface, LoggingWriter, MultiWriter and AsyncWriter, and write TensorBoard
event files with tensorboardX through `TensorBoardXWriter` (a clu
`MetricWriter`). With TensorFlow installed, clu is used unchanged.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import types
from typing import Any, Mapping, Optional

import numpy as np


def _import_clu_writers():
  name = "clu.metric_writers.summary_writer"
  if importlib.util.find_spec("tensorflow") is None and name not in sys.modules:
    placeholder = types.ModuleType(name)

    class SummaryWriter:  # pylint: disable=too-few-public-methods
      def __init__(self, *args, **kwargs):
        raise ImportError("clu's SummaryWriter needs TensorFlow; synth_med writes TensorBoard files "
                          "with TensorBoardXWriter instead.")

    placeholder.SummaryWriter = SummaryWriter
    sys.modules[name] = placeholder
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  return metric_writers


metric_writers = _import_clu_writers()
interface = metric_writers.interface


def tag(name: str) -> str:
  """A TensorBoard-legal tag: 'id/top3/sex=male' -> 'id/top3/sex_male'."""
  return re.sub(r"[^-/\w\.]+", "_", name)


class TensorBoardXWriter(interface.MetricWriter):
  """A clu MetricWriter writing TensorBoard event files with tensorboardX."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._writer = SummaryWriter(logdir=logdir)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None):
    for k, v in values.items():
      self._writer.add_scalar(tag(k), float(np.asarray(v)), step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for k, v in scalars.items():
      self._writer.add_scalar(tag(k), float(np.asarray(v)), step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for k, v in images.items():
      arr = np.asarray(v)
      if arr.ndim == 3:
        arr = arr[None]
      self._writer.add_images(tag(k), arr, step, dataformats="NHWC")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    del step, videos  # not used by synth_med

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    del step, audios, sample_rate

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for k, v in texts.items():
      self._writer.add_text(tag(k), v, step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    for k, v in arrays.items():
      self._writer.add_histogram(tag(k), np.asarray(v), step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    text = "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items()))
    self._writer.add_text("hparams", text, 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def create_writer(logdir: str, console: bool = True) -> interface.MetricWriter:
  """TensorBoard (+ console logging) writer for one process; others write nothing."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  writers = [TensorBoardXWriter(logdir)]
  if console:
    writers.append(metric_writers.LoggingWriter())
  return metric_writers.MultiWriter(writers)
