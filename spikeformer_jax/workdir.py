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
  pid = holder['pid']
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by another user
  start = _start_time(pid)
  return not start or start == holder.get('start', '')  # unknown (hidden /proc): alive


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
    self._thread: threading.Thread | None = None

  def acquire(self):
    for _ in range(3):
      if self._create():
        self._thread = threading.Thread(target=self._beat, daemon=True, name='workdir-lock')
        self._thread.start()
        return self
      self._take_if_stale()
    raise errors.WorkdirBusy(f'could not take the lock {self.path}: other processes keep '
                             'taking it; is something starting runs in a loop?')

  def _create(self) -> bool:
    """Puts a complete lock file in place atomically (written aside, then
    hard-linked: no process ever reads a half-written one); False if one exists."""
    tmp = f'{self.path}.{self._me["token"]}'
    try:
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(self._me, f)
      try:
        os.link(tmp, self.path)
      except FileExistsError:
        return False
      except OSError:  # a filesystem without hard links: O_EXCL, then write
        try:
          fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
          return False
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
          json.dump(self._me, f)
      return True
    except OSError as e:
      raise errors.UserError(f'cannot write to the workdir {os.path.dirname(self.path)}: '
                             f'{e.strerror}; use a writable --workdir.') from e
    finally:
      try:
        os.remove(tmp)
      except OSError:
        pass

  def _age(self) -> float:
    """Seconds since the lock's heartbeat, by the filesystem's own clock (a
    file touched now), so that hosts whose clocks differ agree."""
    now_file = f'{self.path}.now-{self._me["token"]}'
    try:
      with open(now_file, 'w', encoding='utf-8'):
        pass
      now = os.stat(now_file).st_mtime
      os.remove(now_file)
    except OSError:
      now = time.time()
    return now - os.stat(self.path).st_mtime

  def _read(self) -> tuple[dict | None, float]:
    """(holder, heartbeat age); holder None if the file is not a lock we wrote."""
    age = self._age()
    try:
      with open(self.path, encoding='utf-8') as f:
        holder = json.load(f)
      if not (isinstance(holder, dict) and isinstance(holder.get('pid'), int)
              and isinstance(holder.get('token'), str)):
        holder = None
    except (OSError, ValueError):
      holder = None
    return holder, age

  def _take_if_stale(self):
    try:
      holder, age = self._read()
    except FileNotFoundError:
      return  # released meanwhile: try again
    alive = _alive(holder) if holder else None
    if holder is None and age < STALE_S:
      raise errors.WorkdirBusy(
          f'the workdir {os.path.dirname(self.path)} has an unreadable lock {self.path}, '
          f'touched {age:.0f} s ago. If no run uses this workdir, delete it; or use another '
          '--workdir.')
    if holder is not None and (alive or (alive is None and age < STALE_S)):
      where = '' if alive else f'; its heartbeat is {age:.0f} s old'
      raise errors.WorkdirBusy(
          f'the workdir {os.path.dirname(self.path)} is in use by {describe(holder)}{where}. '
          'Wait for it to finish or stop it, or use another --workdir.')
    # Stale: rename it aside first, so that of two processes taking over, one wins;
    # if what was moved is not the lock judged stale, someone took over meanwhile.
    aside = f'{self.path}.stale-{self._me["token"]}'
    try:
      os.replace(self.path, aside)
    except FileNotFoundError:
      return  # another process took it over first; try again
    try:
      with open(aside, encoding='utf-8') as f:
        moved = json.load(f)
      moved = moved.get('token') if isinstance(moved, dict) else None
    except (OSError, ValueError):
      moved = None
    if holder is not None and moved != holder.get('token'):
      try:
        os.link(aside, self.path)  # put the fresh lock back
      except OSError:
        pass
    try:
      os.remove(aside)
    except OSError:
      pass

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


def holder(workdir: str) -> dict | None:
  """The live process holding `workdir`'s lock (a training, a convert), or
  None; takes nothing. For the tools that read a run while it may be written,
  and for those that must not write into it. An unreadable lock touched
  recently counts as held (its holder unknown)."""
  lock = WorkdirLock(workdir)
  try:
    held, age = lock._read()  # pylint: disable=protected-access
  except FileNotFoundError:
    return None
  if held is None:  # released between the two reads, or not a lock we wrote
    fresh = age < STALE_S and os.path.exists(lock.path)
    return {'pid': '?', 'command': f'unreadable lock {lock.path}'} if fresh else None
  alive = _alive(held)
  return held if alive or (alive is None and age < STALE_S) else None


def ensure(workdir: str, what: str = '--workdir') -> list[str]:
  """Creates `workdir`, or says in one line why it cannot be used. Returns
  the directories it created, innermost first (none where `workdir` existed),
  for `remove_created`."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f'{what}={workdir} is a file, not a directory; use another {what}.')
  created, path = [], os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    created.append(path)
    path = os.path.dirname(path)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'cannot create {what}={workdir}: {e.strerror}; use a writable '
                           f'{what}.') from e
  return created


def remove_created(created: list[str]):
  """Removes the directories `ensure` created, innermost first, while they are
  empty: a run refused before it wrote anything leaves no empty workdir, and
  never removes a directory that holds anything (os.rmdir refuses)."""
  for path in created:
    try:
      os.rmdir(path)
    except OSError:
      return
