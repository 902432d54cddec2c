"""The pieces that keep a run from being lost, in-process and small: the
workdir lock (live, stale and foreign holders), damaged checkpoints (told from
another model's, skipped on resume, named for eval), failed background saves,
metric lines of a redone evaluation, and a finished run left alone. The real
processes (signals, two trainings, a full disk) are in test_preemption.py."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeformer_jax import checkpointing, errors, metrics, workdir as workdir_lib


# ---------------------------------------------------------------- the lock


def _holder(**over):
  me = workdir_lib._identity()  # pylint: disable=protected-access
  return {**me, 'time': time.time(), 'command': 'train.py --workdir=x', 'token': 'other', **over}


def _write_lock(wd, holder, age_s=0.0):
  path = wd / workdir_lib.LOCK_NAME
  path.write_text(json.dumps(holder))
  t = time.time() - age_s
  os.utime(path, (t, t))


def test_a_live_holder_keeps_the_workdir(tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path), command='train.py A'):
    with pytest.raises(errors.WorkdirBusy) as e:
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  msg = str(e.value)
  assert f'is in use by process {os.getpid()} on {socket.gethostname()}' in msg
  assert 'train.py A' in msg and 'use another --workdir' in msg and '\n' not in msg
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()  # released on exit
  with workdir_lib.WorkdirLock(str(tmp_path)):  # and free again
    pass


def test_a_dead_holder_on_this_machine_is_stale(tmp_path):
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()  # a pid that no longer runs
  _write_lock(tmp_path, _holder(pid=p.pid, start='1'))
  with workdir_lib.WorkdirLock(str(tmp_path)) as lock:
    assert json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())['token'] == lock._me['token']  # pylint: disable=protected-access
  # A reused pid (another start time) is not the holder either.
  _write_lock(tmp_path, _holder(pid=os.getpid(), start='not-my-start-time'))
  workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_a_holder_elsewhere_is_stale_only_without_heartbeat(tmp_path):
  _write_lock(tmp_path, _holder(host='other-host', pid=1))
  with pytest.raises(errors.WorkdirBusy, match='on other-host.*heartbeat is 0 s old'):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  _write_lock(tmp_path, _holder(host='other-host', pid=1), age_s=workdir_lib.STALE_S + 5)
  workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()
  # Not a lock we wrote (garbage, another shape): busy while fresh, stale when old.
  for garbage in ('{"host": "oth', '[1, 2]', '{"pid": "abc", "token": "t"}'):
    _write_lock(tmp_path, {})
    (tmp_path / workdir_lib.LOCK_NAME).write_text(garbage)
    with pytest.raises(errors.WorkdirBusy, match='has an unreadable lock .*train.lock, touched'):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    t = time.time() - workdir_lib.STALE_S - 5
    os.utime(tmp_path / workdir_lib.LOCK_NAME, (t, t))
    workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_a_runs_workdir_is_no_sweep_directory(tmp_path):
  from spikeformer_jax import sweeps  # pylint: disable=import-outside-toplevel

  with workdir_lib.WorkdirLock(str(tmp_path), command='train.py --workdir=x'):
    with pytest.raises(
      ValueError,
      match=r"is in use by process .*: it is a run's workdir, "
      'not a sweep directory; use another --workdir',
    ):
      sweeps.write_manifest('configs/spikformer.py', 'digits-small', str(tmp_path), [])
  assert os.listdir(tmp_path) == []


_RACE = '''
import json, os, sys, time
from spikeformer_jax import errors, workdir
wd, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
  pass
try:
  lock = workdir.WorkdirLock(wd).acquire()
  time.sleep(0.5)  # hold it while the others try
  print('held', flush=True)
  lock.release()
except errors.WorkdirBusy:
  print('busy', flush=True)
'''


@pytest.mark.parametrize('stale', [False, True])
def test_processes_racing_for_a_lock_get_one_holder(tmp_path, stale):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for trial in range(4):
    wd = tmp_path / str(trial)
    wd.mkdir()
    if stale:  # a dead holder on another host: all of them try to take it over
      _write_lock(wd, _holder(host='other-host', pid=1), age_s=workdir_lib.STALE_S + 5)
    start = time.time() + 1.0
    procs = [
      subprocess.Popen(
        [sys.executable, '-c', _RACE, str(wd), str(start)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
      )
      for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert sorted(o[-1] for o in outs) == ['busy', 'busy', 'busy', 'held'], outs


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, 'HEARTBEAT_S', 0.05)
  with workdir_lib.WorkdirLock(str(tmp_path)):
    path = tmp_path / workdir_lib.LOCK_NAME
    os.utime(path, (0, 0))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 5


def test_unusable_workdirs_are_one_line(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(errors.UserError, match=f'--workdir={f} is a file, not a directory'):
    workdir_lib.ensure(str(f))
  # A read-only filesystem (a bind mount in a private namespace; root writes anywhere else).
  ro = tmp_path / 'ro'
  ro.mkdir()
  code = (
    'from spikeformer_jax import workdir as w, errors\n'
    f'try:\n  w.WorkdirLock({str(ro)!r}).acquire()\n'
    'except errors.UserError as e:\n  print(e)'
  )
  p = subprocess.run(
    [
      'unshare',
      '-Urm',
      'sh',
      '-c',
      f'mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && {sys.executable} -c "$0"',
      code,
    ],
    capture_output=True,
    text=True,
    timeout=60,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  if 'mount' in p.stderr or 'unshare' in p.stderr:
    pytest.skip(f'no private mount namespace here: {p.stderr.strip()}')
  assert p.stdout.strip() == (
    f'cannot write to the workdir {ro}: Read-only file system; use a writable --workdir.'
  ), p.stderr


# ---------------------------------------------------------------- checkpoints


def _state(v):
  w = np.random.default_rng(int(v)).normal(size=(64, 64)).astype(np.float32)  # incompressible
  return {
    'params': {'w': jnp.asarray(w), 'b': jnp.arange(3.0) + v},
    'step': jnp.asarray(int(v), jnp.int32),
  }


def _abstract():
  return checkpointing.abstract_like(
    _state(0),
    jax.tree.map(lambda _: jax.sharding.make_single_device_sharding(jax.devices()[0]), _state(0)),
  )


def _saved(tmp_path, steps=(1, 2, 3)):
  ck = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), keep=3)
  for s in steps:
    ck.save(s, _state(s), {'step': s})
  ck.close()
  return checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), keep=3)


def _damage(ckpt_dir, step, how):
  root = os.path.join(ckpt_dir, str(step), 'state')
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  biggest = max((f for f in files if 'ocdbt.process_' in f), key=os.path.getsize)
  if how == 'truncate':  # the largest data file
    with open(biggest, 'r+b') as f:
      f.truncate(100)
  elif how == 'overwrite':  # the largest data file, garbage of the same size
    with open(biggest, 'r+b') as f:
      f.write(np.random.default_rng(0).bytes(os.path.getsize(biggest)))
  elif how == 'delete':
    os.remove(biggest)
  elif how == 'meta':
    os.remove(os.path.join(ckpt_dir, str(step), 'meta', 'metadata'))
  else:
    os.remove(os.path.join(root, '_METADATA'))


@pytest.mark.parametrize('how', ['truncate', 'overwrite', 'delete', 'meta', 'metadata'])
def test_a_damaged_checkpoint_is_unreadable_not_another_model(tmp_path, how):
  ck = _saved(tmp_path)
  _damage(ck.directory, 3, how)
  with pytest.raises(errors.CheckpointError) as e:
    ck.restore(_abstract())
  msg = str(e.value)
  assert f'checkpoint 3 in {ck.directory} is unreadable (' in msg, msg
  assert 'another config' not in msg and '\n' not in msg and len(msg) < 400
  assert ck.intact_steps(_abstract(), exclude=(3,)) == [1, 2]
  # Resume: one line, the damaged step moved aside (not deleted), the newest intact read.
  lines = []
  state, meta = ck.restore_intact(_abstract(), log=lines.append)
  assert meta == {'step': 2} and float(state['params']['b'][0]) == 2.0
  assert len(lines) == 1 and lines[0].endswith(
    f'moved to {tmp_path}/{checkpointing.DAMAGED_DIR}/3; resuming from step 2.'
  )
  assert (tmp_path / checkpointing.DAMAGED_DIR / '3' / 'state').is_dir()
  assert ck.all_steps() == [1, 2]
  ck.save(3, _state(3.5), {'step': 3})  # training on saves step 3 again: no collision
  ck.close()


def test_nothing_moves_when_no_step_reads_or_the_cause_is_not_damage(tmp_path, monkeypatch):
  ck = _saved(tmp_path, steps=(1, 2))
  for step in (1, 2):
    _damage(ck.directory, step, 'truncate')
  with pytest.raises(
    errors.CheckpointError,
    match=r'no checkpoint in .* reads \(2: OUT_OF_RANGE'
    r'.*; 1: OUT_OF_RANGE.*\); nothing was moved',
  ):
    ck.restore_intact(_abstract())
  assert ck.all_steps() == [1, 2] and not (tmp_path / checkpointing.DAMAGED_DIR).exists()
  ck.close()

  ck = _saved(tmp_path / 'oom', steps=(1, 2))

  def oom(*a, **k):
    raise ValueError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.0GiB')

  monkeypatch.setattr(ck._mngr, 'restore', oom)  # pylint: disable=protected-access
  with pytest.raises(
    errors.CheckpointError,
    match=r'unreadable \(RESOURCE_EXHAUSTED: Out of '
    r'memory.*\); that is no sign of a damaged checkpoint, so nothing was moved',
  ):
    ck.restore_intact(_abstract())
  assert ck.all_steps() == [1, 2]


def _step(ck, n):
  (ck / str(n)).mkdir(parents=True)
  (ck / str(n) / 'data').write_text(str(n))


def test_a_reader_gets_a_whole_step_while_the_run_deletes_it(tmp_path):
  """read_committed: a live run saving every step and keeping one deletes the
  step being read. Read from a hold (hard links) it stays whole; a step lost
  all the same is followed to the new newest, a bounded number of times."""
  ck = tmp_path / 'checkpoints'
  _step(ck, 1)

  def rotate(n):  # the run saves step n and deletes step n - 1
    _step(ck, n)
    shutil.rmtree(ck / str(n - 1))

  def read_rotating(root, step):
    rotate(step + 1)
    return (Path(root) / str(step) / 'data').read_text()

  # A killed reader's hold keeps disk space: the next reader on its host drops it.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (ck / f'.reading-{socket.gethostname()}-{dead.pid}-x' / '1').mkdir(parents=True)
  (ck / '.reading-elsewhere-1-x').mkdir()
  assert checkpointing.read_committed(str(ck), read_rotating) == '1'  # the hold stayed whole
  assert sorted(os.listdir(ck)) == ['.reading-elsewhere-1-x', '2']  # step 1 deleted meanwhile
  (ck / '.reading-elsewhere-1-x').rmdir()

  reads, last_lost = [], [3]

  def read_lost(root, step):  # no hold possible: the step is gone when read
    reads.append(step)
    if step <= last_lost[0]:
      rotate(step + 1)
      raise errors.CheckpointError(f'checkpoint {step} is unreadable (Truncated Zstd...)')
    return step

  with pytest.MonkeyPatch.context() as m:
    m.setattr(checkpointing, '_hold', lambda d, s: None)
    assert checkpointing.read_committed(str(ck), read_lost) == 4 and reads == [2, 3, 4]
    reads.clear()
    last_lost[0] = 100
    with workdir_lib.WorkdirLock(str(tmp_path), command='train.py --workdir=x'):
      with pytest.raises(checkpointing.RunBeingWritten) as e:
        checkpointing.read_committed(str(ck), read_lost, tries=2)
    assert reads == [4, 5], reads
  assert str(e.value).startswith(
    f'the run in {tmp_path} is being written by process {os.getpid()} on '
  )
  assert str(e.value).endswith(
    'deleted each checkpoint while it was read (2 tries): retry, or '
    'stop that run first (or give it a larger ckpt_keep).'
  )

  # A step that stays and does not read is named, read in place: not retried.
  reads.clear()

  def read_damaged(root, step):
    reads.append(root)
    raise errors.CheckpointError(f'checkpoint {step} in {root} is unreadable (DATA_LOSS)')

  with pytest.raises(errors.CheckpointError, match=f'checkpoint 6 in {ck} is unreadable'):
    checkpointing.read_committed(str(ck), read_damaged)
  assert len(reads) == 2 and reads[1] == str(ck)  # its hold, then in place


def test_another_model_is_still_another_model(tmp_path):
  ck = _saved(tmp_path, steps=(1,))
  other = checkpointing.abstract_like(
    {'params': {'w': jnp.zeros((32, 64)), 'b': jnp.zeros(3)}, 'step': jnp.zeros((), jnp.int32)},
    jax.tree.map(lambda _: jax.sharding.make_single_device_sharding(jax.devices()[0]), _state(0)),
  )
  with pytest.raises(
    ValueError,
    match=r'another config\?\); 1 arrays differ, e.g. params/w: '
    r'checkpoint \(64, 64\) vs model \(32, 64\)',
  ):
    ck.restore(other)
  ck.close()


def test_a_failed_background_save_is_reported_at_the_next_poll(tmp_path, monkeypatch):
  ck = _saved(tmp_path, steps=(1,))

  def fail():
    raise ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.w" in OCDBT database: '
      'Failed to write 4096 bytes: No space left on device [os_error_code=\'28\']'
    )

  monkeypatch.setattr(ck._mngr, 'check_for_errors', fail)  # pylint: disable=protected-access
  ck._saving = 2  # pylint: disable=protected-access
  with pytest.raises(errors.CheckpointError) as e:
    ck.poll()
  assert str(e.value) == (
    f'saving checkpoint 2 failed (no space left on device); stopped: the last good '
    f'checkpoint is step 1 in {ck.directory}. Free the space or fix the directory, then '
    'rerun the same command to resume.'
  )
  ck.close(quiet=True)  # reported once: closing does not raise it again


def test_keeping_no_checkpoint_is_refused(tmp_path):
  with pytest.raises(ValueError, match='ckpt_keep=0 would keep no checkpoint'):
    checkpointing.Checkpointer(str(tmp_path), keep=0)


# ---------------------------------------------------------------- metrics


def test_a_redone_evaluation_replaces_its_lines(tmp_path):
  rows = [
    {'step': 5, 'train_loss': 1.0},
    {'step': 5, 'test_top1': 0.1},
    {'step': 6, 'train_loss': 0.9},
  ]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  w = metrics.MetricWriter(str(tmp_path), resume_step=5, redo_eval=True)
  w.write(5, test_top1=0.2)
  w.close()
  got = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r.get('train_loss'), r.get('test_top1')) for r in got] == [
    (5, 1.0, None),
    (5, None, 0.2),
  ]


def _tensorboard_scalars(directory) -> list:
  """(tag, step) of every scalar TensorBoard shows: the event files in name
  (time) order, each SessionLog START at step s dropping the steps >= s read
  before it, as TensorBoard's purge does."""
  import struct  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  shown = []
  for path in sorted(directory.glob('events.out.tfevents.*')):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4
      if event.session_log.status == event_pb2.SessionLog.START:
        shown = [(tag, step) for tag, step in shown if step < event.step]
      shown += [(v.tag, event.step) for v in event.summary.value if v.HasField('simple_value')]
  return shown


@pytest.mark.parametrize('resume_step', [0, 2])
def test_a_rerun_shows_each_step_once_on_tensorboard(tmp_path, resume_step):
  """A rerun (killed before its first checkpoint: step 0, or after one) drops
  the events written after the step it starts from."""
  w = metrics.MetricWriter(str(tmp_path), tensorboard=True)
  for step in (1, 2, 3):
    w.write(step, train_loss=1.0 / step)
  w.close()
  (first,) = (tmp_path / 'tb').glob('events.out.tfevents.*')  # a rerun starts seconds later
  stamp = first.name.split('.')[3]
  first.rename(first.with_name(first.name.replace(stamp, str(int(stamp) - 10))))
  w = metrics.MetricWriter(str(tmp_path), resume_step=resume_step, tensorboard=True)
  for step in range(resume_step + 1, 5):
    w.write(step, train_loss=0.5 / step)
  w.close()
  assert _tensorboard_scalars(tmp_path / 'tb') == [('train/loss', s) for s in (1, 2, 3, 4)]


def test_an_unwritable_metrics_file_is_named(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  w._f.close()  # pylint: disable=protected-access
  w._f = open(os.devnull, encoding='utf-8')  # pylint: disable=protected-access,consider-using-with
  with pytest.raises(errors.UserError, match=f'cannot write {tmp_path}/metrics.jsonl'):
    w.write(1, loss=np.float32(1.0))
  w.close()


# ---------------------------------------------------------------- workdir files


def test_a_corrupt_config_json_is_named(tmp_path):
  (tmp_path / 'config.json').write_text('{"config": {"seed": 4')
  with pytest.raises(errors.UserError) as e:
    workdir_lib.load_run_config(str(tmp_path))
  assert str(e.value) == (
    f'{tmp_path}/config.json is not valid JSON (Expecting \',\' '
    'delimiter, line 1): pass --config explicitly.'
  )
  with pytest.raises(
    errors.UserError,
    match='it records the run.s config; restore it from '
    'a copy, or delete it to resume without comparing configs',
  ):
    workdir_lib.check_resume_config(None, str(tmp_path))
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(errors.UserError, match='holds no run config'):
    workdir_lib.load_run_config(str(tmp_path))


def test_damaged_metric_lines_are_dropped_on_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(
    b'{"step": 1, "x": 1}\n{"step": "5", "x": 5}\n[2]\n\xff\xfe{"step": 2}\n{"step": 2, "x": 2}\n'
  )
  w = metrics.MetricWriter(str(tmp_path), resume_step=4)
  w.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
    {'step': 1, 'x': 1},
    {'step': 2, 'x': 2},
  ]
