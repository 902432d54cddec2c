"""Input pipeline: sources by name, per-example transforms, a deterministic loader.

The loader keeps no state. The batch of training step `s` is a pure function
of (seed, s): the rows come from a per-epoch permutation, and each example's
augmentation uses its own generator seeded by (seed, s, row). So a resumed
run sees the same batches as an uninterrupted one, with nothing to checkpoint
but the step, and the result does not depend on how many worker processes
compute it. Each process reads only its own rows of every global batch, which
is tfds.split_for_jax_process without giving up the global shuffle.

Batches are prepared ahead of the step: in a background thread (data.workers
= 0), or in grain worker processes (data.workers > 0) for the pipelines
whose decoding and augmentation need more than one core.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math

import ml_collections
import numpy as np

from spikeformer_jax import errors
from spikeformer_jax.data import augment
from spikeformer_jax.data import events
from spikeformer_jax.data import sources
from spikeformer_jax.data import tfds_sources

# Dataset -> normalisation (mean, std) of the official code.
NORM = {
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

NAMES = (
  'digits',
  'synthetic',
  'synthetic_events',
  'npz',
  *tfds_sources.IMAGE_DATASETS,
  *tfds_sources.EVENT_DATASETS,
)


def norm_stats(cfg: ml_collections.ConfigDict) -> tuple:
  """(mean, std) of `config.data`: those of dataset `norm_from` if set."""
  frm = cfg.get('norm_from', '')
  if frm:
    if frm not in NORM:
      raise errors.ConfigError(f'data.norm_from={frm!r}; valid: {", ".join(NORM)} or "".')
    return NORM[frm]
  return tuple(cfg.mean), tuple(cfg.std)


def get_source(cfg: ml_collections.ConfigDict, split: str):
  """The `split` of dataset `cfg.name` (`config.data`)."""
  name = cfg.name
  mean, std = norm_stats(cfg)
  if name == 'digits':
    return sources.digits(split, size=cfg.image_size)
  if name == 'synthetic':
    n = cfg.num_train if split == 'train' else cfg.num_test
    return sources.synthetic(
      split, shape=tuple(cfg.shape), num_classes=cfg.num_classes, num_examples=n, seed=cfg.seed
    )
  if name == 'synthetic_events':
    n = cfg.num_train if split == 'train' else cfg.num_test
    return sources.synthetic_events(
      split,
      shape=tuple(cfg.shape),
      num_classes=cfg.num_classes,
      num_examples=n,
      seed=cfg.seed,
      kind=cfg.get('synthetic_kind', 'gesture'),
    )
  if name == 'npz':
    return sources.npz(split, path=cfg.path, num_classes=cfg.num_classes, mean=mean, std=std)
  if name in tfds_sources.IMAGE_DATASETS:
    return tfds_sources.image_source(
      name,
      split,
      data_dir=cfg.get('data_dir', ''),
      image_size=cfg.image_size,
      num_classes=cfg.num_classes,
      mean=mean,
      std=std,
    )
  if name in tfds_sources.EVENT_DATASETS:
    return tfds_sources.event_source(
      name,
      split,
      data_dir=cfg.get('data_dir', ''),
      frames=cfg.shape[0],
      split_by=cfg.get('split_by', 'number'),
      image_size=cfg.image_size,
      num_classes=cfg.num_classes,
    )
  raise errors.ConfigError(f'data.name={name!r}; valid: {", ".join(map(repr, NAMES))}.')


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., C] -> float32 ((x / 255) - mean) / std per channel.

  A source with mean None (event counts, which the official DVS models take
  raw) is passed through as float32.
  """
  if mean is None:
    return images.astype(np.float32)
  x = images.astype(np.float32) * (1.0 / 255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def augment_config(**kw) -> ml_collections.ConfigDict:
  """`config.data.augment`: per-example augmentation, all off by default.

  Images are uint8 HWC, augmented before normalisation unless noted; event
  frames are float32 [T, H, W, 2].
  """
  c = ml_collections.ConfigDict(dict(
      # timm RandomResizedCrop ranges; (1, 1) / (1, 1) with an image of the
      # model's size is no crop (the CIFAR recipes).
      crop_scale=(1.0, 1.0),
      crop_ratio=(1.0, 1.0),  # the crop's aspect-ratio range
      interpolation='bicubic',  # 'bicubic' (timm's) or 'bilinear'
      eval_crop_pct=1.0,     # timm's eval resize to size / crop_pct, then centre crop
      hflip=0.0,             # probability of a horizontal flip (images and event frames)
      rand_augment='',       # timm spec such as 'rand-m9-n1-mstd0.4-inc1'; '' off
      # 'timm' (the standard set) or 'spikformer_cifar' (Spikformer's
      # restricted CIFAR set, cifar10/aa_snn.py)
      rand_augment_ops='timm',
      reprob=0.0,            # timm random erasing (after normalisation): probability
      remode='const',        # timm random erasing: 'const', 'rand' or 'pixel'
      dvs_policy='',         # event frames: '' or 'snn_augment_wide' (Spikformer CIFAR10-DVS)
      dvs_cutout=0))         # event frames: side of SDT's Cutout square; 0 off
  c.update(kw)
  return c
# fmt: on


DVS_POLICIES = ('', 'snn_augment_wide')


class Transform:
  """Per-example preprocessing of a split: (example, rng) -> model input.

  Train: crop, flip, RandAugment, normalise, random erasing (images), or
  resize, flip, the DVS policy and Cutout (event frames). Eval: the resize
  and centre crop, normalise. `trivial` when nothing but normalisation
  applies, so the loader can normalise whole batches at once.
  """

  def __init__(
    self,
    cfg: ml_collections.ConfigDict | None,
    *,
    train: bool,
    size: int,
    mean,
    std,
    events: bool,
    stored_shape: tuple | None = None,
  ):
    self.cfg = cfg = cfg if cfg is not None else augment_config()
    self.train, self.size, self.events = train, size, events
    self.mean, self.std = mean, std
    if cfg.dvs_policy not in DVS_POLICIES:
      raise errors.ConfigError(
        f'data.augment.dvs_policy={cfg.dvs_policy!r}; valid: {DVS_POLICIES}.'
      )
    self.rand_augment = None
    if train and cfg.rand_augment and not events:
      fill = tuple(mean) if mean else (0.5,) * 3
      try:
        self.rand_augment = augment.rand_augment(
          cfg.rand_augment, cfg.rand_augment_ops, img_mean=fill, interpolation=cfg.interpolation
        )
      except ValueError as e:
        raise errors.ConfigError(
          f'data.augment.rand_augment={cfg.rand_augment!r} / '
          f'rand_augment_ops={cfg.rand_augment_ops!r}: {e}'
        ) from None
    same_size = stored_shape is not None and stored_shape[-2] == size
    if events:
      self.trivial = same_size and not (train and (cfg.hflip or cfg.dvs_policy or cfg.dvs_cutout))
    else:
      crop = tuple(cfg.crop_scale) != (1.0, 1.0) or tuple(cfg.crop_ratio) != (1.0, 1.0)
      augmenting = train and (crop or cfg.hflip or self.rand_augment or cfg.reprob)
      self.trivial = same_size and not augmenting and (train or cfg.eval_crop_pct == 1.0)

  def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
    c = self.cfg
    if self.events:
      x = np.asarray(image, np.float32)
      if x.shape[-2] != self.size:
        x = events.resize_frames(x, self.size)
      if self.train:
        if c.hflip:
          x = augment.hflip(x, rng, c.hflip)
        if c.dvs_policy == 'snn_augment_wide':
          x = augment.snn_augment_wide(x, rng)
        if c.dvs_cutout:
          x = augment.cutout(x, rng, length=c.dvs_cutout)
      return x
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if self.train:
      image = augment.random_resized_crop(
        image,
        rng,
        self.size,
        scale=tuple(c.crop_scale),
        ratio=tuple(c.crop_ratio),
        interpolation=c.interpolation,
      )
      if c.hflip:
        image = augment.hflip(image, rng, c.hflip)
      if self.rand_augment is not None:
        image = self.rand_augment(image, rng)
    else:
      image = augment.eval_resize_crop(image, self.size, c.eval_crop_pct, c.interpolation)
    x = normalize(image, self.mean, self.std)
    if self.train and c.reprob:
      x = augment.random_erasing(x, rng, c.reprob, mode=c.remode)
    return x


def make_transform(cfg: ml_collections.ConfigDict, source, train: bool) -> Transform:
  """The transform of `source` under `config.data`."""
  # Arrays are stored at the model's size; tfds records are decoded at their own.
  stored = source.image_shape if isinstance(source, sources.ArraySource) else None
  return Transform(
    cfg.get('augment'),
    train=train,
    size=source.image_shape[-2],
    mean=source.mean,
    std=source.std,
    events=len(source.image_shape) == 4,
    stored_shape=stored,
  )


def _apply(source, transform: Transform | None, idx: np.ndarray, seeds) -> dict:
  """Rows `idx` of `source` through `transform`; seeds[j] seeds row j's generator."""
  ex = source[idx]
  labels = np.asarray(ex['label'], np.int32)
  if transform is None or transform.trivial:
    return {'image': normalize(np.asarray(ex['image']), source.mean, source.std), 'label': labels}
  images = [transform(ex['image'][j], np.random.default_rng(seeds[j])) for j in range(len(idx))]
  return {'image': np.stack(images), 'label': labels}


class Loader:
  """Deterministic batches of a random-access source for one process.

  `global_batch` rows are drawn per step; this process returns rows
  [process_index * local : (process_index + 1) * local] of them, so the
  processes' slices assemble into the global batch in order. The example at
  global row r of step s is augmented with np.random.default_rng([seed, s, r]).
  """

  def __init__(
    self,
    source,
    *,
    global_batch: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    transform: Transform | None = None,
    workers: int = 0,
    prefetch: int = 2,
  ):
    if global_batch % process_count:
      raise errors.ConfigError(
        f'batch_size={global_batch} is not divisible by the {process_count} processes.'
      )
    if len(source) < global_batch:
      raise errors.ConfigError(
        f'batch_size={global_batch} exceeds the {len(source)} '
        'training examples; lower --config.batch_size.'
      )
    self.source = source
    self.transform = transform
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.seed = seed
    self.process_index = process_index
    self.workers = workers
    self.prefetch = max(prefetch, 1)
    self.steps_per_epoch = len(source) // global_batch  # drop the remainder

  def _epoch_order(self, epoch: int) -> np.ndarray:
    cached = getattr(self, '_order', None)  # ImageNet: 40 ms a permutation, once an epoch
    if cached is None or cached[0] != epoch:
      cached = self._order = (
        epoch,
        np.random.default_rng([self.seed, epoch]).permutation(len(self.source)),
      )
    return cached[1]

  def indices(self, step: int) -> np.ndarray:
    """The global example indices of training step `step` (all processes)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    return self._epoch_order(epoch)[i * self.global_batch : (i + 1) * self.global_batch]

  def batch(self, step: int) -> dict:
    """This process's rows of the batch of training step `step` (0-based)."""
    step = int(step)
    idx = self.indices(step)
    lo = self.process_index * self.local_batch
    rows = range(lo, lo + self.local_batch)
    return _apply(
      self.source,
      self.transform,
      idx[lo : lo + self.local_batch],
      [(self.seed, step, r) for r in rows],
    )

  def iterate(self, start: int, stop: int):
    """The batches of steps start .. stop - 1, prepared ahead of their use."""
    if self.workers > 0:
      yield from self._grain_iterate(start, stop)
      return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      ahead: collections.deque[concurrent.futures.Future[dict]] = collections.deque()
      for step in range(start, stop):
        while len(ahead) < self.prefetch and step + len(ahead) < stop:
          ahead.append(pool.submit(self.batch, step + len(ahead)))
        yield ahead.popleft().result()

  def _grain_iterate(self, start: int, stop: int):
    import grain  # pylint: disable=import-outside-toplevel
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():  # grain reads its absl flags (no app.run in tests)
      flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(start, stop).map(self.batch).to_iter_dataset()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=self.prefetch)
    )
    it = iter(ds)
    try:
      yield from it
    finally:
      close = getattr(it, 'close', None)
      if close is not None:
        close()


def eval_batches(
  source,
  *,
  global_batch: int,
  process_index: int = 0,
  process_count: int = 1,
  transform: Transform | None = None,
):
  """Yields every example once, in order, in padded batches with a 'mask'."""
  if global_batch % process_count:
    raise errors.ConfigError(
      f'eval batch size {global_batch} is not divisible by the {process_count} processes.'
    )
  local = global_batch // process_count
  n = len(source)
  for b in range(math.ceil(n / global_batch)):
    idx = np.arange(b * global_batch, (b + 1) * global_batch)
    idx = idx[process_index * local : (process_index + 1) * local]
    mask = idx < n
    seeds = [(0, int(i)) for i in idx]  # eval transforms are deterministic
    yield dict(_apply(source, transform, np.where(mask, idx, 0), seeds), mask=mask)
