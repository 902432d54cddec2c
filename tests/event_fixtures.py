"""Event-file fixtures: writers of the native formats (each reader's inverse in
spikeformer_jax/data/events.py) and small synthetic downloads in the
distributed layouts (`write_*_tree`), for the tests of the readers, the
builders and prepare.py. Test code: the library only reads these formats.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Callable, Sequence

import numpy as np

from spikeformer_jax.data import events

CIFAR10DVS_HEADER = (
  b'#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n'
  b'# Data format is int32 address, int32 timestamp (8 bytes total), '
  b'repeated for each event\r\n# Timestamps tick is 1 us\r\n'
)


def write_nmnist(ev: np.ndarray) -> bytes:
  """The inverse of events.read_nmnist."""
  t = ev['t'].astype(np.int64)
  if t.min(initial=0) < 0 or t.max(initial=0) >= 1 << 23:
    raise ValueError('N-MNIST timestamps must lie in [0, 2**23) microseconds.')
  out = np.stack(
    [ev['x'], ev['y'], (ev['p'].astype(np.int64) << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF], 1
  )
  return out.astype(np.uint8).tobytes()


def write_aedat31(ev: np.ndarray, packet_size: int = 4096) -> bytes:
  """The inverse of events.read_aedat31: a DVS128 AEDAT 3.1 file of polarity packets
  (a new packet wherever t >> 31, the overflow, changes)."""
  t = ev['t'].astype(np.int64)
  x, y, p = (ev[k].astype(np.int64) for k in 'xyp')
  if t.min(initial=0) < 0:
    raise ValueError('AEDAT 3.1 timestamps must be >= 0.')
  if (
    min(x.min(initial=0), y.min(initial=0)) < 0 or max(x.max(initial=0), y.max(initial=0)) > 0x7FFF
  ):
    raise ValueError('AEDAT 3.1 coordinates must lie in [0, 32767].')
  aer = (x << 17) | (y << 2) | (p << 1) | 1  # bit 0: the valid mark
  overflow = t >> 31
  words = np.stack([aer, t & 0x7FFFFFFF], 1).astype('<u4')
  out = [b'#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n', events.AEDAT31_END_HEADER]
  runs = np.concatenate([[0], np.flatnonzero(np.diff(overflow)) + 1, [len(t)]])
  for a, b in zip(runs[:-1], runs[1:]):
    for s in range(a, b, packet_size):
      e = min(s + packet_size, b)
      out.append(events._AEDAT31_PACKET.pack(1, 1, 8, 4, int(overflow[s]), e - s, e - s, e - s))
      out.append(words[s:e].tobytes())
  return b''.join(out)


def write_cifar10dvs(ev: np.ndarray) -> bytes:
  """The inverse of events.read_cifar10dvs (x, y in [0, 127], t in [0, 2**32))."""
  t = ev['t'].astype(np.int64)
  x, y, p = (ev[k].astype(np.int64) for k in 'xyp')
  if min(x.min(initial=0), y.min(initial=0)) < 0 or max(x.max(initial=0), y.max(initial=0)) > 127:
    raise ValueError('CIFAR10-DVS coordinates must lie in [0, 127].')
  if t.min(initial=0) < 0 or t.max(initial=0) >= 1 << 32:
    raise ValueError('CIFAR10-DVS timestamps must lie in [0, 2**32).')
  addr = ((127 - x) << 8) | ((127 - y) << 1) | (1 - p)  # raw y = 127 - x, raw x = 127 - y
  return CIFAR10DVS_HEADER + np.stack([addr, t], 1).astype('>u4').tobytes()


def write_gesture_tree(
  root: str,
  users: Sequence[int] = (1, 2, 24),
  lightings: Sequence[str] = ('fluorescent', 'led'),
  labels: Sequence[int] = tuple(range(events.GESTURE_NUM_CLASSES)) + (7,),
  *,
  first_test_user: int = 24,
  archive: bool = False,
  seed: int = 0,
  gesture_us: tuple[int, int] = (300_000, 600_000),
  sensor=(128, 128),
) -> dict:
  """A synthetic DVS128 Gesture download under `root`: DvsGesture/ with, per
  user and lighting, `userXX_<lighting>.aedat` (one recording: a synthetic
  gesture per entry of `labels`, noise-only gaps between them) and its
  `_labels.csv`, plus trials_to_train.txt (users < first_test_user) and
  trials_to_test.txt; with `archive`, DvsGesture.tar.gz holding that folder
  instead. Returns {'train': [(events, label, name)], 'test': [...]} in
  `iter_gesture` order."""
  rng = np.random.default_rng(seed)
  files, expected = {}, {'train': [], 'test': []}
  trials = {'train': [], 'test': []}
  for user in users:
    split = 'train' if user < first_test_user else 'test'
    for light in lightings:
      stem = f'user{user:02d}_{light}'
      cursor = int(rng.integers(1_000_000, 80_000_000))  # recordings start late, as the real ones
      parts, rows, count = [], [], [0] * events.GESTURE_NUM_CLASSES
      for label in labels:
        gap = int(rng.integers(50_000, 200_000))
        nt, nx, ny, np_ = events._noise(
          rng, 5.0, sensor, gap
        )  # unlabelled: must not reach a sample
        parts.append(events._make_events(nt + cursor, nx, ny, np_, sort=True))
        start = cursor + gap
        dur = int(rng.integers(*gesture_us))
        ev = events.synthetic_gesture_events(label, rng, sensor, duration_us=dur)
        ev['t'] += start
        parts.append(ev)
        rows.append(f'{label + 1},{start},{start + dur}')
        expected[split].append((ev, label, f'{stem}_{count[label]}'))
        count[label] += 1
        cursor = start + dur
      files[f'{stem}.aedat'] = write_aedat31(np.concatenate(parts))
      files[f'{stem}_labels.csv'] = (
        'class,startTime_usec,endTime_usec\r\n' + '\r\n'.join(rows) + '\r\n'
      ).encode()
      trials[split].append(f'{stem}.aedat')
  for split in ('train', 'test'):
    files[f'trials_to_{split}.txt'] = ('\r\n'.join(trials[split]) + '\r\n\r\n').encode()
  os.makedirs(root, exist_ok=True)
  if archive:
    with tarfile.open(os.path.join(root, 'DvsGesture.tar.gz'), 'w:gz') as tar:
      for name in sorted(files):
        info = tarfile.TarInfo(f'DvsGesture/{name}')
        info.size = len(files[name])
        tar.addfile(info, io.BytesIO(files[name]))
  else:
    d = os.path.join(root, 'DvsGesture')
    os.makedirs(d, exist_ok=True)
    for name, payload in files.items():
      with open(os.path.join(d, name), 'wb') as f:
        f.write(payload)
  return expected


def write_cifar10dvs_tree(
  root: str,
  per_class: int,
  *,
  zipped: bool = False,
  seed: int = 0,
  image_fn: Callable | None = None,
  sensor=(128, 128),
  **gen_kwargs,
) -> dict:
  """A synthetic CIFAR10-DVS download under `root`: `<class>/cifar10_<class>_<i>.aedat`
  for i < per_class, or (`zipped`) the 10 `<class>.zip` holding those folders.
  Images come from `image_fn(label, i, rng)` (default: a seeded grating whose
  orientation encodes the class) through `events.synthetic_image_events(..., sensor,
  **gen_kwargs)`. Returns {name: (events, label)}."""
  rng = np.random.default_rng(seed)
  image_fn = image_fn or (lambda label, i, r: events.procedural_image(label, r))
  os.makedirs(root, exist_ok=True)
  out = {}
  for label, cls in enumerate(events.CIFAR10DVS_CLASSES):
    payloads = {}
    for i in range(per_class):
      name = f'cifar10_{cls}_{i}'
      ev = events.synthetic_image_events(image_fn(label, i, rng), rng, sensor, **gen_kwargs)
      payloads[f'{cls}/{name}.aedat'] = write_cifar10dvs(ev)
      out[name] = (ev, label)
    if zipped:
      with zipfile.ZipFile(os.path.join(root, f'{cls}.zip'), 'w', zipfile.ZIP_DEFLATED) as z:
        for member, payload in payloads.items():
          z.writestr(member, payload)
    else:
      os.makedirs(os.path.join(root, cls), exist_ok=True)
      for member, payload in payloads.items():
        with open(os.path.join(root, member), 'wb') as f:
          f.write(payload)
  return out


def write_nmnist_tree(
  root: str,
  per_class: int,
  *,
  splits: Sequence[str] = ('train', 'test'),
  zipped: bool = False,
  seed: int = 0,
  image_fn: Callable | None = None,
  **gen_kwargs,
) -> dict:
  """A synthetic N-MNIST download under `root`: `Train/<digit>/<id>.bin` and
  `Test/...` (ids zero-padded to 5 digits, shuffled across classes as in the
  real data), or (`zipped`) Train.zip / Test.zip holding those folders. Events
  from `events.synthetic_image_events` of a 28x28 image on the 34x34 sensor. Returns
  {split: {name: (events, label)}}."""
  rng = np.random.default_rng(seed)
  image_fn = image_fn or (lambda label, i, r: events.procedural_image(label, r, 28))
  os.makedirs(root, exist_ok=True)
  out = {}
  for split in splits:
    top = split.capitalize()
    ids = rng.permutation(10 * per_class) + 1
    payloads, out[split] = {}, {}
    for label in range(10):
      for i in range(per_class):
        name = f'{ids[label * per_class + i]:05d}'
        ev = events.synthetic_image_events(
          image_fn(label, i, rng), rng, events.NMNIST_SIZE, **gen_kwargs
        )
        payloads[f'{top}/{label}/{name}.bin'] = write_nmnist(ev)
        out[split][name] = (ev, label)
    if zipped:
      with zipfile.ZipFile(os.path.join(root, f'{top}.zip'), 'w', zipfile.ZIP_DEFLATED) as z:
        for member, payload in payloads.items():
          z.writestr(member, payload)
    else:
      for member, payload in payloads.items():
        os.makedirs(os.path.dirname(os.path.join(root, member)), exist_ok=True)
        with open(os.path.join(root, member), 'wb') as f:
          f.write(payload)
  return out
