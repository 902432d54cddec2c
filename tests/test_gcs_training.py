"""A run in Cloud Storage (`--workdir=gs://BUCKET/run`) against a real GCS API
on loopback (tests/gcs_server.py): the workdir lock through the store's
preconditions and clock, metrics.jsonl and TensorBoard without appends, and
real train.py processes that run, are refused, preempted, killed -9 and
resumed, fall back from a damaged checkpoint and start other runs (init_from),
ending bit for bit as one uninterrupted local run."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from conftest import ROOT
from spikeformer_jax import checkpointing, errors, metrics, storage, workdir as workdir_lib
from test_reliability import _tensorboard_scalars

# ---------------------------------------------------------------- the lock


def _other_holder(**over):
  return {
    **workdir_lib._identity(),  # pylint: disable=protected-access
    'host': 'other-host',
    'pid': 1,
    'time': time.time(),
    'command': 'train.py --workdir=gs://x',
    'token': 'theirs',
    **over,
  }


def _later(monkeypatch, seconds):
  """The store's clock `seconds` ahead: a lock written now looks that old."""
  now = storage.now
  monkeypatch.setattr(storage, 'now', lambda d: now(d) + seconds)


def test_a_live_holder_keeps_a_gs_workdir(gcs_dir):
  lock_path = storage.join(gcs_dir, workdir_lib.LOCK_NAME)
  with workdir_lib.WorkdirLock(gcs_dir, command='train.py A'):
    held = json.loads(storage.read_bytes(lock_path))
    assert held['pid'] == os.getpid()
    with pytest.raises(errors.WorkdirBusy) as e:
      workdir_lib.WorkdirLock(gcs_dir).acquire()
    assert workdir_lib.holder(gcs_dir)['token'] == held['token']
  msg = str(e.value)
  assert msg.startswith(f'the workdir {gcs_dir} is in use by process {os.getpid()} on ')
  assert 'train.py A' in msg and '\n' not in msg
  assert not storage.exists(lock_path)  # released
  assert workdir_lib.holder(gcs_dir) is None
  assert workdir_lib.ensure(gcs_dir) == []  # nothing to create in a store
  with pytest.raises(errors.ConfigError, match='s3:// is not supported'):
    workdir_lib.ensure('s3://bucket/run')


def test_a_holder_elsewhere_is_stale_by_the_stores_clock(gcs_dir, monkeypatch):
  lock_path = storage.join(gcs_dir, workdir_lib.LOCK_NAME)
  storage.write_text(lock_path, json.dumps(_other_holder()))
  with pytest.raises(errors.WorkdirBusy, match='on other-host.*heartbeat is 0 s old'):
    workdir_lib.WorkdirLock(gcs_dir).acquire()
  _later(monkeypatch, workdir_lib.STALE_S + 5)
  lock = workdir_lib.WorkdirLock(gcs_dir).acquire()
  assert json.loads(storage.read_bytes(lock_path))['token'] == lock._me['token']  # pylint: disable=protected-access
  lock.release()
  assert not storage.exists(lock_path)
  # Not a lock we wrote: busy while young, taken over when old.
  monkeypatch.undo()
  storage.write_text(lock_path, '{"host": "oth')
  with pytest.raises(errors.WorkdirBusy, match='has an unreadable lock .*train.lock, touched'):
    workdir_lib.WorkdirLock(gcs_dir).acquire()
  _later(monkeypatch, workdir_lib.STALE_S + 5)
  workdir_lib.WorkdirLock(gcs_dir).acquire().release()


def test_a_dead_holder_on_this_machine_is_stale_at_once(gcs_dir):
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()
  me = workdir_lib._identity()  # pylint: disable=protected-access
  dead = {**me, 'pid': p.pid, 'start': '1', 'time': time.time(), 'token': 'dead'}
  storage.write_text(storage.join(gcs_dir, workdir_lib.LOCK_NAME), json.dumps(dead))
  workdir_lib.WorkdirLock(gcs_dir).acquire().release()


@pytest.mark.parametrize('stale', [False, True])
def test_takers_racing_for_a_gs_lock_get_one_holder(gcs_dir, monkeypatch, stale):
  """Threads of one process (each its own token); a free lock is raced for
  through the conditional create, a stale one through the overwrite of the
  generation judged stale."""
  if stale:
    _later(monkeypatch, workdir_lib.STALE_S + 5)
  for trial in range(3):
    wd = storage.join(gcs_dir, str(trial))
    if stale:
      storage.write_text(storage.join(wd, workdir_lib.LOCK_NAME), json.dumps(_other_holder()))
    barrier = threading.Barrier(6)

    def take(_, wd=wd, barrier=barrier):
      lock = workdir_lib.WorkdirLock(wd)
      barrier.wait()
      try:
        return lock.acquire()
      except errors.WorkdirBusy:
        return None

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      held = [lock for lock in pool.map(take, range(6)) if lock is not None]
    assert len(held) == 1, held
    on_store = json.loads(storage.read_bytes(storage.join(wd, workdir_lib.LOCK_NAME)))
    assert on_store['token'] == held[0]._me['token']  # pylint: disable=protected-access
    held[0].release()


def test_the_heartbeat_rewrites_the_lock_and_never_clobbers_a_takeover(gcs_dir, monkeypatch, capfd):
  monkeypatch.setattr(workdir_lib, 'HEARTBEAT_S', 0.05)
  lock_path = storage.join(gcs_dir, workdir_lib.LOCK_NAME)
  lock = workdir_lib.WorkdirLock(gcs_dir).acquire()
  first = storage.info(lock_path)['generation']
  deadline = time.time() + 30
  while storage.info(lock_path)['generation'] == first:  # rewritten: a younger 'updated'
    assert time.time() < deadline, 'the heartbeat did not rewrite the lock'
    time.sleep(0.05)
  # Another process judged it stale and took it over: our heartbeat stops.
  storage.write_text(lock_path, json.dumps(_other_holder(token='taker')))
  time.sleep(0.5)
  assert json.loads(storage.read_bytes(lock_path))['token'] == 'taker'
  assert 'was taken over by another process' in capfd.readouterr().err
  lock.release()  # and release leaves the taker's lock alone
  assert json.loads(storage.read_bytes(lock_path))['token'] == 'taker'


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_in_gs_are_committed_rotated_and_read_while_deleted(gcs_dir):
  """orbax through epath: a step counts once marked committed; `ckpt_keep`
  deletes old steps there; a reader whose step is deleted mid-read (no hard
  links to hold it) reads the new newest."""
  from test_reliability import _abstract, _state  # pylint: disable=import-outside-toplevel

  directory = storage.join(gcs_dir, 'checkpoints')
  ck = checkpointing.Checkpointer(directory, keep=2)
  for s in (1, 2, 3):
    ck.save(s, _state(s), {'step': s})
    ck.wait()
    ck.poll()
  ck.close()
  assert checkpointing.committed_steps(directory) == [2, 3]
  storage.write_text(storage.join(directory, '4', 'state', 'x'), '')  # being written: no mark
  assert checkpointing.committed_steps(directory) == [2, 3]
  storage.rmtree(storage.join(directory, '4'))
  calls = []

  def read(root, step):
    calls.append(step)
    if len(calls) == 1:  # the run's rotation deletes the step being read
      storage.rmtree(storage.join(root, str(step)))
      raise errors.CheckpointError('NOT_FOUND: gone')
    reader = checkpointing.Checkpointer(root, create=False)
    try:
      return reader.restore(_abstract(), step)
    finally:
      reader.close()

  state, meta = checkpointing.read_committed(directory, read, workdir=gcs_dir)
  assert calls == [3, 2] and meta == {'step': 2}
  np.testing.assert_array_equal(state['params']['b'], np.asarray(_state(2)['params']['b']))


# ---------------------------------------------------------------- metrics


def test_metric_lines_and_events_in_gs(gcs_dir, tmp_path):
  """No append in a store: the lines are written whole at sync(); a resume
  drops the later ones; TensorBoard's events are uploaded, and a rerun's
  purge applies to the earlier event file there."""
  path = storage.join(gcs_dir, 'metrics.jsonl')
  w = metrics.MetricWriter(gcs_dir, tensorboard=True)
  for step in (1, 2, 3):
    w.write(step, train_loss=1.0 / step)
  assert not storage.exists(path)  # not before sync
  w.sync()
  assert [json.loads(line)['step'] for line in storage.read_text(path).splitlines()] == [1, 2, 3]
  w.write(4, test_top1=0.5)
  w.close()
  assert len(storage.read_text(path).splitlines()) == 4
  (first,) = storage.listdir(storage.join(gcs_dir, 'tb'))
  stamp = first.split('.')[3]  # a rerun starts seconds later
  storage.move(
    storage.join(gcs_dir, 'tb', first),
    storage.join(gcs_dir, 'tb', first.replace(stamp, str(int(stamp) - 10))),
  )
  w = metrics.MetricWriter(gcs_dir, resume_step=2, tensorboard=True)
  assert [json.loads(line)['step'] for line in storage.read_text(path).splitlines()] == [1, 2]
  w.write(3, train_loss=0.25)
  w.close()
  rows = [json.loads(line) for line in storage.read_text(path).splitlines()]
  assert [(r['step'], r.get('train_loss')) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  local = tmp_path / 'tb'
  local.mkdir()
  for name in storage.listdir(storage.join(gcs_dir, 'tb')):
    (local / name).write_bytes(storage.read_bytes(storage.join(gcs_dir, 'tb', name)))
  assert _tensorboard_scalars(local) == [('train/loss', 1), ('train/loss', 2), ('train/loss', 3)]


# ---------------------------------------------------------------- train.py

# 22 steps an epoch: no periodic evaluation, a checkpoint every 4 steps.
ARGS = [
  '--config=configs/spikformer.py:digits',
  '--config.total_steps=16',
  '--config.ckpt_every_steps=4',
  '--config.log_every_steps=2',
  '--config.eval_every_epochs=0',
]


def _env():
  return dict(os.environ, JAX_NUM_CPU_DEVICES='1')  # with the server's variables


def _cmd(wd, *extra):
  return [sys.executable, 'train.py', f'--workdir={wd}', *ARGS, *extra]


def _run(wd, rc=0, cmd=None):
  p = subprocess.run(
    cmd or _cmd(wd), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
  )
  assert p.returncode == rc, p.stderr[-3000:]
  return p


def _last_line(p) -> str:
  assert 'Traceback' not in p.stderr, p.stderr[-3000:]
  return p.stderr.strip().splitlines()[-1]


def test_other_schemes_are_refused_in_one_line():
  p = subprocess.run(
    _cmd('s3://bucket/run'), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 1, p.stderr[-3000:]
  assert _last_line(p) == (
    'error: --workdir=s3://bucket/run: s3:// is not supported (orbax cannot write checkpoints '
    'there); use a local path, a mounted file system, or gs://BUCKET/PATH.'
  )
  assert not (ROOT / 's3:').exists()


def _params(wd, step):
  """{name: array} of the params and batch_stats of checkpoint `step`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  where = storage.join(wd, 'checkpoints', str(step), 'state')
  tree = ocp.PyTreeCheckpointer().restore(storage.epath(where) if storage.is_remote(wd) else where)
  return {
    k: np.asarray(v)
    for k, v in checkpointing.flatten(tree).items()
    if k.startswith(('params/', 'batch_stats/'))
  }


def _rows(wd):
  """metrics.jsonl without the wall-clock fields."""
  rows = [
    json.loads(line) for line in storage.read_text(storage.join(wd, 'metrics.jsonl')).splitlines()
  ]
  return [{k: v for k, v in r.items() if k not in ('time', 'images_per_s')} for r in rows]


def _final(wd):
  return json.loads(storage.read_text(storage.join(wd, 'final_metrics.json')))


def _assert_same_run(wd, base):
  want, got = _params(base, 16), _params(wd, 16)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f'{wd}: {k}')
  for key in ('test_loss', 'test_top1'):
    assert _final(wd)[key] == _final(base)[key]
  assert _rows(wd) == _rows(base)  # every step logged once, with the same values
  assert not storage.exists(storage.join(wd, workdir_lib.LOCK_NAME))


@pytest.fixture(scope='module')
def local_base(tmp_path_factory):
  """One uninterrupted local run: what every run in the store must end as."""
  wd = tmp_path_factory.mktemp('uninterrupted')
  _run(str(wd))
  return str(wd)


@pytest.fixture(scope='module')
def gcs_bucket(gcs_server):
  name = f'runs-{uuid.uuid4().hex[:8]}'
  gcs_server.make_bucket(name)
  return f'gs://{name}'


@pytest.fixture(scope='module')
def gcs_run(gcs_bucket, local_base):
  """One uninterrupted run in the store (the default run, to completion)."""
  wd = f'{gcs_bucket}/uninterrupted'
  _run(wd)
  return wd


@pytest.mark.slow
def test_a_run_in_gs_ends_as_the_local_one(gcs_run, local_base):
  _assert_same_run(gcs_run, local_base)
  names = set(storage.listdir(gcs_run))
  assert {'config.json', 'params.txt', 'metrics.jsonl', 'final_metrics.json', 'tb'} <= names
  assert storage.listdir(storage.join(gcs_run, 'tb'))[0].startswith('events.out.tfevents.')
  assert checkpointing.committed_steps(storage.join(gcs_run, 'checkpoints')) == [8, 12, 16]
  assert not (ROOT / 'gs:').exists()  # nothing went to a local folder named gs:
  # The finished-run check reads it there (that train.py then changes nothing: test_preemption).
  final = workdir_lib.finished_run(gcs_run, 16, 16)
  assert final is not None and final['steps'] == 16


def _committed(wd) -> list[int]:
  return checkpointing.committed_steps(storage.join(wd, 'checkpoints'))


def _start_and_wait(wd, until_step):
  """train.py in the background, once a checkpoint of `until_step` or later is committed."""
  proc = subprocess.Popen(
    _cmd(wd), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 300
  while not any(s >= until_step for s in _committed(wd)):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, 'training did not reach the step in time'
    time.sleep(0.1)
  return proc


@pytest.mark.slow
def test_sigterm_kill9_and_a_second_trainer_in_gs_lose_nothing(gcs_bucket, local_base):
  wd = f'{gcs_bucket}/interrupted'
  proc = _start_and_wait(wd, 4)
  # A second training on the same workdir stops at once, naming the first
  # (stopped meanwhile, so that it cannot finish first on a busy machine).
  proc.send_signal(signal.SIGSTOP)
  try:
    second = _run(wd, 1)
  finally:  # SIGTERM (preemption), handled once it runs again
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
  assert _last_line(second).startswith(
    f'error: the workdir {wd} is in use by process {proc.pid} on '
  )
  # A checkpoint at the step reached, exit 143.
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert 'preempted (SIGTERM) at step' in err and 'Traceback' not in err
  stopped = int(err.split('preempted (SIGTERM) at step ')[1].split('/')[0])
  assert 4 <= stopped < 16 and _committed(wd)[-1] == stopped
  assert not storage.exists(storage.join(wd, workdir_lib.LOCK_NAME))
  # The rerun resumes; kill -9 between checkpoints; the lock it leaves does not block.
  proc = _start_and_wait(wd, max(8, stopped + 1))
  proc.kill()
  proc.communicate(timeout=60)
  assert storage.exists(storage.join(wd, workdir_lib.LOCK_NAME))
  assert not storage.exists(storage.join(wd, 'final_metrics.json'))
  resumed = _committed(wd)[-1]
  p = _run(wd)
  assert f'Resuming from {wd}/checkpoints/{resumed}' in p.stdout
  _assert_same_run(wd, local_base)


@pytest.mark.slow
def test_a_truncated_checkpoint_in_gs_is_moved_aside(gcs_run, local_base):
  wd = gcs_run.replace('/uninterrupted', '/damaged')
  fs = storage._gcsfs()  # pylint: disable=protected-access
  fs.copy(gcs_run.removeprefix('gs://'), wd.removeprefix('gs://'), recursive=True)
  storage.remove(storage.join(wd, 'final_metrics.json'))
  data_dir = storage.join(wd, 'checkpoints', '16', 'state', 'ocdbt.process_0', 'd')
  biggest = max(
    storage.listdir(data_dir), key=lambda n: storage.info(storage.join(data_dir, n))['size']
  )
  obj = storage.join(data_dir, biggest)
  storage.write_bytes(obj, storage.read_bytes(obj)[:1000])
  p = _run(wd)
  assert f'moved to {wd}/damaged_checkpoints/16; resuming from step 12.' in p.stdout
  assert storage.isdir(storage.join(wd, 'damaged_checkpoints', '16', 'state'))
  _assert_same_run(wd, local_base)


@pytest.mark.slow
def test_init_from_a_run_in_gs(gcs_run, tmp_path):
  from spikeformer_jax import train_lib  # pylint: disable=import-outside-toplevel

  config = workdir_lib.load_run_config(gcs_run)
  want = _params(gcs_run, 12)
  for source, step in ((gcs_run, 16), (f'{gcs_run}/checkpoints/12', 12)):
    config.init_from = source
    take, notes = train_lib.initial_weights(config, str(tmp_path / 'new'))
    assert notes[0].startswith(f'Initialised {len(take)} of '), notes
    assert notes[0].endswith(f'from {source}.'), notes
    want = _params(gcs_run, step)
    assert take.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(take[k], want[k])
  # eval.py's reading of a run (restore.py) from there as well.
  from spikeformer_jax import restore  # pylint: disable=import-outside-toplevel

  _, step = restore.restore_model(workdir_lib.load_run_config(gcs_run), gcs_run)
  assert step == 16


def test_a_profile_of_a_run_in_gs_is_uploaded(gcs_dir):
  """The profiler writes local files only: the trace goes to a local
  directory, then to WORKDIR/profile."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel

  from spikeformer_jax import train_lib  # pylint: disable=import-outside-toplevel

  profiler = train_lib._Profiler(  # pylint: disable=protected-access
    ml_collections.ConfigDict({'profile_steps': (1, 1)}), gcs_dir, 0
  )
  profiler.before(1)
  x = jax.numpy.ones(3) * 2
  profiler.after(1, x)
  fs = storage._gcsfs()  # pylint: disable=protected-access
  traces = fs.find(storage.join(gcs_dir, 'profile').removeprefix('gs://'))
  assert any(t.endswith(('.xplane.pb', '.trace.json.gz')) for t in traces), traces
  assert profiler._local is not None and not os.path.exists(profiler._local)  # pylint: disable=protected-access
