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
import os
import re
import sys
import time
import types
from typing import Any, Mapping, Optional

import jax
import numpy as np
from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2

from synth_med.infra.image_grid import make_grid


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
from clu import periodic_actions  # noqa: E402  (it imports clu.metric_writers: after the placeholder above)
interface = metric_writers.interface


def tag(name: str) -> str:
  """A TensorBoard-legal tag: 'id/top3/sex=male' -> 'id/top3/sex_male'."""
  return re.sub(r"[^-/\w\.]+", "_", name)


class TensorBoardXWriter(interface.MetricWriter):
  """A clu MetricWriter writing TensorBoard event files with tensorboardX's protos.

  Events are appended synchronously (tensorboardX's own SummaryWriter queues
  them on a thread whose `flush` does not drain the queue), so `flush()` really
  puts everything written so far on disk.
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self._events = EventsWriter(os.path.join(logdir, "events"))

  def _write(self, step: int, summary_proto) -> None:
    self._events.write_event(event_pb2.Event(summary=summary_proto, wall_time=time.time(), step=int(step)))

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None):
    self.write_scalars(step, values)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for k, v in scalars.items():
      self._write(step, summary.scalar(tag(k), float(np.asarray(v))))

  def write_images(self, step: int, images: Mapping[str, Any]):
    for k, v in images.items():
      arr = np.asarray(v)
      if arr.ndim == 4:
        arr = make_grid(arr)
      if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
      self._write(step, summary.image(tag(k), arr, dataformats="HWC"))

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    del step, videos  # not used by synth_med

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    del step, audios, sample_rate

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for k, v in texts.items():
      self._write(step, summary.text(tag(k), v))

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    for k, v in arrays.items():
      bins = int((num_buckets or {}).get(k, 30))
      self._write(step, summary.histogram(tag(k), np.asarray(v, np.float64), bins=bins))

  def write_hparams(self, hparams: Mapping[str, Any]):
    text = "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items()))
    self.write_texts(0, {"hparams": text})

  def flush(self):
    self._events.flush()

  def close(self):
    self._events.close()


def create_writer(logdir: str, console: bool = True) -> interface.MetricWriter:
  """TensorBoard (+ console logging) writer for one process; others write nothing."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  writers = [TensorBoardXWriter(logdir)]
  if console:
    writers.append(metric_writers.LoggingWriter())
  return metric_writers.MultiWriter(writers)
