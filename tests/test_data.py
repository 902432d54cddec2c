"""The input pipeline: tfds sources (mock and real ArrayRecord), transforms,
per-process slicing, worker processes, missing data."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import event_fixtures
from conftest import ROOT
from spikeformer_jax import config_lib
from spikeformer_jax import data as data_lib
from spikeformer_jax.data import sources, tfds_sources


def _cifar_data(**augment):
  d = config_lib.image_data('cifar10', 10, 32)
  d.augment.update(augment)
  return d


FULL_CIFAR = dict(
  hflip=0.5,
  rand_augment='rand-m9-n1-mstd0.4-inc1',
  rand_augment_ops='spikformer_cifar',
  reprob=0.25,
)


def test_mock_tfds_cifar_through_the_real_data_source_path():
  with tfds.testing.mock_data(num_examples=12):
    src = data_lib.get_source(_cifar_data(**FULL_CIFAR), 'train')
    assert isinstance(src, tfds_sources.TfdsSource) and len(src) == 12
    assert src.image_shape == (32, 32, 3) and src.num_classes == 10
    tf = data_lib.make_transform(_cifar_data(**FULL_CIFAR), src, train=True)
    loader = data_lib.Loader(src, global_batch=4, seed=1, transform=tf)
    b = loader.batch(2)
  assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.float32
  assert b['label'].dtype == np.int32 and ((0 <= b['label']) & (b['label'] < 10)).all()
  assert np.isfinite(b['image']).all()


def test_mock_imagenet_variable_sizes_are_cropped_train_and_eval():
  d = config_lib.image_data('imagenet2012', 1000, 64)
  d.augment.update(
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    hflip=0.5,
    rand_augment='rand-m9-mstd0.5-inc1',
    reprob=0.25,
    remode='pixel',
    eval_crop_pct=0.875,
  )
  with tfds.testing.mock_data(num_examples=6):
    train = data_lib.get_source(d, 'train')
    test = data_lib.get_source(d, 'test')  # imagenet2012's 'validation'
    shapes = {train[[i]]['image'][0].shape for i in range(6)}
    assert len(shapes) > 1  # the mock's decoded images vary in size
    b = data_lib.Loader(
      train, global_batch=3, transform=data_lib.make_transform(d, train, train=True)
    ).batch(0)
    e = next(
      data_lib.eval_batches(
        test, global_batch=4, transform=data_lib.make_transform(d, test, train=False)
      )
    )
  assert b['image'].shape == (3, 64, 64, 3) and e['image'].shape == (4, 64, 64, 3)


def test_missing_tfds_dataset_names_the_prepare_command(tmp_path):
  d = _cifar_data()
  d.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'python prepare.py --dataset=cifar10'):
    data_lib.get_source(d, 'train')
  d = config_lib.data_config('cifar10_dvs', 10, (16, 128, 128, 2), mean=(), std=())
  d.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'prepare.py --dataset=cifar10_dvs.*--frames=16'):
    data_lib.get_source(d, 'train')


def _array_source(n=20):
  rng = np.random.default_rng(0)
  return sources.ArraySource(
    rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
    np.arange(n) % 10,
    10,
    mean=(0.5,) * 3,
    std=(0.25,) * 3,
  )


def test_two_processes_cover_each_epoch_exactly_once_with_their_augmented_rows():
  src = _array_source(24)
  d = config_lib.data_config('npz', 10, (16, 16, 3))
  d.augment.update(**FULL_CIFAR)
  tf = data_lib.make_transform(d, src, train=True)
  one = data_lib.Loader(src, global_batch=8, seed=3, transform=tf)
  two = [
    data_lib.Loader(src, global_batch=8, seed=3, transform=tf, process_index=p, process_count=2)
    for p in range(2)
  ]
  for epoch in range(2):
    seen = []
    for s in range(epoch * 3, epoch * 3 + 3):
      parts = [loader.batch(s) for loader in two]
      whole = one.batch(s)
      np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])
      seen.extend(one.indices(s)[:8])
    assert sorted(seen) == list(range(24))  # every example once per epoch
  eval_rows = [
    np.concatenate(
      [
        b['label'][b['mask']]
        for b in data_lib.eval_batches(src, global_batch=8, process_index=p, process_count=2)
      ]
    )
    for p in range(2)
  ]
  assert sorted(np.concatenate(eval_rows).tolist()) == sorted(src.labels.tolist())


def test_augmented_batches_are_deterministic_and_vary_by_step():
  src = _array_source()
  d = config_lib.data_config('npz', 10, (16, 16, 3))
  d.augment.update(**FULL_CIFAR)
  loader = data_lib.Loader(
    src, global_batch=4, seed=5, transform=data_lib.make_transform(d, src, train=True)
  )
  plain = data_lib.Loader(src, global_batch=4, seed=5)
  a, b = loader.batch(7), loader.batch(7)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(a['image'], plain.batch(7)['image'])  # augmented
  # Same rows in a later epoch are augmented afresh.
  assert not np.array_equal(loader.batch(0)['image'], loader.batch(5)['image'])


def test_trivial_transform_is_the_batched_normalisation():
  src = _array_source()
  d = config_lib.data_config('npz', 10, (16, 16, 3))
  tf = data_lib.make_transform(d, src, train=True)
  assert tf.trivial
  one_by_one = [tf(src[[i]]['image'][0], np.random.default_rng(0)) for i in range(4)]
  batched = data_lib.normalize(src[np.arange(4)]['image'], src.mean, src.std)
  np.testing.assert_allclose(np.stack(one_by_one), batched, rtol=1e-6)


@pytest.mark.slow
def test_prefetching_and_grain_workers_give_the_loader_batches():
  script = f'''
import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / "tests")!r})
import numpy as np
from test_data import _array_source, FULL_CIFAR
from spikeformer_jax import config_lib, data as data_lib
def main(argv):
  src = _array_source()
  d = config_lib.data_config('npz', 10, (16, 16, 3)); d.augment.update(**FULL_CIFAR)
  tf = data_lib.make_transform(d, src, train=True)
  want = [data_lib.Loader(src, global_batch=4, seed=2, transform=tf).batch(s) for s in range(3, 9)]
  for workers in (0, 2):
    loader = data_lib.Loader(src, global_batch=4, seed=2, transform=tf, workers=workers)
    got = list(loader.iterate(3, 9))
    assert len(got) == 6
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g['image'], w['image'])
      np.testing.assert_array_equal(g['label'], w['label'])
  print('ok')
from absl import app; app.run(main)
'''
  out = subprocess.run(
    [sys.executable, '-c', script],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-3000:]


def test_norm_from_replaces_the_statistics():
  d = config_lib.image_data('cifar100', 100, 32)
  d.norm_from = 'cifar10'
  assert data_lib.norm_stats(d) == config_lib.NORM['cifar10']
  d.norm_from = 'mnist'
  with pytest.raises(ValueError, match='norm_from'):
    data_lib.norm_stats(d)


def test_bad_dvs_policy_is_one_clear_error():
  src = sources.synthetic('train', shape=(2, 8, 8, 2), num_classes=3, num_examples=4)
  d = config_lib.data_config('synthetic', 3, (2, 8, 8, 2), mean=(), std=())
  d.augment.dvs_policy = 'autoaugment'
  with pytest.raises(ValueError, match='dvs_policy'):
    data_lib.make_transform(d, src, train=True)


def _event_data(name, frames, size, tfds_dir):
  classes = {'nmnist': 10, 'cifar10_dvs': 10, 'dvs128_gesture': 11}[name]
  d = config_lib.data_config(name, classes, (frames, size, size, 2), mean=(), std=())
  d.data_dir = str(tfds_dir)
  return d


@pytest.mark.slow
@pytest.mark.parametrize('name', ['nmnist', 'dvs128_gesture', 'cifar10_dvs'])
def test_event_builder_integrates_once_and_reads_back_exactly(tmp_path, name):
  """A fake download in the native format -> our tfds builder -> ArrayRecord
  in a temporary directory -> get_source: SpikingJelly's frames, every sample."""
  from spikeformer_jax.data import builders, events  # pylint: disable=import-outside-toplevel

  dl = tmp_path / 'downloads'
  if name == 'nmnist':
    event_fixtures.write_nmnist_tree(str(dl), per_class=2, zipped=True)
    expected = {s: list(events.iter_nmnist(str(dl), s)) for s in ('train', 'test')}
  elif name == 'dvs128_gesture':
    event_fixtures.write_gesture_tree(str(dl), users=(1, 24), labels=(0, 3, 10), archive=True)
    expected = {s: list(events.iter_gesture(str(dl), s)) for s in ('train', 'test')}
  else:
    # 10 per class: the fewest with a test split (ceil(0.9 n) < n). 8 saccade
    # sub-steps, not 60: a seventh of the events to generate, each read back.
    event_fixtures.write_cifar10dvs_tree(str(dl), per_class=10, zipped=True, n_steps=8)
    every = list(events.iter_cifar10dvs(str(dl)))
    train, test = events.front_split([label for _, label in every])
    expected = {'train': [every[i] for i in train], 'test': [every[i] for i in test]}
  builder = builders.prepare(name, data_dir=str(tmp_path / 'tfds'), manual_dir=str(dl), frames=4)
  size = builder.SENSOR[0]
  for split, samples in expected.items():
    src = data_lib.get_source(_event_data(name, 4, size, tmp_path / 'tfds'), split)
    assert len(src) == len(samples) > 0
    got = src[np.arange(len(src))]
    for (ev, label), frames, lab in zip(samples, got['image'], got['label']):
      np.testing.assert_array_equal(frames, events.frames_by_number(ev, 4, builder.SENSOR))
      assert lab == label
  if name == 'cifar10_dvs':  # SDT's recipe reads it at 64x64: resized on load
    src = data_lib.get_source(_event_data(name, 4, 64, tmp_path / 'tfds'), 'test')
    tf = data_lib.make_transform(_event_data(name, 4, 64, tmp_path / 'tfds'), src, train=False)
    b = next(data_lib.eval_batches(src, global_batch=2, transform=tf))
    want = events.resize_frames(events.frames_by_number(expected['test'][0][0], 4, (128, 128)), 64)
    np.testing.assert_allclose(b['image'][0], want, rtol=1e-6)


def test_prepare_cli(tmp_path):
  """Event data prepares without TensorFlow; the catalog datasets say what they need."""
  event_fixtures.write_nmnist_tree(str(tmp_path / 'dl'), per_class=1)
  run = lambda *a: subprocess.run(
    [sys.executable, str(ROOT / 'prepare.py'), *a],  # noqa: E731
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  out = run(
    '--dataset=nmnist',
    '--frames=2',
    f'--data_dir={tmp_path / "tfds"}',
    f'--manual_dir={tmp_path / "dl"}',
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'prepared nmnist (' in out.stdout and 'train 10' in out.stdout
  # The shipped N-MNIST config trains on what prepare.py wrote (shrunk to T=2).
  from spikeformer_jax.configs import spikformer  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import train_lib  # pylint: disable=import-outside-toplevel

  c = config_lib.apply_overrides(
    spikformer.get_config('nmnist-1-128'),
    {
      'data.data_dir': str(tmp_path / 'tfds'),
      'model.T': 2,
      'data.shape': (2, 32, 32, 2),
      'model.embed_dim': 32,
      'model.num_heads': 2,
      'batch_size': 8,
      'eval_batch_size': 8,
      'total_steps': 2,
      'log_every_steps': 1,
      'num_devices': 1,
    },
  )
  final = train_lib.train_and_evaluate(c, str(tmp_path / 'run'))
  assert final['test_examples'] == 10 and final['steps'] == 2
  out = run(
    '--dataset=dvs128_gesture',
    f'--data_dir={tmp_path / "tfds"}',
    f'--manual_dir={tmp_path / "nothing"}',
  )
  assert out.returncode == 1 and 'DvsGesture.tar.gz' in out.stderr
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    out = run('--dataset=cifar10', f'--data_dir={tmp_path / "tfds"}')
    assert out.returncode != 0 and 'pip install ".[prepare]"' in out.stderr


def test_synthetic_events_are_learnable_frames():
  a = sources.synthetic_events('train', shape=(4, 32, 32, 2), num_classes=11, num_examples=8)
  b = sources.synthetic_events('train', shape=(4, 32, 32, 2), num_classes=11, num_examples=8)
  assert a.images.shape == (8, 4, 32, 32, 2) and a.mean is None
  np.testing.assert_array_equal(a.images, b.images)
  assert (a.images >= 0).all() and (a.images == np.round(a.images)).all() and a.images.sum() > 0
  img = sources.synthetic_events(
    'test', shape=(4, 32, 32, 2), num_classes=10, num_examples=4, kind='image'
  )
  assert not np.array_equal(img.images, a.images[:4])
  with pytest.raises(ValueError, match='11 classes'):
    sources.synthetic_events('train', shape=(4, 32, 32, 2), num_classes=12, num_examples=2)
