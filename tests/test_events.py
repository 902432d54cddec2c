"""Event streams: the native N-MNIST format and SpikingJelly's split_by='number'."""

import io
import tarfile

import numpy as np
import pytest

from spikeformer_jax.data import events


def _events(t, x, y, p):
  ev = np.empty(len(t), events.EVENT_DTYPE)
  ev['t'], ev['x'], ev['y'], ev['p'] = t, x, y, p
  return ev


def test_frames_by_number_by_hand():
  # 10 events, T=3: di = 3, frames take events [0, 3), [3, 6), [6, 10).
  ev = _events(np.arange(10), x=[0, 1, 0, 2, 2, 2, 0, 0, 1, 1], y=[0] * 10,
               p=[1, 1, 0, 1, 0, 0, 1, 1, 1, 0])
  f = events.frames_by_number(ev, 3, (1, 3))
  assert f.shape == (3, 1, 3, 2) and f.dtype == np.float32
  # [frame, x, polarity] (y = 0): frame 0: ON at x0, x1, OFF at x0.
  np.testing.assert_array_equal(f[0, 0], [[1, 1], [0, 1], [0, 0]])
  np.testing.assert_array_equal(f[1, 0], [[0, 0], [0, 0], [2, 1]])
  np.testing.assert_array_equal(f[2, 0], [[0, 2], [1, 1], [0, 0]])  # the remainder: 4 events
  assert f.sum() == 10
  with pytest.raises(ValueError, match='T=0'):
    events.frames_by_number(ev, 0, (1, 3))


def test_nmnist_format_round_trip_and_errors():
  rng = np.random.default_rng(0)
  n = 500
  ev = _events(np.sort(rng.integers(0, 1 << 23, n)), rng.integers(0, 34, n),
               rng.integers(0, 34, n), rng.integers(0, 2, n))
  data = events.write_nmnist(ev)
  assert len(data) == 5 * n
  back = events.read_nmnist(data)
  for k in ('t', 'x', 'y', 'p'):
    np.testing.assert_array_equal(back[k], ev[k])
  # One hand-made record: x=18, y=16, ON, t = 0x00037D.
  one = events.read_nmnist(bytes([18, 16, 128, 3, 125]))
  assert (one['x'][0], one['y'][0], one['p'][0], one['t'][0]) == (18, 16, 1, 0x37D)
  with pytest.raises(ValueError, match='not a whole number of 5-byte events'):
    events.read_nmnist(data[:-2])


def test_load_nmnist_tar_of_synthetic_files(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / 'nm.tar'
  streams = {}
  with tarfile.open(path, 'w') as tar:
    def add(name, payload):
      info = tarfile.TarInfo(f'nm/{name}')
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
    for sample in (1, 2, 7):
      n = int(rng.integers(20, 60))
      streams[sample] = _events(np.sort(rng.integers(0, 300000, n)), rng.integers(0, 34, n),
                                rng.integers(0, 34, n), rng.integers(0, 2, n))
      add(f'{sample}.bs2', events.write_nmnist(streams[sample]))
    add('train2.txt', b'#sample #class\n1\t5\n2\t0\n')
    add('test1.txt', b'#sample #class\n7\t3\n')
  d = events.load_nmnist_tar(str(path), T=4)
  assert d['x_train'].shape == (2, 4, 34, 34, 2) and d['y_train'].tolist() == [5, 0]
  assert d['x_test'].shape == (1, 4, 34, 34, 2) and d['y_test'].tolist() == [3]
  np.testing.assert_array_equal(d['x_test'][0], events.frames_by_number(streams[7], 4, (34, 34)))
  with pytest.raises(FileNotFoundError, match='point data.path at an N-MNIST tar'):
    events.load_nmnist_tar(str(tmp_path / 'missing.tar'), T=4)


def test_real_nmnist_subset(shared_dir):
  path = shared_dir / 'data' / 'nmnist_small.tar.gz'
  if not path.exists():
    pytest.skip(f'{path} is absent')
  with tarfile.open(path) as tar:
    ev = events.read_nmnist(tar.extractfile('nmnist_small/1.bs2').read())
  assert 1000 <= len(ev) <= 7000
  assert ev['x'].max() < 34 and ev['y'].max() < 34 and set(np.unique(ev['p'])) == {0, 1}
  assert np.all(np.diff(ev['t']) >= 0) and 2e5 < ev['t'][-1] < 4e5  # ~300 ms, sorted
  f = events.frames_by_number(ev, 10, events.NMNIST_SIZE)
  assert f.sum() == len(ev)
  counts = f.reshape(10, -1).sum(1)
  assert np.all(counts[:-1] == len(ev) // 10) and counts[-1] == len(ev) - 9 * (len(ev) // 10)
  d = events.load_nmnist_tar(str(path), T=4)
  assert d['x_train'].shape == (1000, 4, 34, 34, 2) and d['x_test'].shape == (100, 4, 34, 34, 2)
  assert d['y_train'][0] == 5 and d['y_train'][1] == 0 and set(d['y_train']) == set(range(10))
