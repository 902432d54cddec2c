"""One writer per workdir: a lock file with a heartbeat.

Two trainings in one workdir would resume from each other's checkpoints and
overwrite each other's metrics. `WorkdirLock` creates `workdir/train.lock`
atomically (O_EXCL, which NFS and the other shared filesystems of multi-host
runs honour) and names its holder: host, pid and start time. A lock left by a
killed process must not block the rerun, so a lock is stale when
  * its holder ran on this host (same boot, same pid namespace) and that
    process is gone, or
  * its heartbeat (the file's mtime, touched every HEARTBEAT_S by a daemon
    thread) is older than STALE_S: a holder on another host that died.
A stale lock is renamed aside (atomic: of two processes taking it over, one
wins) and taken. Of the processes of one multi-process run, process 0 holds the
lock for all of them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from spikeformer_jax import errors

LOCK_NAME = 'train.lock'
HEARTBEAT_S = 10.0
STALE_S = 120.0


def _read(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read().strip()
  except OSError:
    return ''


def _start_time(pid: int) -> str:
  """The start time of process `pid` (clock ticks since boot), '' if unknown:
  tells a live holder from a new process that reuses its pid."""
  stat = _read(f'/proc/{pid}/stat')
  return stat.rsplit(')', 1)[-1].split()[19] if stat else ''


def _identity() -> dict:
  pid = os.getpid()
  try:
    pidns = os.readlink('/proc/self/ns/pid')
  except OSError:
    pidns = ''
  return {'host': socket.gethostname(), 'boot': _read('/proc/sys/kernel/random/boot_id'),
          'pidns': pidns, 'pid': pid, 'start': _start_time(pid)}


def _alive(holder: dict) -> bool | None:
  """Whether a holder on this machine still runs; None if it is elsewhere."""
  me = _identity()
  if any(holder.get(k) != me[k] for k in ('host', 'boot', 'pidns')) or not me['boot']:
    return None
  pid = int(holder.get('pid', -1))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by another user
  return _start_time(pid) == holder.get('start', '')


def describe(holder: dict) -> str:
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('time', 0)))
  return (f'process {holder.get("pid", "?")} on {holder.get("host", "?")} '
          f'(started {started}: {holder.get("command", "?")})')


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this run, or raises
  errors.WorkdirBusy naming the holder."""

  def __init__(self, workdir: str, command: str = ''):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._me = {**_identity(), 'time': time.time(), 'command': command,
                'token': uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread = None

  def acquire(self):
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_if_stale()
        continue
      except OSError as e:
        raise errors.UserError(f'cannot write to the workdir {os.path.dirname(self.path)}: '
                               f'{e.strerror}; use a writable --workdir.') from e
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(self._me, f)
      self._thread = threading.Thread(target=self._beat, daemon=True, name='workdir-lock')
      self._thread.start()
      return self
    raise errors.WorkdirBusy(f'could not take the lock {self.path}: other processes keep '
                             'taking it; is something starting runs in a loop?')

  def _take_if_stale(self):
    try:
      with open(self.path, encoding='utf-8') as f:
        holder = json.load(f)
      age = time.time() - os.stat(self.path).st_mtime
    except (OSError, ValueError):  # half-written by a process killed while taking it
      holder, age = {}, STALE_S + 1
    alive = _alive(holder) if holder else False
    if alive or (alive is None and age < STALE_S):
      where = '' if alive else f'; its heartbeat is {age:.0f} s old'
      raise errors.WorkdirBusy(
          f'the workdir {os.path.dirname(self.path)} is in use by {describe(holder)}{where}. '
          'Wait for it to finish or stop it, or use another --workdir.')
    # Stale: rename it aside first, so that of two processes taking over, one wins.
    try:
      os.replace(self.path, f'{self.path}.stale-{self._me["token"]}')
      os.remove(f'{self.path}.stale-{self._me["token"]}')
    except FileNotFoundError:
      pass  # another process took it over first; try again

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass  # a full or flaky disk: the run itself reports what matters

  def release(self):
    self._stop.set()
    try:
      with open(self.path, encoding='utf-8') as f:
        mine = json.load(f).get('token') == self._me['token']
      if mine:
        os.remove(self.path)
    except (OSError, ValueError):
      pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def ensure(workdir: str, what: str = '--workdir'):
  """Creates `workdir`, or says in one line why it cannot be used."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f'{what}={workdir} is a file, not a directory; use another {what}.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'cannot create {what}={workdir}: {e.strerror}; use a writable '
                           f'{what}.') from e
