"""Random-access dataset sources: `len(src)` and `src[indices] -> dict of arrays`.

The loader needs random access by an index array (`src[idx]` -> dict of
stacked arrays) plus `num_classes`, `mean`, `std` and `image_shape`; a
`tfds.data_source` (ArrayRecord) fits behind a thin adapter that stacks its
records. Images are returned as stored (uint8 HWC for real images);
normalisation happens in the loader with the source's `mean` / `std`.

  * digits:    scikit-learn's bundled handwritten digits (1797 real 8x8
               images, 10 classes; no download), a fixed stratified split.
  * synthetic: seeded random data with class-dependent structure, at any
               shape: uint8 images (CIFAR 32x32x3, ImageNet 224x224x3) or,
               for a 4-D shape [T, H, W, 2], Poisson event counts fed raw
               (as the official DVS models take them).
  * synthetic_events: seeded synthetic event-camera recordings (gesture-like
               blobs on 11 class trajectories, or CIFAR10-DVS-like saccades over
               class images) integrated into [T, H, W, 2] frames by event count,
               as the real DVS datasets are: the offline stand-in for them.
  * npz:       any .npz with x_train / y_train / x_test / y_test arrays
               (a local path, or gs://BUCKET/x.npz: downloaded whole).
"""

from __future__ import annotations

import dataclasses
import functools
import zipfile
import zlib

import numpy as np

from spikeformer_jax import errors
from spikeformer_jax import extras

SPLITS = ('train', 'test')


@dataclasses.dataclass
class ArraySource:
  """An in-memory split: images [N, ...] and integer labels [N].

  `mean` / `std` normalise uint8 images; None passes values through raw.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  mean: tuple | None
  std: tuple | None

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, idx) -> dict:
    return {'image': self.images[idx], 'label': self.labels[idx]}

  @property
  def image_shape(self) -> tuple:
    return tuple(self.images.shape[1:])


def _check_split(split):
  if split not in SPLITS:
    raise errors.ConfigError(f'split={split!r}; valid: {SPLITS}.')


def digits(split: str, *, test_fraction: float = 0.2, seed: int = 0, size: int = 8) -> ArraySource:
  """scikit-learn's handwritten digits (UCI), 8x8 grey levels 0..16.

  The held-out split is fixed: a stratified 20% (359 test, 1438 train images) chosen with
  `seed`, the same on every machine. `size` > 8 upsamples by pixel repetition.
  """
  _check_split(split)
  sk_datasets = extras.require(
    'sklearn.datasets', extra='digits', package='scikit-learn', needed_for="data.name='digits'"
  )
  d = sk_datasets.load_digits()
  images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(labels), bool)
  for c in range(10):  # stratified: the same fraction of every class
    idx = np.flatnonzero(labels == c)
    test[rng.choice(idx, int(round(test_fraction * len(idx))), replace=False)] = True
  keep = test if split == 'test' else ~test
  images = images[keep]
  if size != 8:
    if size % 8:
      raise errors.ConfigError(f'data.image_size={size} for digits must be a multiple of 8.')
    images = images.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
  # Mean and std of the training images, on the 0..1 scale.
  return ArraySource(images, labels[keep], 10, mean=(0.3051,), std=(0.3757,))


def synthetic(
  split: str, *, shape: tuple, num_classes: int, num_examples: int, seed: int = 0
) -> ArraySource:
  """Seeded random data around a random per-class pattern: learnable,
  deterministic. Images: uint8, normalised. Event frames (4-D shape): Poisson
  counts with a class-dependent rate, passed raw."""
  _check_split(split)
  shape = tuple(shape)
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  pattern_rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  if len(shape) == 4:  # [T, H, W, polarity]: event counts
    rates = pattern_rng.uniform(0.0, 1.0, (num_classes,) + shape).astype(np.float32)
    frames = rng.poisson(rates[labels]).astype(np.float32)
    return ArraySource(frames, labels, num_classes, mean=None, std=None)
  patterns = pattern_rng.integers(0, 256, (num_classes,) + shape, dtype=np.uint8)
  noise = rng.integers(0, 256, (num_examples,) + shape, dtype=np.uint8)
  images = ((noise.astype(np.uint16) + patterns[labels]) // 2).astype(np.uint8)
  c = shape[-1]
  return ArraySource(images, labels, num_classes, mean=(0.5,) * c, std=(0.25,) * c)


SYNTHETIC_KINDS = ('gesture', 'image')


@functools.lru_cache(maxsize=4)
def synthetic_events(
  split: str,
  *,
  shape: tuple,
  num_classes: int,
  num_examples: int,
  seed: int = 0,
  kind: str = 'gesture',
) -> ArraySource:
  """`num_examples` seeded recordings of the event generator in
  spikeformer_jax.data.events, integrated into shape = (T, H, W, 2) frames
  (split_by='number'), raw counts. Generated once per process (cached)."""
  from spikeformer_jax.data import events  # pylint: disable=import-outside-toplevel

  _check_split(split)
  T, h, w, c = shape
  if c != 2:
    raise errors.ConfigError(f'synthetic_events: shape {shape} must end in 2 polarity channels.')
  if kind not in SYNTHETIC_KINDS:
    raise errors.ConfigError(f'data.synthetic_kind={kind!r}; valid: {SYNTHETIC_KINDS}.')
  if kind == 'gesture' and num_classes > events.GESTURE_NUM_CLASSES:
    raise errors.ConfigError(
      f'synthetic gestures have {events.GESTURE_NUM_CLASSES} classes, not {num_classes}.'
    )
  s = SPLITS.index(split)
  labels = np.random.default_rng([seed, s]).integers(0, num_classes, num_examples)
  frames = np.empty((num_examples, T, h, w, 2), np.float32)
  for i, label in enumerate(labels):
    rng = np.random.default_rng([seed, s, i])
    if kind == 'gesture':
      ev = events.synthetic_gesture_events(int(label), rng, (h, w))
    else:  # a seeded image whose grating orientation is the class, saccading
      image = events.procedural_image(
        int(label), np.random.default_rng([seed, 10**6 + i]), size=min(h, w)
      )
      ev = events.synthetic_image_events(image, rng, (h, w))
    frames[i] = events.frames_by_number(ev, T, (h, w))
  return ArraySource(frames, labels.astype(np.int32), num_classes, mean=None, std=None)


# What a truncated, corrupt or foreign file raises while it is opened or read.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
_FINITE_CHUNK = 1 << 25  # values checked at once: bounded memory on large arrays


def npz(split: str, *, path: str, num_classes: int, mean: tuple, std: tuple) -> ArraySource:
  """Arrays from an .npz file with x_<split> and y_<split>.

  x: uint8 images [N, H, W, C], normalised with mean / std; or, with empty
  mean (), raw values such as event-count frames [N, T, H, W, 2]. y: integer
  class indices [N] (or [N, 1], as Keras stores them). Every problem of the
  file is one line that names it.
  """
  _check_split(split)
  from spikeformer_jax import storage  # pylint: disable=import-outside-toplevel

  storage.check(path, 'data.path')  # gs:// or local: another scheme is one line
  if not storage.exists(path):
    raise FileNotFoundError(
      f'data.path={path!r} does not exist; point --config.data.path at an .npz '
      'with x_train, y_train, x_test, y_test arrays.'
    )
  xn, yn = f'x_{split}', f'y_{split}'
  try:
    if storage.is_remote(path):  # np.load needs a seekable file: the bytes, downloaded once
      import io  # pylint: disable=import-outside-toplevel

      f = np.load(io.BytesIO(storage.read_bytes(path)))
    else:
      f = np.load(path)
  except _READ_ERRORS as e:  # numpy takes what is neither zip nor .npy for a pickle
    why = 'not a zip archive' if 'pickle' in str(e) else errors.one_line(e)
    raise errors.DataError(
      f'{path} is not a readable .npz ({why}); write it with '
      'np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...).'
    ) from None
  if not isinstance(f, np.lib.npyio.NpzFile):  # a .npy: one array
    raise errors.DataError(
      f'{path} holds a single array (.npy), not an .npz with x_train, '
      'y_train, x_test, y_test; write it with np.savez.'
    )
  with f:
    missing = {xn, yn} - set(f.files)
    if missing:
      raise errors.DataError(f'{path} lacks {sorted(missing)}; it holds {f.files}.')
    try:
      x, y = f[xn], f[yn]
    except _READ_ERRORS as e:
      raise errors.DataError(
        f'{path}: cannot read {xn} / {yn} ({errors.one_line(e)}); write the '
        'file again, with numeric arrays.'
      ) from None
  if y.ndim == 2 and y.shape[1] == 1:  # Keras' [N, 1]
    y = y[:, 0]
  if y.ndim != 1:
    raise errors.DataError(
      f'{path}: {yn} has shape {y.shape}; expected class indices of shape [N] '
      '(one-hot labels: y.argmax(-1)).'
    )
  if x.ndim not in (4, 5):
    raise errors.DataError(
      f'{path}: {xn} has shape {x.shape}; expected images [N, H, W, C] or '
      'event frames [N, T, H, W, 2] (grey images [N, H, W]: add a channel '
      'axis, x[..., None]).'
    )
  if len(x) != len(y):
    raise errors.DataError(
      f'{path}: {xn} has {len(x)} examples but {yn} has {len(y)}; each example needs one label.'
    )
  if not len(y):
    raise errors.DataError(f'{path}: {xn} and {yn} are empty; the {split} split needs examples.')
  if mean and x.dtype != np.uint8:
    raise errors.DataError(
      f'{path}: {xn} is {x.dtype}; normalisation with data.mean '
      'expects uint8 images. Set --config.data.mean="()" for raw values.'
    )
  if x.dtype.kind not in 'biuf':
    raise errors.DataError(f'{path}: {xn} is {x.dtype}; expected numbers.')
  if x.dtype.kind == 'f':
    rows = max(1, _FINITE_CHUNK // max(1, x[0].size))
    for lo in range(0, len(x), rows):
      chunk = x[lo : lo + rows]
      bad = ~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
      if bad.any():
        raise errors.DataError(
          f'{path}: {xn} holds NaN or infinite values (example '
          f'{lo + int(np.flatnonzero(bad)[0])}); fix or drop them.'
        )
  return ArraySource(
    x,
    _labels(path, yn, y, num_classes),
    num_classes,
    mean=tuple(mean) or None,
    std=tuple(std) or None,
  )


def _labels(path: str, name: str, y: np.ndarray, num_classes: int) -> np.ndarray:
  """`y` as int32 class indices, or one line on what is wrong with them."""
  valid = f'labels are class indices 0..{num_classes - 1} (data.num_classes={num_classes})'
  if y.dtype.kind not in 'biuf':
    raise errors.DataError(f'{path}: {name} is {y.dtype}; {valid}.')
  if y.dtype.kind == 'f':
    bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
    if len(bad):
      raise errors.DataError(
        f'{path}: {name} holds non-integer labels ({y[bad[0]]} at example {bad[0]}); {valid}.'
      )
  lo, hi = y.min().item(), y.max().item()
  if lo < 0 or hi >= num_classes:
    raise errors.DataError(f'{path}: {name} holds labels in [{lo:g}, {hi:g}]; {valid}.')
  return y.astype(np.int32)
