"""Event streams: native formats, SpikingJelly's integrations and splits, synthetic events."""

import io
import struct
import tarfile

import numpy as np
import pytest

import event_fixtures
from spikeformer_jax.data import events


def _events(t, x, y, p):
  ev = np.empty(len(t), events.EVENT_DTYPE)
  ev['t'], ev['x'], ev['y'], ev['p'] = t, x, y, p
  return ev


def test_frames_by_number_by_hand():
  # 10 events, T=3: di = 3, frames take events [0, 3), [3, 6), [6, 10).
  ev = _events(
    np.arange(10), x=[0, 1, 0, 2, 2, 2, 0, 0, 1, 1], y=[0] * 10, p=[1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
  )
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
  ev = _events(
    np.sort(rng.integers(0, 1 << 23, n)),
    rng.integers(0, 34, n),
    rng.integers(0, 34, n),
    rng.integers(0, 2, n),
  )
  data = event_fixtures.write_nmnist(ev)
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
      streams[sample] = _events(
        np.sort(rng.integers(0, 300000, n)),
        rng.integers(0, 34, n),
        rng.integers(0, 34, n),
        rng.integers(0, 2, n),
      )
      add(f'{sample}.bs2', event_fixtures.write_nmnist(streams[sample]))
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


# ---------------------------------------------------------------------------
# Readers and writers of the distributed formats.


def _random_events(rng, n, t_max, size=128):
  return _events(
    np.sort(rng.integers(0, t_max, n)),
    rng.integers(0, size, n),
    rng.integers(0, size, n),
    rng.integers(0, 2, n),
  )


def _assert_events_equal(a, b):
  assert a.dtype == events.EVENT_DTYPE and len(a) == len(b)
  for k in ('t', 'x', 'y', 'p'):
    np.testing.assert_array_equal(a[k], b[k])


def test_aedat31_round_trip_overflow_and_packets():
  rng = np.random.default_rng(2)
  ev = _random_events(rng, 3000, 1 << 33)  # t spans 4 overflow periods of 2**31 us
  ev['t'][:5] = [0, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, 3 << 31]
  ev = ev[np.argsort(ev['t'], kind='stable')]
  data = event_fixtures.write_aedat31(ev, packet_size=500)
  _assert_events_equal(events.read_aedat31(data), ev)
  # By hand: a special-event packet (type 0, skipped), then a polarity packet
  # with tsOverflow = 2 and capacity 2 > number 1 (SpikingJelly decodes every slot).
  pack = lambda *f: struct.pack('<HHIIIIII', *f)
  word = (100 << 17) | (37 << 2) | (1 << 1) | 1
  data = (
    b'#!AER-DAT3.1\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n'
    + pack(0, 1, 8, 4, 0, 1, 1, 1)
    + struct.pack('<II', 0xFFFFFFFF, 7)
    + pack(1, 1, 8, 4, 2, 2, 1, 1)
    + struct.pack('<IIII', word, 5, 0, 9)
  )
  back = events.read_aedat31(data)
  assert back['t'].tolist() == [(2 << 31) | 5, (2 << 31) | 9]
  assert (back['x'][0], back['y'][0], back['p'][0]) == (100, 37, 1)
  assert (back['x'][1], back['y'][1], back['p'][1]) == (0, 0, 0)
  with pytest.raises(ValueError, match='END-HEADER'):
    events.read_aedat31(b'#!AER-DAT3.1\r\n' + pack(1, 1, 8, 4, 0, 0, 0, 0))


def test_gesture_csv_split_by_hand():
  ev = _events(np.arange(0, 100, 10), [0] * 10, [0] * 10, [1] * 10)  # t = 0, 10, ..., 90
  csv = (
    'class,startTime_usec,endTime_usec\n'
    '1,10,40\n'  # start inclusive, end exclusive: t = 10, 20, 30
    '8,35,60\n'  # overlaps the next window
    '8,50,51\n'  # the same class again: the recording's 2nd class-8 sample
    '11,90,1000\n'
  )
  samples = events.gesture_samples(ev, csv)
  assert [label for _, label in samples] == [0, 7, 7, 10]
  assert [s['t'].tolist() for s, _ in samples] == [[10, 20, 30], [40, 50], [50], [90]]
  split = events._gesture_split(ev, csv, 'user01_led')
  assert [n for _, _, n in split] == [
    'user01_led_0',
    'user01_led_0',
    'user01_led_1',
    'user01_led_0',
  ]
  with pytest.raises(ValueError, match='outside 1..11'):
    events.gesture_samples(ev, 'class,start,end\n0,0,10\n')
  assert events.read_trials(' user01_led.aedat \r\n\r\nuser02_lab.aedat\n') == [
    'user01_led.aedat',
    'user02_lab.aedat',
  ]
  # DatasetFolder order and targets: folders '0', '1', '10', '2', ... in string order.
  assert events.SPIKINGJELLY_GESTURE_TARGET == (0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 2)
  order = events.spikingjelly_gesture_order([2, 10, 2, 1], ['u1_0', 'u1_0', 'u0_0', 'u2_0'])
  assert order.tolist() == [3, 1, 2, 0]


def test_iter_gesture_over_written_trees(tmp_path):
  kw = dict(
    users=(1, 3, 24),
    lightings=('fluorescent', 'lab'),
    labels=(0, 7, 10, 7),
    gesture_us=(150_000, 250_000),
    sensor=(48, 48),
  )
  expected = event_fixtures.write_gesture_tree(str(tmp_path / 'dir'), **kw)
  event_fixtures.write_gesture_tree(str(tmp_path / 'tar'), archive=True, **kw)
  # The same archive with the trial lists last: recordings arrive before the
  # reader knows their split.
  with tarfile.open(tmp_path / 'tar' / 'DvsGesture.tar.gz') as tar:
    members = [(m, tar.extractfile(m).read()) for m in tar]
  (tmp_path / 'late').mkdir()
  with tarfile.open(tmp_path / 'late' / 'DvsGesture.tar.gz', 'w:gz') as tar:
    for m, payload in reversed(members):
      tar.addfile(m, io.BytesIO(payload))
  assert members[0][0].name.startswith('DvsGesture/trials_to_')
  assert len(expected['train']) == 16 and len(expected['test']) == 8
  names = [n for _, _, n in expected['train'][:4]]
  assert names == [
    'user01_fluorescent_0',
    'user01_fluorescent_0',
    'user01_fluorescent_0',
    'user01_fluorescent_1',
  ]
  for split in ('train', 'test'):
    for root in (
      tmp_path / 'dir',
      tmp_path / 'dir' / 'DvsGesture',
      tmp_path / 'tar',
      tmp_path / 'tar' / 'DvsGesture.tar.gz',
      tmp_path / 'late',
    ):
      got = list(events.iter_gesture(str(root), split, with_names=True))
      assert [(label, n) for _, label, n in got] == [(label, n) for _, label, n in expected[split]]
      for (a, _, _), (b, _, _) in zip(got, expected[split]):
        _assert_events_equal(a, b)  # the noise between gestures stays out
  assert [label for _, label in events.iter_gesture(str(tmp_path / 'dir'), 'test')] == [
    0,
    7,
    10,
    7,
  ] * 2
  with pytest.raises(FileNotFoundError, match='DvsGesture'):
    next(events.iter_gesture(str(tmp_path), 'train'))
  with pytest.raises(ValueError, match='splits train and test'):
    next(events.iter_gesture(str(tmp_path / 'dir'), 'val'))


def test_cifar10dvs_format_by_hand_and_round_trip():
  # One raw record: x_raw = 3, y_raw = 5, p_raw = 1, t = 1234 -> x = 127 - 5, y = 127 - 3, p = 0.
  addr = (5 << 8) | (3 << 1) | 1
  data = b'#!AER-DAT2.0\r\n# comment\r\n' + struct.pack('>II', addr, 1234)
  one = events.read_cifar10dvs(data)
  assert (one['t'][0], one['x'][0], one['y'][0], one['p'][0]) == (1234, 122, 124, 0)
  assert len(events.read_cifar10dvs(b'#!AER-DAT2.0\r\n')) == 0
  rng = np.random.default_rng(3)
  ev = _random_events(rng, 2000, 1 << 32)
  _assert_events_equal(events.read_cifar10dvs(event_fixtures.write_cifar10dvs(ev)), ev)
  with pytest.raises(ValueError, match='whole 8-byte events'):
    events.read_cifar10dvs(data[:-4])
  with pytest.raises(ValueError, match=r'\[0, 127\]'):
    event_fixtures.write_cifar10dvs(_events([0], [128], [0], [1]))


def test_front_split_by_hand():
  labels = [0, 1, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # class 0: 11, class 1: 2, class 2: 1
  train, test = events.front_split(labels, 0.9, num_classes=3)
  class0 = [0, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13]
  # ceil(11 * 0.9) = 10, ceil(2 * 0.9) = 2, ceil(1 * 0.9) = 1 train; class-major order.
  assert train.tolist() == class0[:10] + [1, 5] + [4]
  assert test.tolist() == class0[10:]
  train, test = events.front_split([1] * 1000 + [0] * 1000)
  assert train.tolist() == list(range(1000, 1900)) + list(range(900))
  assert test.tolist() == list(range(1900, 2000)) + list(range(900, 1000))
  with pytest.raises(ValueError, match='labels must lie'):
    events.front_split([0, 10])


def test_iter_cifar10dvs_over_written_trees(tmp_path):
  kw = dict(sensor=(24, 24), n_steps=8, duration_us=40_000)
  expected = event_fixtures.write_cifar10dvs_tree(str(tmp_path / 'dir'), 12, **kw)
  event_fixtures.write_cifar10dvs_tree(str(tmp_path / 'zip'), 12, zipped=True, **kw)
  assert sorted(p.name for p in (tmp_path / 'zip').iterdir())[:2] == [
    'airplane.zip',
    'automobile.zip',
  ]
  # String order within a class, as SpikingJelly's DatasetFolder: 0, 1, 10, 11, 2, ..., 9.
  order = [0, 1, 10, 11] + list(range(2, 10))
  want = [
    (f'cifar10_{c}_{i}', label) for label, c in enumerate(events.CIFAR10DVS_CLASSES) for i in order
  ]
  for root in ('dir', 'zip'):
    got = list(events.iter_cifar10dvs(str(tmp_path / root), with_names=True))
    assert [(n, label) for _, label, n in got] == want
    for ev, label, name in got:
      _assert_events_equal(ev, expected[name][0])
      assert label == expected[name][1]
  labels = [label for _, label in want]
  train, test = events.front_split(labels)  # ceil(10.8) = 11 train per class
  assert len(train) == 110 and [want[i][0] for i in test[:2]] == [
    'cifar10_airplane_9',
    'cifar10_automobile_9',
  ]
  with pytest.raises(FileNotFoundError, match='all 10'):
    next(events.iter_cifar10dvs(str(tmp_path)))


def test_iter_nmnist_over_written_trees(tmp_path):
  expected = event_fixtures.write_nmnist_tree(
    str(tmp_path / 'dir'), 2, n_steps=10, duration_us=50_000
  )
  event_fixtures.write_nmnist_tree(
    str(tmp_path / 'zip'), 2, zipped=True, n_steps=10, duration_us=50_000
  )
  assert (tmp_path / 'zip' / 'Train.zip').is_file()
  for split in ('train', 'test'):
    want = sorted((label, name) for name, (_, label) in expected[split].items())
    for root in ('dir', 'zip'):
      got = list(events.iter_nmnist(str(tmp_path / root), split, with_names=True))
      assert [(label, n) for _, label, n in got] == want and len(got) == 20
      for ev, _, name in got:
        _assert_events_equal(ev, expected[split][name][0])
        assert ev['x'].max() < 34 and ev['y'].max() < 34
  with pytest.raises(FileNotFoundError, match='Train.zip'):
    next(events.iter_nmnist(str(tmp_path), 'train'))


# ---------------------------------------------------------------------------
# Integration and resizing.


def _sj_split_by_time(t, T):
  """SpikingJelly's cal_fixed_frames_number_segment_index(t, 'time', T), transliterated."""
  j_l, j_r = np.zeros(T, int), np.zeros(T, int)
  dt = (t[-1] - t[0]) // T
  idx = np.arange(t.size)
  for i in range(T):
    t_l = dt * i + t[0]
    masked = idx[(t >= t_l) & (t < t_l + dt)]
    j_l[i], j_r[i] = masked[0], masked[-1] + 1
  j_r[-1] = t.size
  return j_l, j_r


def test_frames_by_time_by_hand_and_against_spikingjelly():
  # t = 0, 2, 3, 5, 7, 9, 11, T = 3: dt = 11 // 3 = 3, frames [0, 3), [3, 6) and
  # [6, end]: the last one takes t = 9, 11 beyond 6 + 3 too.
  ev = _events([0, 2, 3, 5, 7, 9, 11], x=[0, 1, 1, 2, 0, 0, 2], y=[0] * 7, p=[1, 0, 1, 1, 0, 1, 1])
  f = events.frames_by_time(ev, 3, 1, 3)
  assert f.shape == (3, 1, 3, 2) and f.dtype == np.float32
  np.testing.assert_array_equal(f[0, 0], [[0, 1], [1, 0], [0, 0]])
  np.testing.assert_array_equal(f[1, 0], [[0, 0], [0, 1], [0, 1]])
  np.testing.assert_array_equal(f[2, 0], [[1, 1], [0, 0], [0, 1]])
  rng = np.random.default_rng(4)
  for T in (1, 4, 16):
    ev = _random_events(rng, 5000, 10**6, size=16)
    j_l, j_r = _sj_split_by_time(ev['t'], T)
    got = events.frames_by_time(ev, T, 16, 16)
    for i in range(T):
      want = events.frames_by_number(ev[j_l[i] : j_r[i]], 1, (16, 16))[0]
      np.testing.assert_array_equal(got[i], want)
  # An empty window (SpikingJelly: IndexError) gives an empty frame.
  f = events.frames_by_time(_events([0, 1, 9], [0] * 3, [0] * 3, [1] * 3), 3, 1, 1)
  assert f[:, 0, 0, 1].tolist() == [2, 0, 1]
  with pytest.raises(ValueError, match='sorted'):
    events.frames_by_time(_events([5, 1], [0, 0], [0, 0], [0, 0]), 2, 1, 1)


def test_resize_frames_shape_mass_and_pil():
  rng = np.random.default_rng(5)
  frames = rng.poisson(1.0, (3, 128, 128, 2)).astype(np.float32)
  out = events.resize_frames(frames, 64)
  assert out.shape == (3, 64, 64, 2) and out.dtype == np.float32
  # torchvision's tensor Resize without antialias: a 2x reduction is a 2x2 mean.
  np.testing.assert_allclose(out, frames.reshape(3, 64, 2, 64, 2, 2).mean((2, 4)), rtol=1e-6)
  np.testing.assert_allclose(out.sum() * 4, frames.sum(), rtol=1e-5)
  # Upsampling 2 -> 4 by hand (align_corners=False, sources clamped at the edges).
  tiny = np.array([1.0, 5.0], np.float32)[None, :, None, None] * np.ones((1, 1, 2, 2), np.float32)
  up = events.resize_frames(tiny, 4)[0, :, 0, 0]
  np.testing.assert_allclose(up, [1.0, 2.0, 4.0, 5.0])
  # Antialiased: PIL's bilinear filter (torchvision >= 0.17), down and up.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for size in (48, 64, 160):
    aa = events.resize_frames(frames, size, antialias=True)
    for t, c in ((0, 0), (2, 1)):
      pil = np.asarray(
        Image.fromarray(frames[t, :, :, c], 'F').resize((size, size), Image.BILINEAR)
      )
      np.testing.assert_allclose(aa[t, :, :, c], pil, atol=1e-4)
  np.testing.assert_allclose(events.resize_frames(frames, 128), frames, atol=1e-6)  # identity


# ---------------------------------------------------------------------------
# Synthetic generators.


def _check_stream(ev, sensor):
  assert ev.dtype == events.EVENT_DTYPE and len(ev) > 1000
  assert np.all(np.diff(ev['t']) >= 0) and ev['t'].min() >= 0
  assert 0 <= ev['x'].min() and ev['x'].max() < sensor[1]
  assert 0 <= ev['y'].min() and ev['y'].max() < sensor[0]
  assert set(np.unique(ev['p']).tolist()) == {0, 1} and 0.4 < ev['p'].mean() < 0.6


def test_synthetic_image_events():
  image = events.procedural_image(3, np.random.default_rng(0))
  rgb = np.repeat(image[..., None], 3, -1)
  ev = events.synthetic_image_events(rgb, np.random.default_rng(7))
  _check_stream(ev, (128, 128))
  assert ev['t'].max() < 300_000 and 10_000 < len(ev) < 300_000
  _assert_events_equal(events.synthetic_image_events(image, np.random.default_rng(7)), ev)
  other = events.synthetic_image_events(image, np.random.default_rng(8))
  assert len(other) != len(ev) or np.any(other['t'] != ev['t'])
  nm = events.synthetic_image_events(image[:28, :28], np.random.default_rng(1), (34, 34))
  _check_stream(nm, (34, 34))
  event_fixtures.write_nmnist(nm)  # fits the native format
  blank = events.synthetic_image_events(
    np.zeros((32, 32), np.uint8), np.random.default_rng(1), noise_hz=0.0
  )
  assert len(blank) == 0  # no contrast, no noise: no events


def test_synthetic_gesture_events():
  streams = [
    events.synthetic_gesture_events(
      label, np.random.default_rng(5), (64, 64), duration_us=2_000_000
    )
    for label in range(11)
  ]
  for ev in streams:
    _check_stream(ev, (64, 64))
    assert ev['t'].max() < 2_000_000
  _assert_events_equal(
    events.synthetic_gesture_events(4, np.random.default_rng(5), (64, 64), duration_us=2_000_000),
    streams[4],
  )

  def track(ev, T=16):  # the event centroid per time bin
    f = events.frames_by_time(ev, T, 64, 64).sum(-1).reshape(T, -1)
    ys, xs = np.divmod(np.arange(64 * 64), 64)
    return np.stack([f @ xs, f @ ys], 1) / f.sum(1, keepdims=True)

  def turn(c):  # signed area swept: > 0 clockwise (y down)
    c = c - c.mean(0)
    return np.sum(c[:-1, 0] * c[1:, 1] - c[1:, 0] * c[:-1, 1])

  tracks = [track(ev) for ev in streams]
  assert turn(tracks[3]) > 0 > turn(tracks[4]) and turn(tracks[5]) > 0 > turn(tracks[6])
  assert tracks[1][:, 0].mean() < 32 < tracks[2][:, 0].mean()  # right vs left hand wave
  hist = np.stack(
    [np.bincount(ev['y'].astype(int) * 64 + ev['x'], minlength=64 * 64) / len(ev) for ev in streams]
  )
  dist = np.abs(hist[:, None] - hist[None]).sum(-1)
  assert np.all(dist[~np.eye(11, dtype=bool)] > 0.2)  # every pair of classes differs in space
  d = events.synthetic_gesture_events(10, np.random.default_rng(9))
  assert 1_000_000 <= d['t'].max() < 6_000_000  # default: 1-6 s at 128x128
  with pytest.raises(ValueError, match='classes 0..10'):
    events.synthetic_gesture_events(11, np.random.default_rng(0))
