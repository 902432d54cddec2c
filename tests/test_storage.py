"""spikeformer_jax.storage on a local directory and on Cloud Storage (a real
GCS API on loopback: tests/gcs_server.py)."""

import concurrent.futures
import os
import subprocess
import sys

import pytest

from spikeformer_jax import errors
from spikeformer_jax import storage


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'run')
  return request.getfixturevalue('gcs_dir')


def test_refuses_schemes_orbax_cannot_write():
  for bad in ('s3://b/run', 'az://c/run', 'hf://x/y', 'http://host/run'):
    with pytest.raises(errors.ConfigError, match=r'not supported .* gs://BUCKET/PATH'):
      storage.check(bad)
  with pytest.raises(errors.ConfigError, match='names no bucket'):
    storage.check('gs://')
  assert storage.check('gs://b/run') == 'gs://b/run'
  assert storage.check('runs/a') == 'runs/a'  # local paths as given


def test_names_keep_the_scheme():
  assert storage.join('gs://b/run', 'checkpoints', '3') == 'gs://b/run/checkpoints/3'
  assert storage.dirname('gs://b/run/checkpoints') == 'gs://b/run'
  assert storage.dirname('gs://b/run/') == 'gs://b'
  assert storage.basename('gs://b/run/metrics.jsonl') == 'metrics.jsonl'
  assert storage.abspath('gs://b/run/') == 'gs://b/run'
  assert storage.abspath('rel') == os.path.abspath('rel')
  assert not storage.is_remote('/tmp/x') and storage.is_remote('gs://b')


def test_files(root):
  storage.makedirs(root)
  f = storage.join(root, 'a.json')
  assert not storage.exists(f)
  storage.write_text(f, 'one')
  storage.write_text(f, 'two')  # replaced whole
  assert storage.read_text(f) == 'two' and storage.isfile(f) and not storage.isdir(f)
  storage.makedirs(storage.join(root, 'sub'))
  storage.write_text(storage.join(root, 'sub', 'x'), 'x')
  assert sorted(storage.listdir(root)) == ['a.json', 'sub'] and storage.isdir(
    storage.join(root, 'sub')
  )
  storage.move(storage.join(root, 'sub'), storage.join(root, 'moved'))
  assert sorted(storage.listdir(root)) == ['a.json', 'moved']
  assert storage.read_text(storage.join(root, 'moved', 'x')) == 'x'
  storage.rmtree(storage.join(root, 'moved'))
  storage.remove(f)
  assert storage.listdir(root) == []
  with pytest.raises(FileNotFoundError):
    storage.remove(f)
  with storage.open_file(storage.join(root, 'w.txt'), 'w') as out:
    out.write('line\n')
  with storage.open_file(storage.join(root, 'w.txt')) as inp:
    assert inp.read() == 'line\n'


def test_create_exclusive_has_one_winner(root):
  storage.makedirs(root)
  for race in range(5):
    path = storage.join(root, f'lock{race}')
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      wins = list(pool.map(storage.create_exclusive, [path] * 8, [b'%d' % i for i in range(8)]))
    assert sum(wins) == 1, wins
    assert storage.read_bytes(path) == b'%d' % wins.index(True)


def test_another_process_writes_are_seen(root):
  """gcsfs caches listings: a file another process wrote must still be seen."""
  storage.makedirs(root)
  storage.write_text(storage.join(root, 'mine'), '')
  assert storage.listdir(root) == ['mine']
  code = (
    'import sys; from spikeformer_jax import storage; '
    'storage.write_text(storage.join(sys.argv[1], "theirs"), "t")'
  )
  subprocess.run([sys.executable, '-c', code, root], check=True, timeout=120)
  assert sorted(storage.listdir(root)) == ['mine', 'theirs']
  assert storage.exists(storage.join(root, 'theirs'))


def test_info_uses_the_stores_clock(root):
  storage.makedirs(root)
  f = storage.join(root, 'f')
  storage.write_bytes(f, b'abc')
  i = storage.info(f)
  assert i['size'] == 3
  assert abs(storage.now(root) - i['modified']) < 60
  assert (i['generation'] is not None) == storage.is_remote(root)


def test_appending_to_an_object_is_refused(gcs_dir):
  with pytest.raises(ValueError, match='cannot append'):
    storage.open_file(storage.join(gcs_dir, 'metrics.jsonl'), 'a')
