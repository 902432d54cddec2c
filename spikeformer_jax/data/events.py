"""Event-camera streams: native readers, SpikingJelly's integrations.

An event stream is a structured array `EVENT_DTYPE` (t in microseconds, x, y,
polarity p in {0, 1}), sorted by t. `frames_by_number` integrates it into T
frames of 2 polarity channels exactly as SpikingJelly's `split_by='number'`
(`cal_fixed_frames_number_segment_index` + `integrate_events_segment_to_frame`),
the integration every official DVS recipe uses, channels-last: [T, H, W, 2],
channel 0 OFF (p = 0), channel 1 ON; `frames_by_time` is `split_by='time'`.

The readers follow SpikingJelly's dataset code (spikingjelly/datasets/), so a
stream read here is the one SpikingJelly would save as `events_np`:
  * N-MNIST `.bin` / `.bs2` (`load_ATIS_bin`): `read_nmnist`, `iter_nmnist`.
  * DVS128 Gesture AEDAT 3.1 (`load_aedat_v3`) and its label CSVs
    (`DVS128Gesture.split_aedat_files_to_np`): `read_aedat31`,
    `gesture_samples`, `iter_gesture`.
  * CIFAR10-DVS AEDAT 2.0 (`cifar10_dvs.load_origin_data`):
    `read_cifar10dvs`, `iter_cifar10dvs`, `front_split`
    (`split_to_train_test_set(0.9, ds, 10, random_split=False)`).
`synthetic_image_events` and `synthetic_gesture_events` are the seeded,
vectorised generators of the offline-data spec (the synthetic event
datasets of data/sources.py). The writers of the native formats and of fake
downloads, the readers' inverses, are test fixtures: tests/event_fixtures.py.
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
import tarfile
import zipfile
from collections.abc import Iterator, Sequence

import numpy as np

from spikeformer_jax import errors

EVENT_DTYPE = np.dtype([('t', np.int64), ('x', np.int16), ('y', np.int16), ('p', np.int8)])
NMNIST_SIZE = (34, 34)


def read_nmnist(data: bytes) -> np.ndarray:
  """N-MNIST's native .bs2 records: 5 bytes per event, big-endian bit fields
  (byte 0 x, byte 1 y, bit 7 of byte 2 the polarity (1 = ON), the other 23
  bits the timestamp in microseconds)."""
  raw = np.frombuffer(data, np.uint8)
  if raw.size % 5:
    raise errors.DataError(
      f'N-MNIST record of {raw.size} bytes is not a whole number of '
      '5-byte events: the file is truncated or not N-MNIST.'
    )
  raw = raw.reshape(-1, 5).astype(np.int64)
  ev = np.empty(len(raw), EVENT_DTYPE)
  ev['x'], ev['y'] = raw[:, 0], raw[:, 1]
  ev['p'] = raw[:, 2] >> 7
  ev['t'] = ((raw[:, 2] & 0x7F) << 16) | (raw[:, 3] << 8) | raw[:, 4]
  return ev


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
  return _integrate(events, starts, np.append(starts[1:], n), h, w)


def load_nmnist_tar(path: str, T: int) -> dict:
  """Every sample of an N-MNIST tar (`<dir>/<id>.bs2` and the label lists
  `train*.txt` / `test*.txt`, lines `id class`, `#` comments) as frames:
  {'x_train': [N, T, 34, 34, 2] float32, 'y_train': [N] int64, 'x_test', 'y_test'}."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} does not exist: point data.path at an N-MNIST tar '
      '(<dir>/<id>.bs2 files and train/test label lists).'
    )
  out = {}
  for split in ('train', 'test'):
    samples = list(iter_nmnist_tar(path, split))
    out[f'x_{split}'] = np.stack([frames_by_number(ev, T, NMNIST_SIZE) for ev, _ in samples])
    out[f'y_{split}'] = np.asarray([label for _, label in samples], np.int64)
  return out


# ---------------------------------------------------------------------------
# Shared helpers.


def _make_events(t, x, y, p, sort: bool = False) -> np.ndarray:
  ev = np.empty(len(t), EVENT_DTYPE)
  ev['t'], ev['x'], ev['y'], ev['p'] = t, x, y, p
  if sort:
    ev = ev[np.argsort(ev['t'], kind='stable')]
  return ev


def _integrate(events: np.ndarray, starts, ends, h: int, w: int) -> np.ndarray:
  """Frames [T, H, W, 2] of the index ranges [starts[i], ends[i])."""
  index = events['p'].astype(np.int64) * h * w + events['y'].astype(np.int64) * w + events['x']
  frames = np.stack([np.bincount(index[s:e], minlength=2 * h * w) for s, e in zip(starts, ends)])
  return frames.reshape(len(starts), 2, h, w).transpose(0, 2, 3, 1).astype(np.float32)


def _sorted_walk(directory: str, suffix: str) -> list[str]:
  """Files under `directory` in torchvision `make_dataset` order (what
  SpikingJelly's DatasetFolder sees): sorted(os.walk(...)), then sorted names."""
  return [
    os.path.join(r, f)
    for r, _, fs in sorted(os.walk(directory, followlinks=True))
    for f in sorted(fs)
    if f.endswith(suffix)
  ]


def _junk(name: str) -> bool:
  """Archive members that are not data: macOS resource forks and folders."""
  return '__MACOSX' in name.split('/') or os.path.basename(name).startswith('._')


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


# ---------------------------------------------------------------------------
# Integration by time.


def frames_by_time(events: np.ndarray, T: int, H: int, W: int) -> np.ndarray:
  """T frames of equal time spans, float32 [T, H, W, 2] (SpikingJelly's
  `split_by='time'`, `cal_fixed_frames_number_segment_index`).

  With dt = (t[-1] - t[0]) // T (integer division), frame i holds the events
  with t0 + i dt <= t < t0 + (i + 1) dt, and the last frame every event from
  t0 + (T - 1) dt on, up to N (the floor leaves it the remainder). Events must
  be sorted by t. Where a window is empty SpikingJelly raises IndexError
  (`idx_masked[0]`); here that frame is empty instead.
  """
  if T < 1:
    raise ValueError(f'T={T}: frames_by_time needs T >= 1.')
  n = len(events)
  if n == 0:
    raise ValueError('frames_by_time needs at least one event (SpikingJelly reads t[-1]).')
  t = events['t'].astype(np.int64)
  if np.any(np.diff(t) < 0):
    raise ValueError('frames_by_time needs events sorted by t.')
  dt = (t[-1] - t[0]) // T
  t_l = t[0] + dt * np.arange(T)
  starts = np.searchsorted(t, t_l, side='left')
  ends = np.searchsorted(t, t_l + dt, side='left')
  ends[-1] = n
  return _integrate(events, starts, ends, H, W)


# ---------------------------------------------------------------------------
# Resizing frames.


@functools.lru_cache(maxsize=16)  # the loader resizes every example alike
def _resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's bilinear interpolation (align_corners=False)."""
  scale = n_in / n_out
  out = np.arange(n_out)
  if antialias:  # ATen's _upsample_bilinear2d_aa, the PIL resampling filter.
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (out + 0.5)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((center + support + 0.5).astype(np.int64), n_in)
    j = np.arange(n_in)[None, :]
    m = np.clip(1.0 - np.abs((j - center[:, None] + 0.5) * invscale), 0.0, None)
    m *= (j >= lo[:, None]) & (j < hi[:, None])
    return m / m.sum(1, keepdims=True)
  src = np.maximum(scale * (out + 0.5) - 0.5, 0.0)  # area_pixel_compute_source_index
  i0 = np.minimum(src.astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = src - i0
  m = np.zeros((n_out, n_in))
  np.add.at(m, (out, i0), 1.0 - lam)
  np.add.at(m, (out, i1), lam)
  return m


def resize_frames(frames: np.ndarray, size: int, antialias: bool = False) -> np.ndarray:
  """Bilinear resize of every frame and channel: [T, H, W, 2] -> float32 [T, size, size, 2].

  The SDT CIFAR10-DVS recipe (`dvs_utils.Resize(64)` in Spike-Driven-Transformer's
  train.py) applies `torchvision.transforms.Resize((64, 64))` to each [2, H, W]
  frame *tensor*. On tensors torchvision < 0.17 (the repo pins pytorch <= 2.0,
  so torchvision <= 0.15) does not antialias: the default here. Then a 2x
  reduction (128 -> 64) is exactly a 2x2 mean, so the total count shrinks by 4.
  `antialias=True` gives torchvision >= 0.17's default (the PIL filter).
  """
  frames = np.asarray(frames, np.float32)
  _, h, w, _ = frames.shape
  mh = _resize_matrix(h, size, antialias).astype(np.float32)
  mw = _resize_matrix(w, size, antialias).astype(np.float32)
  out = np.einsum('oh,thwc->towc', mh, frames)
  return np.einsum('pw,towc->topc', mw, out).astype(np.float32)


# ---------------------------------------------------------------------------
# DVS128 Gesture: AEDAT 3.1 recordings, label CSVs, trial lists.

GESTURE_NUM_CLASSES = 11
GESTURE_SIZE = (128, 128)
AEDAT31_END_HEADER = b'#!END-HEADER\r\n'
_AEDAT31_PACKET = struct.Struct('<HHIIIIII')  # the 28-byte event packet header
# torchvision's DatasetFolder, which SpikingJelly's DVS128Gesture subclasses,
# numbers the class folders '0'..'10' in *string* order ('0', '1', '10', '2',
# ...), so DVS128Gesture's target for label l (= class - 1) is this, not l.
SPIKINGJELLY_GESTURE_TARGET = tuple(
  sorted(str(i) for i in range(GESTURE_NUM_CLASSES)).index(str(label))
  for label in range(GESTURE_NUM_CLASSES)
)


def read_aedat31(data: bytes) -> np.ndarray:
  """DVS128 Gesture's AEDAT 3.1 recording, decoded as SpikingJelly's `load_aedat_v3`.

  '#' header lines up to '#!END-HEADER\\r\\n', then packets: a 28-byte header
  (eventType, eventSource, eventSize, eventTSOffset, eventTSOverflow,
  eventCapacity, eventNumber, eventValid; little-endian) and eventCapacity
  events of eventSize bytes. Polarity packets (type 1) give, per event, a
  uint32 `data` (x = data >> 17 & 0x7FFF, y = data >> 2 & 0x7FFF, p = data >> 1
  & 1) and a uint32 timestamp, t = timestamp | eventTSOverflow << 31. Other
  packet types are skipped. As SpikingJelly: all eventCapacity slots are
  decoded (eventNumber, eventValid and the per-event valid bit are not
  consulted) and the events keep file order.
  """
  pos = 0
  while True:  # SpikingJelly reads '#' lines until the END-HEADER line
    end = data.find(b'\n', pos)
    line = data[pos:] if end < 0 else data[pos : end + 1]
    if not line.startswith(b'#'):
      raise errors.DataError(
        'AEDAT 3.1: no #!END-HEADER line closes the header; not an AEDAT 3.1 file.'
      )
    pos += len(line)
    if line == AEDAT31_END_HEADER:
      break
  chunks = []
  while pos < len(data):
    if len(data) - pos < _AEDAT31_PACKET.size:
      raise errors.DataError(f'AEDAT 3.1: truncated packet header at byte {pos}.')
    e_type, _, e_size, _, e_overflow, e_capacity, _, _ = _AEDAT31_PACKET.unpack_from(data, pos)
    pos += _AEDAT31_PACKET.size
    body = data[pos : pos + e_capacity * e_size]
    pos += e_capacity * e_size
    if e_type != 1:
      continue
    if e_size < 8 or e_size % 4:
      raise errors.DataError(f'AEDAT 3.1: polarity events of {e_size} bytes (expected 8).')
    n = len(body) // e_size
    words = np.frombuffer(body, '<u4', count=n * e_size // 4).reshape(n, e_size // 4)
    aer = words[:, 0].astype(np.int64)
    t = words[:, 1].astype(np.int64) | (e_overflow << 31)
    chunks.append(_make_events(t, (aer >> 17) & 0x7FFF, (aer >> 2) & 0x7FFF, (aer >> 1) & 1))
  return np.concatenate(chunks) if chunks else np.empty(0, EVENT_DTYPE)


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
  """The bytes of a regular file in a tar (callers check member.isfile())."""
  f = tar.extractfile(member)
  if f is None:
    raise ValueError(f'{member.name}: not a regular file in the archive.')
  return f.read()


def read_trials(text: str) -> list[str]:
  """trials_to_train.txt / trials_to_test.txt: the recording file names, one
  per line, stripped, empty lines skipped (`DVS128Gesture.create_events_np_files`)."""
  return [line.strip() for line in text.splitlines() if line.strip()]


def _gesture_split(events: np.ndarray, labels_csv_text: str, stem: str):
  csv = np.loadtxt(
    io.StringIO(labels_csv_text), dtype=np.uint32, delimiter=',', skiprows=1, ndmin=2
  )
  count = [0] * GESTURE_NUM_CLASSES
  out = []
  t = events['t']
  for cls, start, end in csv[:, :3].astype(np.int64):
    label = int(cls) - 1
    if not 0 <= label < GESTURE_NUM_CLASSES:
      raise errors.DataError(f'{stem}: gesture class {cls} is outside 1..{GESTURE_NUM_CLASSES}.')
    out.append((events[(t >= start) & (t < end)], label, f'{stem}_{count[label]}'))
    count[label] += 1
  return out


def gesture_samples(events: np.ndarray, labels_csv_text: str) -> list[tuple[np.ndarray, int]]:
  """A recording's samples, as SpikingJelly's `DVS128Gesture.split_aedat_files_to_np`.

  The CSV (`<recording>_labels.csv`: a header line, then `class,startTime_usec,
  endTime_usec` rows, read by np.loadtxt(dtype=uint32, delimiter=',',
  skiprows=1)) gives one sample per row, in row order: the events with
  start <= t < end (a mask, so windows may overlap and share events) and
  label = class - 1 in 0..10.
  """
  return [(ev, label) for ev, label, _ in _gesture_split(events, labels_csv_text, 'recording')]


def spikingjelly_gesture_order(labels: Sequence[int], names: Sequence[str]) -> np.ndarray:
  """The permutation putting `iter_gesture(..., with_names=True)` samples in
  DVS128Gesture's index order: DatasetFolder walks the class folders str(label)
  in string order, then the files `<name>.npz` sorted by name."""
  return np.asarray(
    sorted(range(len(names)), key=lambda i: (str(labels[i]), f'{names[i]}.npz')), np.int64
  )


def _gesture_source(root: str, split: str) -> tuple[str, str]:
  if os.path.isfile(root):
    return 'tar', root
  for d in (root, os.path.join(root, 'DvsGesture')):
    if os.path.isfile(os.path.join(d, f'trials_to_{split}.txt')):
      return 'dir', d
  tgz = os.path.join(root, 'DvsGesture.tar.gz')
  if os.path.isfile(tgz):
    return 'tar', tgz
  raise FileNotFoundError(
    f'{root}: neither DvsGesture.tar.gz nor an extracted DvsGesture folder '
    f'(trials_to_{split}.txt, userXX_*.aedat, userXX_*_labels.csv).'
  )


def iter_gesture(root: str, split: str, with_names: bool = False) -> Iterator[tuple]:
  """Every DVS128 Gesture sample of a split: (events, label) or, with
  `with_names`, (events, label, name) with name SpikingJelly's npz stem
  `<recording>_<k>` (k counts that label's samples in the recording).

  `root` is DvsGesture.tar.gz itself, a folder holding it, or the extracted
  DvsGesture folder (or its parent). A tar is read in one sequential pass,
  nothing extracted to disk; recordings of the other split are dropped as soon
  as the trial list is known (recordings stored before it are held in memory).
  Order: the recordings in trials_to_<split>.txt order (the order SpikingJelly
  processes them), each recording's samples in CSV row order; labels are
  class - 1 (see `spikingjelly_gesture_order` and `SPIKINGJELLY_GESTURE_TARGET`
  for DVS128Gesture's own index order and targets). The real data give 1176
  train and 288 test samples (1464; 11 classes), as SpikingJelly.
  """
  if split not in ('train', 'test'):
    raise ValueError(f'split={split!r}: DVS128 Gesture has splits train and test.')
  kind, path = _gesture_source(root, split)
  gen = _iter_gesture_tar(path, split) if kind == 'tar' else _iter_gesture_dir(path, split)
  for ev, label, name in gen:
    yield (ev, label, name) if with_names else (ev, label)


def _iter_gesture_dir(d: str, split: str):
  with open(os.path.join(d, f'trials_to_{split}.txt')) as f:
    trials = read_trials(f.read())
  for fname in trials:
    stem = os.path.splitext(fname)[0]
    with open(os.path.join(d, f'{stem}_labels.csv')) as f:
      csv = f.read()
    yield from _gesture_split(read_aedat31(_read(os.path.join(d, fname))), csv, stem)


def _iter_gesture_tar(path: str, split: str):
  trials_name = f'trials_to_{split}.txt'
  order: list[str] | None = None
  wanted: set[str] | None = None
  files: dict[tuple[str, str], bytes] = {}
  done = 0
  with tarfile.open(path, 'r|*') as tar:  # a stream: one sequential pass
    for m in tar:
      if not m.isfile() or _junk(m.name):
        continue
      base = os.path.basename(m.name)
      if base == trials_name:
        order = [os.path.splitext(f)[0] for f in read_trials(_member_bytes(tar, m).decode())]
        wanted = set(order)
        files = {k: v for k, v in files.items() if k[0] in wanted}
      elif base.endswith('_labels.csv') or base.endswith('.aedat'):
        key = (
          (base[: -len('_labels.csv')], 'csv') if base.endswith('.csv') else (base[:-6], 'aedat')
        )
        if wanted is None or key[0] in wanted:
          files[key] = _member_bytes(tar, m)
      while (
        order is not None
        and done < len(order)
        and all((order[done], k) in files for k in ('csv', 'aedat'))
      ):
        stem = order[done]
        events = read_aedat31(files.pop((stem, 'aedat')))
        yield from _gesture_split(events, files.pop((stem, 'csv')).decode(), stem)
        done += 1
  if order is None:
    raise errors.DataError(f'{path}: no {trials_name} in the archive.')
  if done < len(order):
    stem = order[done]
    missing = [
      f'{stem}{s}'
      for k, s in (('aedat', '.aedat'), ('csv', '_labels.csv'))
      if (stem, k) not in files
    ]
    raise errors.DataError(f'{path}: {trials_name} lists {stem} but the archive lacks {missing}.')


# ---------------------------------------------------------------------------
# CIFAR10-DVS: AEDAT 2.0 files, 10 class folders or zips, SpikingJelly's split.

CIFAR10DVS_CLASSES = (
  'airplane',
  'automobile',
  'bird',
  'cat',
  'deer',
  'dog',
  'frog',
  'horse',
  'ship',
  'truck',
)
CIFAR10DVS_SIZE = (128, 128)


def _skip_hash_header(data: bytes) -> int:
  """Bytes of leading '#' lines, as cifar10_dvs.skip_header: a line is header
  while it decodes and, stripped, starts with '#'."""

  def line_at(pos):
    end = data.find(b'\n', pos)
    return data[pos:] if end < 0 else data[pos : end + 1]

  p = 0
  line = line_at(0)
  try:
    text = line.decode().strip()
  except UnicodeDecodeError:
    return 0
  while text and text[0] == '#':
    p += len(line)
    line = line_at(p)
    try:
      text = line.decode().strip()
    except UnicodeDecodeError:
      break
  return p


def read_cifar10dvs(data: bytes) -> np.ndarray:
  """A CIFAR10-DVS .aedat file as SpikingJelly's `CIFAR10DVS.load_origin_data`.

  After the '#' header lines, 8-byte big-endian records (uint32 address, uint32
  timestamp); x = (addr & 0xFE) >> 1, y = (addr & 0x7F00) >> 8, p = addr & 1,
  then SpikingJelly's remap t, x, y, p = t, 127 - y, 127 - x, 1 - p (its fix of
  jackd/events-tfds#1; the commented alternative `127 - x, y` matches the
  dataset's dat2mat.m). No filtering by the address's bit 31.
  """
  body = data[_skip_hash_header(data) :]
  if len(body) % 8:
    raise errors.DataError(f'CIFAR10-DVS: {len(body)} data bytes are not whole 8-byte events.')
  words = np.frombuffer(body, '>u4').reshape(-1, 2).astype(np.int64)
  addr = words[:, 0]
  x, y, p = (addr & 0xFE) >> 1, (addr & 0x7F00) >> 8, addr & 1
  return _make_events(words[:, 1], 127 - y, 127 - x, 1 - p)


def _cifar10dvs_listing(root: str) -> list[tuple[int, str, str]]:
  """(label, archive or '', path or member) of every sample, in SpikingJelly's order."""
  out: list[tuple[int, str, str]] = []
  for label, cls in enumerate(CIFAR10DVS_CLASSES):
    folder = os.path.join(root, cls)
    if os.path.isdir(folder):
      out.extend((label, '', path) for path in _sorted_walk(folder, '.aedat'))
    elif os.path.isfile(folder + '.zip'):
      with zipfile.ZipFile(folder + '.zip') as z:
        members = sorted(
          (os.path.basename(n), n) for n in z.namelist() if n.endswith('.aedat') and not _junk(n)
        )
      out.extend((label, folder + '.zip', member) for _, member in members)
    else:
      raise FileNotFoundError(
        f'{root}: no {cls}/ folder or {cls}.zip (CIFAR10-DVS needs all 10 '
        f'classes: {", ".join(CIFAR10DVS_CLASSES)}).'
      )
  return out


def cifar10dvs_labels(root: str) -> np.ndarray:
  """The label of every sample in `iter_cifar10dvs` order, from the listing alone."""
  return np.asarray([label for label, _, _ in _cifar10dvs_listing(root)], np.int64)


def iter_cifar10dvs(
  root: str, with_names: bool = False, indices: Sequence[int] | np.ndarray | None = None
) -> Iterator[tuple]:
  """Every CIFAR10-DVS sample: (events, label) or (events, label, name).

  `root` holds the 10 class folders (`airplane/cifar10_airplane_<i>.aedat`, ...)
  or the 10 downloaded `<class>.zip` archives. Order as SpikingJelly's
  CIFAR10DVS dataset (a torchvision DatasetFolder over events_np): classes in
  sorted name order (= CIFAR10DVS_CLASSES, label = index), each class's files
  sorted by *string* name (cifar10_airplane_0, _1, _10, _100, ..., _999), so
  `front_split`'s 'first 90%' is the string-sorted first 900 of each class.
  `indices`: only those samples (positions in that order), the others unread.
  """
  keep = None if indices is None else set(int(i) for i in indices)
  archives = {}
  try:
    for i, (label, archive, member) in enumerate(_cifar10dvs_listing(root)):
      if keep is not None and i not in keep:
        continue
      if archive:
        if archive not in archives:
          archives[archive] = zipfile.ZipFile(archive)
        data = archives[archive].read(member)
      else:
        data = _read(member)
      ev = read_cifar10dvs(data)
      name = os.path.splitext(os.path.basename(member))[0]
      yield (ev, label, name) if with_names else (ev, label)
  finally:
    for z in archives.values():
      z.close()


def front_split(
  labels: Sequence[int] | np.ndarray, train_ratio: float = 0.9, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """SpikingJelly's `split_to_train_test_set(train_ratio, ds, num_classes,
  random_split=False)` (also SDT's dvs_utils copy): for each class in turn, its
  first ceil(n_c * train_ratio) indices (dataset order) go to train, the rest
  to test. Returns (train_idx, test_idx), class-major as SpikingJelly's Subsets."""
  labels_ = np.asarray(labels, np.int64)
  if labels_.size and (labels_.min() < 0 or labels_.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes}).')
  train, test = [], []
  for c in range(num_classes):
    idx = np.flatnonzero(labels_ == c)
    pos = math.ceil(len(idx) * train_ratio)
    train.append(idx[:pos])
    test.append(idx[pos:])
  return np.concatenate(train).astype(np.int64), np.concatenate(test).astype(np.int64)


def iter_nmnist_tar(path: str, split: str) -> Iterator[tuple]:
  """(events, label) of one split of an N-MNIST tar (`<dir>/<id>.bs2` and the
  label lists `train*.txt` / `test*.txt`, as load_nmnist_tar), in list order."""
  if split not in ('train', 'test'):
    raise ValueError(f'split={split!r}: N-MNIST has splits train and test.')
  files: dict[str, bytes] = {}
  with tarfile.open(path) as tar:  # one sequential pass: a .tar.gz cannot seek cheaply
    for m in tar:
      if m.isfile():
        files[os.path.basename(m.name)] = _member_bytes(tar, m)
  lists = [n for n in files if n.startswith(split) and n.endswith('.txt')]
  if len(lists) != 1:
    raise errors.DataError(f'{path}: expected one {split}*.txt label list, found {lists}.')
  for line in files[lists[0]].decode().splitlines():
    if line.strip() and not line.startswith('#'):
      sample, label = line.split()
      if f'{sample}.bs2' not in files:
        raise errors.DataError(f'{path}: sample {sample} of {lists[0]} has no .bs2 file.')
      yield read_nmnist(files[f'{sample}.bs2']), int(label)


# ---------------------------------------------------------------------------
# N-MNIST in its distributed layout.


def iter_nmnist(root: str, split: str, with_names: bool = False) -> Iterator[tuple]:
  """Every N-MNIST sample of a split: (events, label) or (events, label, name).

  `root` holds Train.zip / Test.zip (as downloaded) or the extracted
  Train/<digit>/<id>.bin and Test/<digit>/<id>.bin. Order as SpikingJelly's
  NMNIST (DatasetFolder): class folders sorted by name, label = index in that
  order (= the digit), files sorted by name. 60000 train / 10000 test.
  """
  if split not in ('train', 'test'):
    raise ValueError(f'split={split!r}: N-MNIST has splits train and test.')
  sub = os.path.join(root, split.capitalize())
  if os.path.isdir(sub):
    classes = sorted(e.name for e in os.scandir(sub) if e.is_dir())
    for label, cls in enumerate(classes):
      for path in _sorted_walk(os.path.join(sub, cls), '.bin'):
        ev = read_nmnist(_read(path))
        name = os.path.splitext(os.path.basename(path))[0]
        yield (ev, label, name) if with_names else (ev, label)
  elif os.path.isfile(sub + '.zip'):
    with zipfile.ZipFile(sub + '.zip') as z:
      by_class: dict[str, list[str]] = {}
      for n in z.namelist():
        if n.endswith('.bin') and not _junk(n):
          by_class.setdefault(n.split('/')[-2] if '/' in n else '', []).append(n)
      for label, cls in enumerate(sorted(by_class)):
        for member in sorted(by_class[cls], key=os.path.basename):
          name = os.path.splitext(os.path.basename(member))[0]
          ev = read_nmnist(z.read(member))
          yield (ev, label, name) if with_names else (ev, label)
  else:
    raise FileNotFoundError(
      f'{root}: no {split.capitalize()}/ folder or {split.capitalize()}.zip '
      '(the N-MNIST download: Train.zip, Test.zip).'
    )


# ---------------------------------------------------------------------------
# Synthetic events (offline-data spec, "Event data").


def _contrast_events(
  log_i: np.ndarray, thresholds: np.ndarray, step_us: float, rng: np.random.Generator
):
  """v2e-like DVS pixels: a signed event per threshold crossed since the pixel's
  reference log intensity, the reference then moved by those thresholds.
  log_i [K + 1, H, W]; step k's events get uniform jitter within the step."""
  ref = log_i[0].astype(np.float32)
  counts = np.empty((len(log_i) - 1,) + ref.shape, np.int16)
  for k in range(1, len(log_i)):
    n = np.trunc((log_i[k] - ref) / thresholds)
    ref += n * thresholds
    counts[k - 1] = n
  flat = np.flatnonzero(counts)
  c = counts.ravel()[flat].astype(np.int64)
  step, rest = np.divmod(flat, ref.size)
  y, x = np.divmod(rest, ref.shape[1])
  reps = np.abs(c)
  step, y, x, p = (np.repeat(a, reps) for a in (step, y, x, c > 0))
  t = np.floor((step + rng.random(len(step))) * step_us).astype(np.int64)
  return t, x, y, p


def _noise(rng: np.random.Generator, rate_hz: float, sensor, duration_us: int):
  h, w = sensor
  n = rng.poisson(rate_hz * h * w * duration_us * 1e-6)
  return (
    rng.integers(0, duration_us, n),
    rng.integers(0, w, n),
    rng.integers(0, h, n),
    rng.integers(0, 2, n),
  )


def _sample_matrix(u: np.ndarray, n: int) -> np.ndarray:
  """[..., m] source coordinates (pixel units) -> [..., m, n] bilinear weights, 0 outside."""
  i0 = np.floor(u).astype(np.int64).ravel()
  f = (u - np.floor(u)).ravel()
  m = np.zeros((u.size, n), np.float32)
  rows = np.arange(u.size)
  for idx, wt in ((i0, 1.0 - f), (i0 + 1, f)):
    ok = (idx >= 0) & (idx < n)
    m[rows[ok], idx[ok]] += wt[ok]
  return m.reshape(u.shape + (n,))


def _gray(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3:
    luma = np.array([0.299, 0.587, 0.114])
    image = image[..., 0] if image.shape[-1] == 1 else image[..., :3] @ luma
  if image.ndim != 2:
    raise ValueError(f'image of shape {image.shape}: expected HW or HWC.')
  return image.astype(np.float32) / 255.0


def synthetic_image_events(
  image: np.ndarray,
  rng: np.random.Generator,
  sensor=(128, 128),
  *,
  n_steps: int = 60,
  duration_us: int = 300_000,
  contrast: float = 0.15,
  threshold_sigma: float = 0.03,
  noise_hz: float = 0.5,
  amplitude: float | None = None,
  eps: float = 0.1,
) -> np.ndarray:
  """Events of a static image moved along a saccade (CIFAR10-DVS / N-MNIST style).

  The image (uint8 HW or HWC, to luma) is scaled to fill the sensor less the
  saccade margin and moved along a closed triangle of side `amplitude` pixels
  (default 4% of the sensor, random orientation) in `n_steps` sub-steps over
  `duration_us`. Each pixel fires per crossing of its contrast threshold
  (`contrast`, per-pixel N(0, threshold_sigma) mismatch) in log(I + eps), then
  resets its reference; timestamps are jittered within the sub-step; Poisson
  background noise of `noise_hz` per pixel. Sorted EVENT_DTYPE; deterministic
  given the rng state.
  """
  gray = _gray(image)
  h, w = gray.shape
  sh, sw = sensor
  amp = 0.04 * min(sh, sw) if amplitude is None else amplitude
  amp *= rng.uniform(0.9, 1.1)
  scale = min((sh - 2 * amp - 2) / h, (sw - 2 * amp - 2) / w)
  oy, ox = (sh - h * scale) / 2 - amp / 2, (sw - w * scale) / 2 - amp / 2
  theta = rng.uniform(0, 2 * np.pi)
  corners = np.array([[0, 0], [1, 0], [0.5, np.sqrt(0.75)], [0, 0]]) * amp
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  corners = (corners - corners[:3].mean(0)) @ rot.T + amp / 2
  s = np.linspace(0, 3, n_steps + 1)  # arc parameter: 3 equal sides
  seg = np.minimum(s.astype(np.int64), 2)
  pos = corners[seg] + (s - seg)[:, None] * (corners[seg + 1] - corners[seg])  # [K+1, 2] (dx, dy)
  v = (np.arange(sh) + 0.5 - oy - pos[:, 1:2]) / scale - 0.5  # [K+1, H] source rows
  u = (np.arange(sw) + 0.5 - ox - pos[:, 0:1]) / scale - 0.5
  intensity = _sample_matrix(v, h) @ gray @ _sample_matrix(u, w).transpose(0, 2, 1)
  log_i = np.log(intensity + eps)
  thresholds = np.maximum(contrast + threshold_sigma * rng.standard_normal(sensor), 0.01 * contrast)
  t, x, y, p = _contrast_events(log_i, thresholds.astype(np.float32), duration_us / n_steps, rng)
  nt, nx, ny, np_ = _noise(rng, noise_hz, sensor, duration_us)
  return _make_events(
    np.concatenate([t, nt]),
    np.concatenate([x, nx]),
    np.concatenate([y, ny]),
    np.concatenate([p, np_]),
    sort=True,
  )


def _gesture_tracks(label: int, tt: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  """Blob centres [K + 1, 2] (x, y in sensor fractions, y down) of a gesture class."""
  w = 2 * np.pi * rng.uniform(0.8, 1.3)
  ph = rng.uniform(0, 2 * np.pi)
  a = rng.uniform(0.12, 0.18)
  c = np.array([0.5, 0.5]) + rng.uniform(-0.04, 0.04, 2)
  one = lambda x, y: np.stack([np.broadcast_to(x, tt.shape), np.broadcast_to(y, tt.shape)], 1)
  right, left = c + [-0.2, 0], c + [0.2, 0]  # the subject's right hand is on the image's left
  if label == 0:  # hand clap: two hands meet and part
    d = 0.05 + a * (1 + np.cos(w * tt + ph)) / 2
    return [one(c[0] - d, c[1]), one(c[0] + d, c[1])]
  if label in (1, 2):  # right / left hand wave: horizontal swing with a small arc
    h = right if label == 1 else left
    return [
      one(h[0] + 0.6 * a * np.sin(w * tt + ph), h[1] - 0.12 - 0.2 * a * np.cos(2 * (w * tt + ph)))
    ]
  if label in (3, 4, 5, 6):  # right / left arm, clockwise / counter-clockwise circles
    h = right if label in (3, 4) else left
    sign = 1.0 if label in (3, 5) else -1.0  # y down: increasing angle turns clockwise
    ang = sign * w * tt + ph
    return [one(h[0] + a * np.cos(ang), h[1] + a * np.sin(ang))]
  if label == 7:  # arm roll: two hands circling each other
    ang = 2 * w * tt + ph
    r = 0.4 * a
    return [
      one(c[0] + r * np.cos(ang), c[1] + 0.1 + r * np.sin(ang)),
      one(c[0] - r * np.cos(ang), c[1] + 0.1 - r * np.sin(ang)),
    ]
  if label == 8:  # air drums: hands beating up and down in turn
    return [
      one(c[0] - 0.12, c[1] + 0.1 + 0.5 * a * np.sin(2 * w * tt + ph)),
      one(c[0] + 0.12, c[1] + 0.1 + 0.5 * a * np.sin(2 * w * tt + ph + np.pi)),
    ]
  if label == 9:  # air guitar: strumming hand plus a slow fretting hand
    return [
      one(c[0] + 0.08, c[1] + 0.15 + 0.6 * a * np.sin(2.5 * w * tt + ph)),
      one(c[0] - 0.22 + 0.03 * np.sin(0.5 * w * tt), c[1] - 0.05 + 0.03 * np.cos(0.5 * w * tt)),
    ]
  if label == 10:  # other: a smoothed random walk
    v = rng.standard_normal((len(tt), 2))
    kernel = np.hanning(min(25, len(tt)) + 2)[1:-1]  # no longer than the track ('same')
    v = np.stack([np.convolve(v[:, i], kernel / kernel.sum(), mode='same') for i in range(2)], 1)
    path = np.cumsum(v, 0) * 0.02
    path -= path.mean(0)
    return [np.clip(c + path, 0.15, 0.85)]
  raise ValueError(f'label={label}: DVS128 Gesture has classes 0..{GESTURE_NUM_CLASSES - 1}.')


def synthetic_gesture_events(
  label: int,
  rng: np.random.Generator,
  sensor=(128, 128),
  *,
  duration_us: int | None = None,
  step_us: int = 10_000,
  contrast: float = 0.15,
  threshold_sigma: float = 0.03,
  noise_hz: float = 0.5,
  sigma: float = 0.045,
  background: float = 0.25,
  brightness: float = 0.6,
) -> np.ndarray:
  """Events of one DVS128-Gesture-style sample of class `label` (0..10).

  One or two Gaussian blobs (hands, std `sigma` x sensor) on `background`
  follow class-specific trajectories for `duration_us` (default uniform
  1-6 s): 0 clap, 1/2 right/left hand wave, 3/4 right arm clockwise /
  counter-clockwise, 5/6 left arm clockwise / counter-clockwise, 7 arm roll,
  8 air drums, 9 air guitar, 10 other (a random walk), with random speed,
  phase, size and centre. Pixels fire as in `synthetic_image_events` at
  `step_us` steps, plus Poisson noise of `noise_hz` per pixel. Sorted
  EVENT_DTYPE; deterministic given the rng state.
  """
  if not 0 <= label < GESTURE_NUM_CLASSES:
    raise ValueError(f'label={label}: DVS128 Gesture has classes 0..{GESTURE_NUM_CLASSES - 1}.')
  sh, sw = sensor
  if duration_us is None:
    duration_us = int(rng.uniform(1.0, 6.0) * 1e6)
  k = max(2, int(round(duration_us / step_us)))
  tt = np.linspace(0.0, duration_us * 1e-6, k + 1)
  tracks = _gesture_tracks(label, tt, rng)
  s = sigma * min(sh, sw) * rng.uniform(0.85, 1.15)
  thresholds = np.maximum(contrast + threshold_sigma * rng.standard_normal(sensor), 0.01 * contrast)
  # Only pixels within 6 std of a blob centre ever change (by more than
  # exp(-18) of the blob): render and threshold that box alone.
  centres = np.concatenate(tracks) * [sw, sh]
  x0, y0 = np.maximum(np.floor(centres.min(0) - 6 * s), 0).astype(int)
  x1, y1 = np.minimum(np.ceil(centres.max(0) + 6 * s), [sw, sh]).astype(int)
  ys = np.arange(y0, y1, dtype=np.float32) + 0.5
  xs = np.arange(x0, x1, dtype=np.float32) + 0.5
  intensity = np.full((k + 1, len(ys), len(xs)), background, np.float32)
  for tr in tracks:
    gx = (brightness * np.exp(-0.5 * ((xs[None] - tr[:, :1] * sw) / s) ** 2)).astype(np.float32)
    gy = np.exp(-0.5 * ((ys[None] - tr[:, 1:] * sh) / s) ** 2).astype(np.float32)
    intensity += gy[:, :, None] * gx[:, None, :]
  np.log(intensity, out=intensity)
  t, x, y, p = _contrast_events(
    intensity, thresholds[y0:y1, x0:x1].astype(np.float32), duration_us / k, rng
  )
  x, y = x + x0, y + y0
  nt, nx, ny, np_ = _noise(rng, noise_hz, sensor, duration_us)
  return _make_events(
    np.concatenate([t, nt]),
    np.concatenate([x, nx]),
    np.concatenate([y, ny]),
    np.concatenate([p, np_]),
    sort=True,
  )


def procedural_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
  """A seeded uint8 [size, size] image whose grating orientation encodes the label."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  ang = np.pi * label / 10 + rng.normal(0, 0.05)
  freq = rng.uniform(2.0, 4.0)
  grating = np.cos(2 * np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang)) + rng.uniform(0, 6.3))
  cy, cx = rng.uniform(0.3, 0.7, 2)
  blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
  img = 0.5 + 0.3 * grating + 0.3 * blob + 0.05 * rng.standard_normal((size, size))
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)
