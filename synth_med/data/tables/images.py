"""Preprocessing of a table's image files into fast uint8 shards at the experiment resolution.

Decode (any format PIL reads), convert to greyscale or RGB, resize with the
aspect ratio kept and zero padding to a square, optionally histogram-equalise
(paper 000), and write chunks of `CHUNK` rows as ArrayRecord files (one record
per image, the raw uint8 pixels; random access by row, as grain reads them).
Chunks are written in parallel threads (PIL releases the GIL while decoding),
each atomically (temporary file, then rename, then the chunk's `ok` mask as its
done marker); a rerun skips the finished chunks, so a killed job resumes.
Progress and the decode throughput are printed.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import threading
import time

import numpy as np

from synth_med.data.tables.table import ImageTable
from synth_med.errors import SynthMedError
from synth_med.infra.artifacts import atomic_write
from synth_med.infra.progress import Progress

CHUNK = 512
CORRUPT_POLICIES = ("skip", "fail")


def load_image(path: str, size: int, channels: int, equalize: bool = False) -> np.ndarray:
  """uint8[size, size, channels]: aspect-preserving resize of the longer side to `size`, centred, zero-padded."""
  from PIL import Image, ImageOps
  with Image.open(path) as im:
    im.load()
    im = im.convert("L" if channels == 1 else "RGB")
  if equalize:
    im = ImageOps.equalize(im)
  w, h = im.size
  scale = size / max(w, h)
  nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
  im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0 if scale < 0.5 else None)
  canvas = Image.new(im.mode, (size, size))
  canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
  arr = np.asarray(canvas, np.uint8)
  return arr[..., None] if channels == 1 else arr


def check_files_exist(table: ImageTable, what: str) -> None:
  """Fails, counting them and naming the first few, when listed image files are absent."""
  missing = [table.full_path(i) for i in range(len(table)) if not os.path.exists(table.full_path(i))]
  if missing:
    shown = ", ".join(repr(m) for m in missing[:5])
    raise SynthMedError(f"{what}: {len(missing)} of {len(table)} listed image files are missing, e.g. {shown}. "
                        "Check data.manual_dir (the paths in the CSV are relative to it) or that the copy is "
                        "complete.")


def cache_folder(table: ImageTable, size: int, root: str) -> str:
  """`<root>/<name>-<hash>/<size>px`: the hash covers the image list, so another subset gets another cache."""
  h = hashlib.sha1()
  h.update(table.root.encode())
  for p in table.paths:
    h.update(str(p).encode() + b"\0")
  h.update(str(table.channels).encode())
  return os.path.join(os.path.expanduser(root), f"{table.name}-{h.hexdigest()[:12]}", f"{size}px")


def _chunk_paths(folder: str, k: int) -> tuple[str, str]:
  return os.path.join(folder, f"images-{k:05d}.array_record"), os.path.join(folder, f"ok-{k:05d}.npy")


def _write_array_record(path: str, images: np.ndarray) -> None:
  from array_record.python import array_record_module
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for im in images:
    writer.write(np.ascontiguousarray(im).tobytes())
  writer.close()
  os.replace(tmp, path)


def _write_chunk(table: ImageTable, folder: str, k: int, size: int, equalize: bool, corrupt: str) -> list[str]:
  rows = range(k * CHUNK, min(len(table), (k + 1) * CHUNK))
  images = np.zeros((len(rows), size, size, table.channels), np.uint8)
  ok = np.ones(len(rows), bool)
  bad = []
  for j, i in enumerate(rows):
    path = table.full_path(i)
    try:
      images[j] = load_image(path, size, table.channels, equalize)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a broken file
      if corrupt == "fail":
        raise SynthMedError(f"{table.name}: cannot decode image {path!r} ({type(e).__name__}: {e}). Set "
                            "--config.data.corrupt_images=skip to leave such images out (they are counted).") from e
      ok[j] = False
      bad.append(path)
  img_path, ok_path = _chunk_paths(folder, k)
  _write_array_record(img_path, images)
  atomic_write(ok_path, lambda f: np.save(f, ok), "wb", ".npy")  # written last: marks the chunk done
  return bad


def prepare_images(table: ImageTable, size: int, cache_root: str, equalize: bool = False,
                   corrupt: str = "skip", num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Preprocesses (or reuses) every image of `table` at `size`; returns (images uint8[N,S,S,C] memory-mapped,
  ok bool[N]). Rows with ok=False could not be decoded (only with corrupt='skip')."""
  if corrupt not in CORRUPT_POLICIES:
    raise SynthMedError(f"data.corrupt_images={corrupt!r}; choose one of {list(CORRUPT_POLICIES)}.")
  folder = cache_folder(table, size, cache_root) + ("-eq" if equalize else "")
  os.makedirs(folder, exist_ok=True)
  n_chunks = (len(table) + CHUNK - 1) // CHUNK
  todo = [k for k in range(n_chunks) if not os.path.exists(_chunk_paths(folder, k)[1])]
  if todo:
    check_files_exist(table, table.name)
    threads = num_threads or max(1, min(8, os.cpu_count() or 1))
    n_rows = sum(min(len(table), (k + 1) * CHUNK) - k * CHUNK for k in todo)
    print(f"preprocessing {n_rows} {table.name} images to {size} px in {folder} "
          f"({len(todo)} chunks, {threads} threads; resumable)", flush=True)
    progress = Progress("preprocess", n_rows, unit="image")
    t0, done, bad = time.time(), 0, []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      futures = {pool.submit(_write_chunk, table, folder, k, size, equalize, corrupt): k for k in todo}
      for fut in concurrent.futures.as_completed(futures):
        k = futures[fut]
        bad += fut.result()
        done += min(len(table), (k + 1) * CHUNK) - k * CHUNK
        progress.update(done)
    rate = n_rows / max(time.time() - t0, 1e-9)
    print(f"decoded {n_rows} images in {time.time() - t0:.1f} s: {rate:.0f} images/s", flush=True)
    if bad:
      print(f"WARNING: {len(bad)} image(s) could not be decoded and are left out, e.g. {bad[:3]}", flush=True)
    atomic_write(os.path.join(folder, "info.json"),
                 lambda f: json.dump({"rows": len(table), "size": size, "decode_images_per_s": rate}, f), "w", ".json")
  images = [_chunk_paths(folder, k)[0] for k in range(n_chunks)]
  ok = np.concatenate([np.load(_chunk_paths(folder, k)[1]) for k in range(n_chunks)]) if n_chunks else \
      np.zeros(0, bool)
  return ChunkedImages(images, (size, size, table.channels)), ok


class ChunkedImages:
  """Row access over the ArrayRecord chunks, as if one uint8[N, H, W, C] array (thread-safe)."""

  def __init__(self, paths: list[str], shape: tuple[int, int, int]):
    from array_record.python import array_record_module
    self.shape = shape
    self.readers = [array_record_module.ArrayRecordReader(p) for p in paths]
    self.locks = [threading.Lock() for _ in paths]

  def __len__(self) -> int:
    return sum(r.num_records() for r in self.readers)

  def __getitem__(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64).reshape(-1)
    out = np.zeros((len(rows),) + self.shape, np.uint8)
    k, j = rows // CHUNK, rows % CHUNK
    for kk in np.unique(k):
      sel = np.nonzero(k == kk)[0]
      with self.locks[int(kk)]:
        records = self.readers[int(kk)].read([int(x) for x in j[sel]])
      for i, rec in zip(sel, records):
        out[i] = np.frombuffer(rec, np.uint8).reshape(self.shape)
    return out
