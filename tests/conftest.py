"""Test setup: 8 simulated CPU devices, set before JAX starts."""

import os
import pathlib
import sys
import tempfile

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests (and their train.py / eval.py subprocesses) compile the same
# programs; JAX's persistent cache (keyed by program and JAX version) makes the
# repeats near free. Environment variables, so subprocesses inherit them.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'spikeformer_jax_test_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# Two workers and their subprocesses share that cache, and without a size limit
# JAX writes entries with no lock: a reader could load a half-written one. A
# limit makes it lock each read and write (the `filelock` package).
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))


def _give_every_cache_entry_an_atime(path: str) -> None:
  """Entries written without a size limit have no '-atime' file.

  JAX's eviction reads every entry's '-atime', so one such entry (an older
  run's, in a /tmp that outlives runs) makes every later write fail with a
  warning: the cache then stays cold (CI's tests took 23:42 instead of about 11
  min). JAX's LRUCache locks '.lockfile' in the cache directory: the same lock.
  """
  import filelock  # pylint: disable=g-import-not-at-top

  cache = pathlib.Path(path)
  cache.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(cache / '.lockfile', timeout=120):
    for entry in cache.glob('*-cache'):
      atime = entry.with_name(entry.name.removesuffix('-cache') + '-atime')
      if not atime.exists():  # when it was written: the oldest go first
        atime.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, 'little'))


_give_every_cache_entry_an_atime(os.environ['JAX_COMPILATION_CACHE_DIR'])

import pytest  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope='session')
def shared_dir():
  """../shared beside the project; tests that need it skip when it is absent."""
  if not SHARED.is_dir():
    pytest.skip(f'{SHARED} is absent (fixtures and data live beside the project)')
  return SHARED


def run_fidelity(files, out: pathlib.Path, timeout: int, *flags: str):
  """`python -m spikeformer_jax.fidelity FILES --json OUT [FLAGS]` on one CPU
  device: ({file name: its report}, the finished process)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'spikeformer_jax.fidelity',
      *map(str, files),
      '--json',
      str(out),
      *flags,
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return {r['file']: r for r in json.loads(out.read_text())}, proc


def assert_one_step_moves_every_parameter(c):
  """One train step of config `c` on one device: a finite loss, and every
  parameter changes (a field that cut a gradient path would leave some)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spikeformer_jax import data as data_lib, experiment, sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(1)
  loader = data_lib.Loader(
    data_lib.get_source(c.data, 'train'), global_batch=c.batch_size, seed=c.seed
  )
  exp = experiment.build(c, mesh, loader.steps_per_epoch)
  state = exp.init_state()
  before = jax.device_get(state['params'])
  state, metrics = experiment.make_train_step(exp)(
    state, sharding.global_batch(loader.batch(0), mesh)
  )
  assert np.isfinite(float(metrics['loss']))
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(state['params']))
  assert all(jax.tree.leaves(moved))


@pytest.fixture(scope='session')
def gcs_server():
  """fake-gcs-server on loopback (tests/gcs_server.py), its variables in
  os.environ for this process and its subprocesses; skips where it cannot start."""
  import gcs_server as lib  # pylint: disable=g-import-not-at-top

  import importlib.util  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec('gcsfs') is None:  # not imported: it reads the variables at import
    pytest.skip('gcsfs is not installed (pip install -e ".[test]")')
  try:
    server = lib.Server()
  except RuntimeError as e:
    pytest.skip(str(e))
  saved = {k: os.environ.get(k) for k in server.env}
  os.environ.update(server.env)
  try:
    yield server
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture
def gcs_dir(gcs_server, request):
  """A fresh gs:// directory (a new bucket per test: nothing leaks between tests)."""
  import re  # pylint: disable=g-import-not-at-top
  import uuid  # pylint: disable=g-import-not-at-top

  name = re.sub(r'[^a-z0-9]+', '-', request.node.name.lower())[:40].strip('-')
  bucket = f'{name}-{uuid.uuid4().hex[:8]}'
  gcs_server.make_bucket(bucket)
  return f'gs://{bucket}/run'


@pytest.fixture(scope='session')
def slurm():
  """A private single-node SLURM cluster (tests/slurm_cluster.py: how to
  submit, wait for a job and read its output; partition 'debug', one node
  named after this host, 8 CPUs, 8 GPUs in name only). Installs Debian's
  slurm-wlm and munge if absent (root only); skips where they cannot be
  installed or the daemons cannot start. One cluster per test worker, stopped
  by PID at the end of the session."""
  import slurm_cluster  # pylint: disable=g-import-not-at-top

  try:
    cluster = slurm_cluster.Cluster()
  except slurm_cluster.Unavailable as e:
    pytest.skip(f'no SLURM here: {e}')
  try:
    yield cluster
  finally:
    cluster.stop()
