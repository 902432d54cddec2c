"""tensorflow-datasets sources read without TensorFlow: `tfds.data_source`.

Training never downloads and never imports TensorFlow: reading needs the
`[tfds]` extra only. `prepare.py` (the `[prepare]` extra, which adds
tensorflow-cpu) writes the datasets as ArrayRecord, and here they are read with random access, decoding
PNG / JPEG with Pillow. A dataset that is missing or stored in another format
fails with one message that names the prepare command.

  * cifar10, cifar100, imagenet2012: the tfds catalog's builders.
  * nmnist, cifar10_dvs, dvs128_gesture: our builders in
    `spikeformer_jax.data.builders`. They store event frames already
    integrated (uint16 counts [T, H, W, 2], zlib) under
    DATA_DIR/<name>/<config>/<version>, and are read with
    `tfds.builder_from_directory`, so no registry is involved.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from spikeformer_jax import errors
from spikeformer_jax import extras

IMAGE_DATASETS = ('cifar10', 'cifar100', 'imagenet2012')
EVENT_DATASETS = ('nmnist', 'cifar10_dvs', 'dvs128_gesture')
# Our split names -> the tfds ones (ImageNet's test set is not labelled).
_SPLITS = {'imagenet2012': {'train': 'train', 'test': 'validation'}}


def default_data_dir(data_dir: str = '') -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets; a URL
  (gs://...) is refused in one line: see `local_data_dir`."""
  return local_data_dir(
    os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  )


def local_data_dir(data_dir: str) -> str:
  """`data_dir` if it is a local (or mounted) folder, else one line: the
  ArrayRecord files are read by array_record's C++ reader, which opens local
  files only (on gs:// it does not fail, it hangs)."""
  from spikeformer_jax import storage  # pylint: disable=import-outside-toplevel

  if storage.is_remote(data_dir):
    raise errors.ConfigError(
      f'data_dir={data_dir}: prepared datasets are read from a local or mounted folder '
      '(array_record reads local files only); copy it to a local disk (gcloud storage cp -r '
      f'{data_dir} DIR) or mount the bucket (gcsfuse), and pass that folder.'
    )
  return data_dir


def prepare_command(name: str, data_dir: str, **extra) -> str:
  args = ''.join(f' --{k}={v}' for k, v in extra.items())
  return f'python prepare.py --dataset={name} --data_dir={data_dir}{args}'


def _missing(name: str, data_dir: str, what: str, **extra) -> FileNotFoundError:
  return FileNotFoundError(
    f'{name} is not prepared as ArrayRecord in {data_dir} ({what}). Prepare it once '
    f'(see the README, "Datasets"): {prepare_command(name, data_dir, **extra)}; '
    'or point --config.data.data_dir at the directory that holds it.'
  )


class TfdsSource:
  """Random access to a tfds ArrayRecord split: `src[indices]` ->
  {'image': list of decoded arrays, 'label': int32 [N]}.

  `image_shape` is the shape the model sees after the transforms (ImageNet's
  decoded images vary in size); `mean` / `std` normalise uint8 images, None
  passes event counts through raw.
  """

  def __init__(self, ds, *, image_key: str, num_classes: int, image_shape: tuple, mean, std):
    self.ds = ds
    self.image_key = image_key
    self.num_classes = num_classes
    self.image_shape = tuple(image_shape)
    self.mean, self.std = mean, std

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, idx) -> dict:
    records = [self.ds[int(i)] for i in np.atleast_1d(idx)]
    return {
      'image': [r[self.image_key] for r in records],
      'label': np.asarray([r['label'] for r in records], np.int32),
    }


def _tfds(name: str):
  return extras.require(
    'tensorflow_datasets',
    extra='tfds',
    package='tensorflow-datasets',
    needed_for=f'data.name={name!r}',
  )


def image_source(
  name: str, split: str, *, data_dir: str, image_size: int, num_classes: int, mean, std
) -> TfdsSource:
  """A split of a catalog dataset prepared by `prepare.py` (never downloads)."""
  tfds = _tfds(name)
  data_dir = default_data_dir(data_dir)
  try:
    ds = tfds.data_source(
      name,
      split=_SPLITS.get(name, {}).get(split, split),
      data_dir=data_dir,
      download=False,
      builder_kwargs={'file_format': 'array_record'},
    )
  except (NotImplementedError, KeyError, tfds.core.DatasetNotFoundError, FileNotFoundError) as e:
    # Nothing there: tfds says "random access ... TFRECORD is not supported" or
    # "splits is empty", depending on what the folder holds.
    raise _missing(name, data_dir, f'{type(e).__name__}: {str(e).splitlines()[0][:200]}') from e
  return _checked(ds, name, num_classes, (image_size, image_size, 3), mean, std)


def event_config_name(frames: int, split_by: str) -> str:
  return f't{frames}_{split_by}'


def event_source(
  name: str,
  split: str,
  *,
  data_dir: str,
  frames: int,
  split_by: str,
  image_size: int,
  num_classes: int,
) -> TfdsSource:
  """A split of an event dataset integrated into `frames` frames by our builder."""
  tfds = _tfds(name)
  data_dir = default_data_dir(data_dir)
  config = event_config_name(frames, split_by)
  versions = sorted(glob.glob(os.path.join(data_dir, name, config, '*', 'dataset_info.json')))
  if not versions:
    raise _missing(
      name,
      data_dir,
      f'no {os.path.join(name, config)}',
      frames=frames,
      split_by=split_by,
      manual_dir='DOWNLOADS',
    )
  builder = tfds.builder_from_directory(os.path.dirname(versions[-1]))
  ds = builder.as_data_source(split=split)
  return _checked(
    ds, name, num_classes, (frames, image_size, image_size, 2), None, None, image_key='frames'
  )


def _checked(ds, name, num_classes, image_shape, mean, std, image_key='image'):
  stored = ds.dataset_info.features['label'].num_classes
  if stored != num_classes:
    raise errors.ConfigError(f'{name} has {stored} classes but data.num_classes={num_classes}.')
  return TfdsSource(
    ds,
    image_key=image_key,
    num_classes=num_classes,
    image_shape=image_shape,
    mean=tuple(mean) if mean else None,
    std=tuple(std) if std else None,
  )
