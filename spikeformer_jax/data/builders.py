"""tfds builders of the event-camera datasets: integrate once, read many times.

The official recipes read these datasets through SpikingJelly. SpikingJelly
integrates each sample into T frames and caches the frames as .npz files. We
do the same once, with `prepare.py`. The raw downloads in `manual_dir` are
read with `spikeformer_jax.data.events` and integrated into uint16 counts
[T, H, W, 2], SpikingJelly's frames, channels last. These are stored
zlib-compressed as ArrayRecord. Epochs then read frames and never events.

One BuilderConfig per integration (`t16_number`: 16 frames, split_by='number').
Any T works: `prepare.py --frames=T` creates the config it needs. Writing
needs no TensorFlow (ArrayRecord with Tensor features).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from spikeformer_jax import errors
from spikeformer_jax import extras
from spikeformer_jax.data import events as ev
from spikeformer_jax.data import tfds_sources

try:
  import tensorflow_datasets as tfds
except ModuleNotFoundError as e:
  raise extras.missing(
    e,
    module='tensorflow_datasets',
    extra='tfds',
    package='tensorflow-datasets',
    needed_for='preparing the event datasets',
  ) from e

SPLIT_BY = ('number', 'time')


@dataclasses.dataclass(eq=False)
class FramesConfig(tfds.core.BuilderConfig):
  frames: int = 16
  split_by: str = 'number'


def frames_config(frames: int, split_by: str = 'number') -> FramesConfig:
  if frames < 1:
    raise errors.ConfigError(f'frames={frames} must be >= 1.')
  if split_by not in SPLIT_BY:
    raise errors.ConfigError(f'split_by={split_by!r}; valid: {SPLIT_BY}.')
  return FramesConfig(
    name=tfds_sources.event_config_name(frames, split_by), frames=frames, split_by=split_by
  )


def integrate(events: np.ndarray, frames: int, split_by: str, size: tuple) -> np.ndarray:
  """SpikingJelly's frames of one sample, as uint16 counts [T, H, W, 2]."""
  if split_by == 'number':
    x = ev.frames_by_number(events, frames, size)
  else:
    x = ev.frames_by_time(events, frames, *size)
  if x.max(initial=0) > np.iinfo(np.uint16).max:
    raise errors.DataError(f'a frame count of {x.max()} overflows uint16; use more frames.')
  return x.astype(np.uint16)


# skip_registration: a class keyword of tfds builders that mypy cannot see (tfds is
# untyped, its base class Any), hence the ignore[call-arg] of each builder below.
class _EventFrames(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
  """Frames of an event dataset; subclasses define the sensor, classes and samples."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'SpikingJelly-identical frames, uint16, channels last.'}
  BUILDER_CONFIGS = [frames_config(16), frames_config(10)]
  SENSOR: tuple = (128, 128)
  NUM_CLASSES: int = 0

  def _info(self):
    t = self.builder_config.frames
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'frames': tfds.features.Tensor(
            shape=(t, *self.SENSOR, 2), dtype=np.uint16, encoding='zlib'
          ),
          'label': tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
        }
      ),
      supervised_keys=('frames', 'label'),
      disable_shuffling=True,
    )  # stored in the reader's (SpikingJelly's) order

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    if not os.path.exists(root) or not os.listdir(root):
      raise FileNotFoundError(
        f'{self.name}: manual_dir {root} is empty. ' + self.MANUAL_DOWNLOAD_INSTRUCTIONS
      )
    return {split: self._generate_examples(str(root), split) for split in ('train', 'test')}

  def _generate_examples(self, root: str, split: str):
    c = self.builder_config
    for i, (events, label) in enumerate(self.samples(root, split)):
      yield i, {'frames': integrate(events, c.frames, c.split_by, self.SENSOR), 'label': int(label)}

  def samples(self, root: str, split: str):
    """(events, label) of every sample of `split`, in a fixed order."""
    raise NotImplementedError


class Nmnist(_EventFrames, skip_registration=True):  # type: ignore[call-arg]
  """N-MNIST (Orchard et al., 2015): 34x34 ATIS saccades of MNIST digits."""

  SENSOR = ev.NMNIST_SIZE
  NUM_CLASSES = 10
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Put Train.zip and Test.zip of N-MNIST (https://www.garrickorchard.com/datasets/n-mnist), '
    'or the folders Train/ and Test/ extracted from them, in manual_dir. A tar of '
    '<id>.bs2 files with train*.txt / test*.txt label lists (lines "id class") works too.'
  )

  def samples(self, root, split):
    tars = sorted(f for f in os.listdir(root) if f.endswith(('.tar', '.tar.gz', '.tgz')))
    if tars and not any(
      os.path.exists(os.path.join(root, f'{s}{e}')) for s in ('Train', 'Test') for e in ('', '.zip')
    ):
      yield from ev.iter_nmnist_tar(os.path.join(root, tars[0]), split)
    else:
      yield from ev.iter_nmnist(root, split)


class Dvs128Gesture(_EventFrames, skip_registration=True):  # type: ignore[call-arg]
  """DVS128 Gesture (Amir et al., 2017): 11 gestures of 29 subjects, 128x128.

  Labels are the CSVs' class - 1 (0..10). SpikingJelly's DVS128Gesture numbers
  its class folders '0'..'10' in string order, so its targets differ for
  classes 3..11 (events.SPIKINGJELLY_GESTURE_TARGET maps ours to its): a
  classifier head trained through SpikingJelly needs its rows permuted by that
  map before it reads these labels.
  """

  NUM_CLASSES = 11
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Put DvsGesture.tar.gz (https://research.ibm.com/interactive/dvsgesture/), or the '
    'DvsGesture/ folder extracted from it (user*.aedat, user*_labels.csv, '
    'trials_to_train.txt, trials_to_test.txt), in manual_dir.'
  )

  def samples(self, root, split):
    tar = os.path.join(root, 'DvsGesture.tar.gz')
    folder = os.path.join(root, 'DvsGesture')
    yield from ev.iter_gesture(
      tar if os.path.exists(tar) else folder if os.path.isdir(folder) else root, split
    )


class Cifar10Dvs(_EventFrames, skip_registration=True):  # type: ignore[call-arg]
  """CIFAR10-DVS (Li et al., 2017): 10,000 recordings of CIFAR-10 images, 128x128.

  No official split: the first 90% of each class (in SpikingJelly's order)
  is train, the rest test, as the official code's split_to_train_test_set(
  0.9, ..., random_split=False) gives (9,000 / 1,000).
  """

  NUM_CLASSES = 10
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Put the 10 archives of CIFAR10-DVS (airplane.zip ... truck.zip, '
    'https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671), or the 10 class '
    'folders of .aedat files extracted from them, in manual_dir.'
  )

  def samples(self, root, split):
    train, test = ev.front_split(ev.cifar10dvs_labels(root), 0.9, 10)
    yield from ev.iter_cifar10dvs(root, indices=train if split == 'train' else test)


BUILDERS = {'nmnist': Nmnist, 'dvs128_gesture': Dvs128Gesture, 'cifar10_dvs': Cifar10Dvs}


def prepare(name: str, *, data_dir: str, manual_dir: str, frames: int, split_by: str = 'number'):
  """Integrates and writes event dataset `name` as ArrayRecord; returns the builder."""
  builder = BUILDERS[name](
    data_dir=tfds_sources.default_data_dir(data_dir),
    config=frames_config(frames, split_by),
    file_format='array_record',
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
