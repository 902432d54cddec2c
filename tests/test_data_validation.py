"""A data file the user points at is checked, every split of it, before
anything is compiled: one line naming the file (or the split), the value and
the fix. Tiny .npz files written in tmp_path."""

import numpy as np
import pytest

from spikeformer_jax.configs import spikformer as spikformer_configs
from spikeformer_jax import config_lib, experiment, train_lib, validation
from spikeformer_jax import data as data_lib


def _arrays(n_train=32, n_test=16):
  rng = np.random.default_rng(0)
  image = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  return {
    'x_train': image(n_train),
    'y_train': np.arange(n_train) % 10,
    'x_test': image(n_test),
    'y_test': np.arange(n_test) % 10,
  }


def _config(path, **over):
  """A seconds-long Spikformer (32x32x3, 10 classes) reading `path`."""
  c = spikformer_configs.get_config('cifar10-4-384,runlocal')
  return config_lib.apply_overrides(c, {'data.name': 'npz', 'data.path': str(path), **over})


def _frames_with_nan():
  a = _arrays()
  a['x_test'] = a['x_test'].astype(np.float32)
  a['x_test'][3, 0, 0, 0] = np.nan
  return a


def _nan_case():
  return _frames_with_nan(), {'data.mean': (), 'data.std': ()}


A = _arrays
ARRAY_CASES = {  # name -> (arrays, config overrides, message; {path} is the file)
  'test labels out of range': (
    {**A(), 'y_test': np.arange(16) % 11},
    {},
    '{path}: y_test holds labels in [0, 10]; labels are class indices 0..9 (data.num_classes=10).',
  ),
  'more images than labels': (
    {**A(), 'x_train': A(n_train=40)['x_train']},
    {},
    '{path}: x_train has 40 examples but y_train has 32; each example needs one label.',
  ),
  'empty test split': (
    {**A(), 'x_test': np.zeros((0, 32, 32, 3), np.uint8), 'y_test': np.zeros(0, int)},
    {},
    '{path}: x_test and y_test are empty; the test split needs examples.',
  ),
  'non-integer labels': (
    {**A(), 'y_train': np.arange(32) % 10 + 0.5},
    {},
    '{path}: y_train holds non-integer labels (0.5 at example 0); labels are class '
    'indices 0..9 (data.num_classes=10).',
  ),
  'one-hot labels': (
    {**A(), 'y_test': np.eye(10)[np.arange(16) % 10]},
    {},
    '{path}: y_test has shape (16, 10); expected class indices of shape [N] (one-hot '
    'labels: y.argmax(-1)).',
  ),
  'grey images': (
    {**A(), 'x_train': A()['x_train'][..., 0]},
    {},
    '{path}: x_train has shape (32, 32, 32); expected images [N, H, W, C] or event '
    'frames [N, T, H, W, 2] (grey images [N, H, W]: add a channel axis, x[..., None]).',
  ),
  'test images of another size': (
    {**A(), 'x_test': A()['x_test'][:, :16, :16]},
    {},
    "data 'npz' (test split) has 16x16 images but model.img_size=32; set both to the same size.",
  ),
  'test images of other channels': (
    {**A(), 'x_test': A()['x_test'][..., :1]},
    {},
    "data 'npz' (test split) has 1 channels but model.in_channels=3.",
  ),
  'non-finite values': (
    *_nan_case(),
    '{path}: x_test holds NaN or infinite values (example 3); fix or drop them.',
  ),
  'missing split': (
    {k: v for k, v in A().items() if k.endswith('train')},
    {},
    "{path} lacks ['x_test', 'y_test']; it holds ['x_train', 'y_train'].",
  ),
  'mean per channel': (
    A(),
    {'data.mean': (0.5, 0.5), 'data.std': (0.2, 0.2)},
    'data.mean=(0.5, 0.5) has 2 values for 3-channel images; give one per channel (or '
    'one for all).',
  ),
}


def _good_bytes(tmp_path):
  np.savez(tmp_path / 'good.npz', **_arrays())
  return (tmp_path / 'good.npz').read_bytes()


FILE_CASES = {  # name -> (bytes of the file, message)
  'truncated': (
    lambda good: good[: len(good) // 2],
    '{path} is not a readable .npz (File is not a zip file); write it with '
    'np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...).',
  ),
  'not an npz': (
    lambda good: b'x_train,y_train\n1,2\n' * 20,
    '{path} is not a readable .npz (not a zip archive); write it with '
    'np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...).',
  ),
  'empty file': (
    lambda good: b'',
    '{path} is not a readable .npz (No data left in file); write it with',
  ),
}


def _train_fails_before_compiling(config, tmp_path, monkeypatch) -> str:
  monkeypatch.setattr(experiment, 'make_train_step', lambda *a: pytest.fail('compiled'))
  with pytest.raises(ValueError) as e:
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  return str(e.value)


@pytest.mark.parametrize('case', list(ARRAY_CASES))
def test_bad_arrays_are_one_line_before_compiling(case, tmp_path, monkeypatch):
  arrays, over, message = ARRAY_CASES[case]
  path = tmp_path / 'data.npz'
  np.savez(path, **arrays)
  msg = _train_fails_before_compiling(_config(path, **over), tmp_path, monkeypatch)
  assert msg == message.format(path=path)


@pytest.mark.parametrize('case', list(FILE_CASES))
def test_unreadable_files_are_named(case, tmp_path, monkeypatch):
  content, message = FILE_CASES[case]
  path = tmp_path / 'data.npz'
  path.write_bytes(content(_good_bytes(tmp_path)))
  msg = _train_fails_before_compiling(_config(path), tmp_path, monkeypatch)
  assert msg.startswith(message.format(path=path)) and '\n' not in msg


def test_a_single_array_file_is_named(tmp_path, monkeypatch):
  path = tmp_path / 'images.npy'
  np.save(path, _arrays()['x_train'])
  msg = _train_fails_before_compiling(_config(path), tmp_path, monkeypatch)
  assert msg == (
    f'{path} holds a single array (.npy), not an .npz with x_train, y_train, '
    'x_test, y_test; write it with np.savez.'
  )


def test_keras_labels_load_and_one_split_validates_alone(tmp_path):
  arrays = _arrays()
  arrays['y_train'] = arrays['y_train'][:, None].astype(np.uint8)  # Keras: [N, 1]
  arrays['y_test'] = arrays['y_test'].astype(np.float64)  # integral floats are fine
  np.savez(tmp_path / 'data.npz', **arrays)
  config = _config(tmp_path / 'data.npz')
  train, test = (data_lib.get_source(config.data, s) for s in ('train', 'test'))
  assert train.labels.shape == (32,) and train.labels.dtype == np.int32
  np.testing.assert_array_equal(test.labels, np.arange(16) % 10)
  validation.validate_config(config)
  validation.validate_data(config, train, test)
  # eval.py checks only the split it evaluates, and names it.
  config.model.num_classes = 5
  with pytest.raises(
    ValueError,
    match=r"^data 'npz' \(test split\) has 10 classes but "
    r'model.num_classes=5.$',
  ):
    validation.validate_split(config, test, 'test')
