"""Input pipeline: sources by name, a deterministic stateless loader.

The loader keeps no state: the batch of training step `s` is a pure function
of (seed, s), from a per-epoch permutation. A resumed run therefore sees the
same batches as an uninterrupted one, with nothing to checkpoint but the step.
Each process reads only its own rows of every global batch.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from spikeformer_jax.data import sources

# Datasets of the papers that need the tfds / event-camera readers.
_NOT_YET = ('cifar10', 'cifar100', 'imagenet2012', 'cifar10_dvs', 'dvs128_gesture')


def get_source(cfg: ml_collections.ConfigDict, split: str):
  """The `split` of dataset `cfg.name` (`config.data`)."""
  name = cfg.name
  if name == 'digits':
    return sources.digits(split, size=cfg.image_size)
  if name == 'synthetic':
    n = cfg.num_train if split == 'train' else cfg.num_test
    return sources.synthetic(split, shape=tuple(cfg.shape), num_classes=cfg.num_classes,
                             num_examples=n, seed=cfg.seed)
  if name == 'npz':
    return sources.npz(split, path=cfg.path, num_classes=cfg.num_classes,
                       mean=cfg.mean, std=cfg.std)
  if name in _NOT_YET:
    raise ValueError(
        f'data.name={name!r}: reading the tfds / event-camera versions of the '
        "papers' datasets is not part of this release yet. Use data.name='npz' "
        "with data.path pointing at arrays you have (x_train, y_train, x_test, "
        "y_test), or data.name='synthetic' to exercise the pipeline.")
  raise ValueError(f"data.name={name!r}; valid: 'digits', 'synthetic', 'npz'.")


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., C] -> float32 ((x / 255) - mean) / std per channel.

  A source with mean None (event counts, which the official DVS models take
  raw) is passed through as float32.
  """
  if mean is None:
    return images.astype(np.float32)
  x = images.astype(np.float32) * (1.0 / 255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _prepare(ex: dict, source) -> dict:
  return {'image': normalize(ex['image'], source.mean, source.std),
          'label': ex['label'].astype(np.int32)}


class Loader:
  """Deterministic batches of a random-access source for one process.

  `global_batch` rows are drawn per step; this process returns rows
  [process_index * local : (process_index + 1) * local] of them, so the
  processes' slices assemble into the global batch in order.
  """

  def __init__(self, source, *, global_batch: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if global_batch % process_count:
      raise ValueError(f'batch_size={global_batch} is not divisible by the '
                       f'{process_count} processes.')
    if len(source) < global_batch:
      raise ValueError(f'batch_size={global_batch} exceeds the {len(source)} '
                       'training examples; lower --config.batch_size.')
    self.source = source
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.seed = seed
    self.process_index = process_index
    self.steps_per_epoch = len(source) // global_batch  # drop the remainder

  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

  def indices(self, step: int) -> np.ndarray:
    """The global example indices of training step `step` (all processes)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    return self._epoch_order(epoch)[i * self.global_batch:(i + 1) * self.global_batch]

  def batch(self, step: int) -> dict:
    idx = self.indices(step)
    lo = self.process_index * self.local_batch
    return _prepare(self.source[idx[lo:lo + self.local_batch]], self.source)


def eval_batches(source, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1):
  """Yields every example once, in order, in padded batches with a 'mask'."""
  if global_batch % process_count:
    raise ValueError(f'eval batch size {global_batch} is not divisible by the '
                     f'{process_count} processes.')
  local = global_batch // process_count
  n = len(source)
  for b in range(math.ceil(n / global_batch)):
    idx = np.arange(b * global_batch, (b + 1) * global_batch)
    idx = idx[process_index * local:(process_index + 1) * local]
    mask = idx < n
    yield dict(_prepare(source[np.where(mask, idx, 0)], source), mask=mask)
