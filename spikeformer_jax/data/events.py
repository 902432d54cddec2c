"""Event-camera streams: the native N-MNIST reader and integration into frames.

An event stream is a structured array `EVENT_DTYPE` (t in microseconds, x, y,
polarity p in {0, 1}), sorted by t. `frames_by_number` integrates it into T
frames of 2 polarity channels exactly as SpikingJelly's `split_by='number'`
(`cal_fixed_frames_number_segment_index` + `integrate_events_segment_to_frame`),
the integration every official DVS recipe uses, channels-last: [T, H, W, 2],
channel 0 OFF (p = 0), channel 1 ON.
"""

from __future__ import annotations

import os
import tarfile

import numpy as np

EVENT_DTYPE = np.dtype([('t', np.int64), ('x', np.int16), ('y', np.int16), ('p', np.int8)])
NMNIST_SIZE = (34, 34)


def read_nmnist(data: bytes) -> np.ndarray:
  """N-MNIST's native .bs2 records: 5 bytes per event, big-endian bit fields
  (byte 0 x, byte 1 y, bit 7 of byte 2 the polarity (1 = ON), the other 23
  bits the timestamp in microseconds)."""
  raw = np.frombuffer(data, np.uint8)
  if raw.size % 5:
    raise ValueError(f'N-MNIST record of {raw.size} bytes is not a whole number of '
                     '5-byte events: the file is truncated or not N-MNIST.')
  raw = raw.reshape(-1, 5).astype(np.int64)
  ev = np.empty(len(raw), EVENT_DTYPE)
  ev['x'], ev['y'] = raw[:, 0], raw[:, 1]
  ev['p'] = raw[:, 2] >> 7
  ev['t'] = ((raw[:, 2] & 0x7F) << 16) | (raw[:, 3] << 8) | raw[:, 4]
  return ev


def write_nmnist(events: np.ndarray) -> bytes:
  """The inverse of read_nmnist (for tests and synthetic data)."""
  t = events['t'].astype(np.int64)
  if t.min(initial=0) < 0 or t.max(initial=0) >= 1 << 23:
    raise ValueError('N-MNIST timestamps must lie in [0, 2**23) microseconds.')
  out = np.stack([events['x'], events['y'],
                  (events['p'].astype(np.int64) << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF], 1)
  return out.astype(np.uint8).tobytes()


def frames_by_number(events: np.ndarray, T: int, size: tuple[int, int]) -> np.ndarray:
  """T frames of (almost) equal event counts, float32 [T, H, W, 2].

  With N events and di = N // T, frame i holds events [i di, (i + 1) di) and
  the last frame the rest, up to N (SpikingJelly's split_by='number').
  """
  if T < 1:
    raise ValueError(f'T={T}: frames_by_number needs T >= 1.')
  h, w = size
  n = len(events)
  di = n // T
  starts = np.arange(T) * di
  ends = np.append(starts[1:], n)
  index = events['p'].astype(np.int64) * h * w + events['y'].astype(np.int64) * w + events['x']
  frames = np.stack([np.bincount(index[s:e], minlength=2 * h * w) for s, e in zip(starts, ends)])
  return frames.reshape(T, 2, h, w).transpose(0, 2, 3, 1).astype(np.float32)


def load_nmnist_tar(path: str, T: int) -> dict:
  """Every sample of an N-MNIST tar (`<dir>/<id>.bs2` and the label lists
  `train*.txt` / `test*.txt`, lines `id class`, `#` comments) as frames:
  {'x_train': [N, T, 34, 34, 2] float32, 'y_train': [N] int64, 'x_test', 'y_test'}."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: point data.path at an N-MNIST tar '
                            '(<dir>/<id>.bs2 files and train/test label lists).')
  files = {}
  with tarfile.open(path) as tar:  # one sequential pass: a .tar.gz cannot seek cheaply
    for m in tar:
      if m.isfile():
        files[os.path.basename(m.name)] = tar.extractfile(m).read()
  out = {}
  for split in ('train', 'test'):
    lists = [n for n in files if n.startswith(split) and n.endswith('.txt')]
    if len(lists) != 1:
      raise ValueError(f'{path}: expected one {split}*.txt label list, found {lists}.')
    lines = files[lists[0]].decode().splitlines()
    pairs = [l.split() for l in lines if l.strip() and not l.startswith('#')]
    missing = [s for s, _ in pairs if f'{s}.bs2' not in files]
    if missing:
      raise ValueError(f'{path}: {len(missing)} samples of {lists[0]} have no .bs2 file '
                       f'(first: {missing[0]}).')
    out[f'x_{split}'] = np.stack([frames_by_number(read_nmnist(files[f'{s}.bs2']), T, NMNIST_SIZE)
                                  for s, _ in pairs])
    out[f'y_{split}'] = np.asarray([int(c) for _, c in pairs], np.int64)
  return out
