r"""Prepares a dataset once as ArrayRecord, for training without TensorFlow.

  # CIFAR-10 / CIFAR-100: downloads (~170 MB), or reads cifar-10-binary.tar.gz /
  # cifar-100-binary.tar.gz from --manual_dir. Needs `pip install .[prepare]`.
  python prepare.py --dataset=cifar10 --data_dir=~/tensorflow_datasets
  # ImageNet: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in --manual_dir.
  python prepare.py --dataset=imagenet2012 --data_dir=DIR --manual_dir=DOWNLOADS
  # Event cameras (no TensorFlow needed): the raw downloads in --manual_dir,
  # integrated into --frames frames (SpikingJelly's split_by='number' or 'time').
  python prepare.py --dataset=cifar10_dvs --frames=16 --data_dir=DIR --manual_dir=DOWNLOADS
  python prepare.py --dataset=dvs128_gesture --frames=16 --data_dir=DIR --manual_dir=DOWNLOADS
  python prepare.py --dataset=nmnist --frames=16 --data_dir=DIR --manual_dir=DOWNLOADS

Then train with `--config.data.data_dir=DIR` (or set $TFDS_DATA_DIR). Training
never downloads: a dataset that is missing names this command.

Installed (`pip install .`), `spikeformer-prepare` and `python -m spikeformer_jax.prepare` take
the same arguments from any directory.
"""

import glob
import os
import time

from absl import flags

from spikeformer_jax import cli
from spikeformer_jax import errors
from spikeformer_jax.data import tfds_sources

_DATASET = flags.DEFINE_enum(
  'dataset', None, [*tfds_sources.IMAGE_DATASETS, *tfds_sources.EVENT_DATASETS], 'Dataset.'
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir', '', 'Output (default $TFDS_DATA_DIR or ~/tensorflow_datasets).'
)
_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir', None, 'Downloaded archives (required for imagenet2012 and the event datasets).'
)
_FRAMES = flags.DEFINE_integer('frames', 16, 'Event datasets: frames per sample (model.T).')
_SPLIT_BY = flags.DEFINE_enum(
  'split_by', 'number', ['number', 'time'], 'Event datasets: integration into frames.'
)


def _prepare_catalog(name, data_dir, manual_dir):
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise errors.UserError(
      f'preparing {name} runs the tfds catalog builder, which needs '
      'TensorFlow: pip install ".[prepare]" (tensorflow-cpu; not needed '
      'for training).'
    ) from None
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if name == 'imagenet2012' and not manual_dir:
    raise errors.ConfigError(
      'imagenet2012 cannot be downloaded: put ILSVRC2012_img_train.tar '
      'and ILSVRC2012_img_val.tar in a folder and pass --manual_dir.'
    )
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  if os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')) and not glob.glob(
    os.path.join(builder.data_dir, '*.array_record*')
  ):
    raise errors.UserError(
      f'{builder.data_dir} holds {name} in another format (TFRecord?), '
      'which tfds would reuse and training cannot read: delete that folder '
      'or pass another --data_dir.'
    )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv):
  del argv
  name = _DATASET.value
  if name is None:  # checked here, not by a validator that would stay on the global flags
    names = [*tfds_sources.IMAGE_DATASETS, *tfds_sources.EVENT_DATASETS]
    cli.exit_usage(f'--dataset is required: one of {", ".join(names)}.')
  # Prepared data is read locally (array_record): a URL is one line.
  data_dir = tfds_sources.default_data_dir(_DATA_DIR.value)
  if _MANUAL_DIR.value and '://' in _MANUAL_DIR.value:
    raise errors.ConfigError(
      f'--manual_dir={_MANUAL_DIR.value}: the downloads are read from a local or mounted '
      'folder; copy them to a local disk first.'
    )
  manual_dir = os.path.expanduser(_MANUAL_DIR.value) if _MANUAL_DIR.value else None
  t0 = time.time()
  if name in tfds_sources.EVENT_DATASETS:
    from spikeformer_jax.data import builders  # pylint: disable=import-outside-toplevel

    if not manual_dir or not os.path.isdir(manual_dir):
      raise errors.ConfigError(
        f'--manual_dir={manual_dir!r} is not a folder. '
        f'{builders.BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS}'
      )
    builder = builders.prepare(
      name, data_dir=data_dir, manual_dir=manual_dir, frames=_FRAMES.value, split_by=_SPLIT_BY.value
    )
  else:
    builder = _prepare_catalog(name, data_dir, manual_dir)
  splits = ', '.join(f'{k} {v.num_examples}' for k, v in builder.info.splits.items())
  print(f'prepared {name} ({splits}) in {builder.data_dir} in {time.time() - t0:.1f} s')
  return 0


def run():
  """`spikeformer-prepare`, `python -m spikeformer_jax.prepare`, `python prepare.py`."""
  cli.run(main, (), jax_flags=False)  # mistakes in flags: one line, exit 2; errors.report


if __name__ == '__main__':
  run()
