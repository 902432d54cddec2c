"""A run's workdir: who holds it, and the files that record the run.

One writer per workdir: a lock file with a heartbeat.

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
lock for all of them (`hold_workdir`).

In Cloud Storage (a `gs://` workdir: no hard links, no O_EXCL, no mtimes a
process may set) the same rules hold through the store's preconditions:
  * the lock is created with `ifGenerationMatch=0` (storage.create_exclusive):
    of racing creators, exactly one wins;
  * the heartbeat rewrites the lock object with `ifGenerationMatch=<the
    generation this process last wrote>`: it never clobbers a lock that
    another process took over after judging ours stale (the rewrite fails,
    the heartbeat stops and says so once);
  * its age is `storage.now(workdir) - updated`, both by the store's clock;
  * a stale lock is taken over by overwriting it with `ifGenerationMatch=<the
    generation judged stale>`: of racing takers, exactly one wins, and a
    heartbeat landing meanwhile makes every taker lose;
  * release deletes it with `ifGenerationMatch=<ours>`, after checking that
    it still names this process.

The run's files: config.json (the config and run facts: `load_run_config`,
`check_resume_config` on resume, `model_differences` for eval.py),
final_metrics.json (`finished_run`), written atomically by process 0
(`write_json`, `write_text`); each unreadable one is one line naming it.
They import JAX and the configs where they need them: the lock's half stays
light, for the tools that only look at a lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

import ml_collections

from spikeformer_jax import errors
from spikeformer_jax import storage

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
  return {
    'host': socket.gethostname(),
    'boot': _read('/proc/sys/kernel/random/boot_id'),
    'pidns': pidns,
    'pid': pid,
    'start': _start_time(pid),
  }


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
  return (
    f'process {holder.get("pid", "?")} on {holder.get("host", "?")} '
    f'(started {started}: {holder.get("command", "?")})'
  )


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this run, or raises
  errors.WorkdirBusy naming the holder."""

  def __init__(self, workdir: str, command: str = ''):
    self.path = storage.join(workdir, LOCK_NAME)
    self._me = {**_identity(), 'time': time.time(), 'command': command, 'token': uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._remote = storage.is_remote(workdir)
    self._generation: str | None = None  # a store: the version of our lock object
    self._seen: str | None = None  # a store: the version `_read` judged

  def acquire(self):
    for _ in range(3):
      if self._create() or self._take_if_stale():
        self._thread = threading.Thread(target=self._beat, daemon=True, name='workdir-lock')
        self._thread.start()
        return self
      self._take_if_stale()
    raise errors.WorkdirBusy(
      f'could not take the lock {self.path}: other processes keep '
      'taking it; is something starting runs in a loop?'
    )

  def _create(self) -> bool:
    """Puts a complete lock file in place atomically (written aside, then
    hard-linked: no process ever reads a half-written one); False if one exists.
    In a store: the conditional create, which writes it whole."""
    if self._remote:
      try:
        if not storage.create_exclusive(self.path, json.dumps(self._me).encode()):
          return False
        self._generation = storage.info(self.path)['generation']
        return True
      except storage.errors_of_the_store() as e:
        raise errors.UserError(
          f'cannot write to the workdir {storage.dirname(self.path)}: '
          f'{errors.one_line(e)}; use a writable --workdir.'
        ) from e
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
      raise errors.UserError(
        f'cannot write to the workdir {os.path.dirname(self.path)}: '
        f'{e.strerror}; use a writable --workdir.'
      ) from e
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
    """(holder, heartbeat age); holder None if the file is not a lock we wrote.
    In a store, the age and generation (`_seen`) are those of the version read
    or of a newer one, so a lock judged stale is the version read: a write
    after the read makes it young."""
    if self._remote:
      try:
        holder = json.loads(storage.read_bytes(self.path))
      except ValueError:
        holder = None
      i = storage.info(self.path)
      self._seen = i['generation']
      age = storage.now(storage.dirname(self.path)) - i['modified']
    else:
      age = self._age()
    try:
      if not self._remote:
        with open(self.path, encoding='utf-8') as f:
          holder = json.load(f)
      if not (
        isinstance(holder, dict)
        and isinstance(holder.get('pid'), int)
        and isinstance(holder.get('token'), str)
      ):
        holder = None
    except (OSError, ValueError):
      holder = None
    return holder, age

  def _take_if_stale(self) -> bool:
    """Raises WorkdirBusy if the lock is held; takes over a stale one. True
    where that took the lock (a store), False to try creating it again."""
    try:
      holder, age = self._read()
    except FileNotFoundError:
      return False  # released meanwhile: try again
    alive = _alive(holder) if holder else None
    if holder is None and age < STALE_S:
      raise errors.WorkdirBusy(
        f'the workdir {storage.dirname(self.path)} has an unreadable lock {self.path}, '
        f'touched {age:.0f} s ago. If no run uses this workdir, delete it; or use another '
        '--workdir.'
      )
    if holder is not None and (alive or (alive is None and age < STALE_S)):
      where = '' if alive else f'; its heartbeat is {age:.0f} s old'
      raise errors.WorkdirBusy(
        f'the workdir {storage.dirname(self.path)} is in use by {describe(holder)}{where}. '
        'Wait for it to finish or stop it, or use another --workdir.'
      )
    if self._remote:  # overwrite exactly the version judged stale: one taker wins
      self._generation = storage.write_if_generation(
        self.path, json.dumps(self._me).encode(), self._seen
      )
      return self._generation is not None
    # Stale: rename it aside first, so that of two processes taking over, one wins;
    # if what was moved is not the lock judged stale, someone took over meanwhile.
    aside = f'{self.path}.stale-{self._me["token"]}'
    try:
      os.replace(self.path, aside)
    except FileNotFoundError:
      return False  # another process took it over first; try again
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
    return False

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      if self._remote:
        if not self._beat_remote():
          return
        continue
      try:
        os.utime(self.path)
      except OSError:
        pass  # a full or flaky disk: the run itself reports what matters

  def _beat_remote(self) -> bool:
    """Rewrites our lock object if it is still ours; False once it is not."""
    try:
      gen = storage.write_if_generation(self.path, json.dumps(self._me).encode(), self._generation)
    except storage.errors_of_the_store():
      return True  # a flaky connection: the next beat tries again
    if gen is None:
      if not self._stop.is_set():
        print(
          f'warning: the lock {self.path} was taken over by another process (this '
          'run\'s heartbeat was judged stale); two runs may now write this workdir.',
          file=sys.stderr,
          flush=True,
        )
      return False
    self._generation = gen
    return True

  def release(self):
    self._stop.set()
    if self._remote:
      self._release_remote()
      return
    try:
      with open(self.path, encoding='utf-8') as f:
        mine = json.load(f).get('token') == self._me['token']
      if mine:
        os.remove(self.path)
    except (OSError, ValueError):
      pass

  def _release_remote(self):
    if self._thread is not None:  # a rewrite in flight would make our generation stale
      self._thread.join(timeout=3 * HEARTBEAT_S)
    if self._generation is None:
      return
    try:
      mine = json.loads(storage.read_bytes(self.path)).get('token') == self._me['token']
      if mine:
        storage.remove_if_generation(self.path, self._generation)
    except (ValueError, AttributeError):  # not a lock we wrote: left alone
      pass
    except storage.errors_of_the_store():
      pass
    self._generation = None

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
    fresh = age < STALE_S and storage.exists(lock.path)
    return {'pid': '?', 'command': f'unreadable lock {lock.path}'} if fresh else None
  alive = _alive(held)
  return held if alive or (alive is None and age < STALE_S) else None


def ensure(workdir: str, what: str = '--workdir') -> list[str]:
  """Creates `workdir`, or says in one line why it cannot be used. Returns
  the directories it created, innermost first (none where `workdir` existed),
  for `remove_created`. A store has no directories: nothing is created there."""
  if storage.is_remote(workdir):
    storage.check(workdir, what)
    if storage.isfile(workdir):
      raise errors.UserError(f'{what}={workdir} is an object, not a directory; use another {what}.')
    return []
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f'{what}={workdir} is a file, not a directory; use another {what}.')
  created, path = [], os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    created.append(path)
    path = os.path.dirname(path)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.UserError(
      f'cannot create {what}={workdir}: {e.strerror}; use a writable {what}.'
    ) from e
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


# ------------------------------------------------------------ the run's files


@contextlib.contextmanager
def hold_workdir(workdir: str):
  """This run (process 0 for all of its processes) holds `workdir`'s lock."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  created = ensure(workdir)
  lock = WorkdirLock(workdir, command=' '.join(sys.argv))
  err = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except errors.UserError as e:
      err = e
  if jax.process_count() > 1:  # every process stops if process 0 could not take it
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if not ok and err is None:
      err = errors.WorkdirBusy(f'process 0 could not take the lock of {workdir}; see its output.')
  if err is not None:
    raise err
  failed = True
  try:
    yield lock
    failed = False
  finally:
    if jax.process_index() == 0:
      lock.release()
      if failed:  # e.g. refused by the data or the devices: no empty workdir left behind
        remove_created(created)


def read_json(path: str, what: str = '') -> dict:
  """A JSON file of the workdir, or one line naming it and the problem."""
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise errors.UserError(f'{path} is not valid JSON ({e.msg}, line {e.lineno}){what}.') from e
  except UnicodeDecodeError as e:
    raise errors.UserError(f'{path} is not a text file{what}.') from e


def write_json(path, obj):
  """write_text of `obj` as indented, sorted JSON."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def write_text(path, text: str):
  """Writes a file of the workdir atomically (process 0 only), or one line
  naming it and the problem."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_index() == 0:
    try:
      storage.write_text(path, text)  # locally: written aside, then renamed
    except storage.errors_of_the_store() as e:
      raise errors.UserError(
        f'cannot write {path}: {getattr(e, "strerror", None) or errors.one_line(e)}; free the '
        'space or fix the directory, then rerun the same command.'
      ) from e


def finished_run(workdir: str, latest_step: int | None, total_steps: int) -> dict | None:
  """The final metrics of a run in `workdir` that already finished `total_steps`."""
  path = storage.join(workdir, 'final_metrics.json')
  if latest_step != total_steps or not storage.exists(path):
    return None
  final = read_json(path, ': delete it to evaluate the final checkpoint again')
  return final if final.get('steps') == total_steps else None


def check_resume_config(config, workdir: str) -> tuple[list[str], list[str]]:
  """Refuses to resume a run whose saved config differs in model-defining
  fields (config_lib.MODEL_DEFINING) unless `allow_config_change`. Returns
  (changed fields, the model-defining ones among them, allowed): a new lr or
  total_steps is a legitimate resume."""
  from spikeformer_jax import config_lib  # pylint: disable=import-outside-toplevel

  path = storage.join(workdir, 'config.json')
  if not storage.exists(path):
    return [], []
  fix = (
    ': it records the run\'s config; restore it from a copy, or delete it to resume '
    'without comparing configs'
  )
  saved = read_json(path, fix)
  if not isinstance(saved, dict) or not isinstance(saved.get('config'), dict):
    raise errors.UserError(f'{path} holds no run config ("config" key){fix}.')
  saved = saved['config']
  want = json.loads(json.dumps(config.to_dict()))
  changed = [k for k in config_lib.config_diff(saved, want) if k != 'allow_config_change']
  defining = config_lib.model_defining(changed, saved, want)
  if defining and not config.get('allow_config_change', False):
    shown = ', '.join(
      f'{k} ({config_lib.lookup(saved, k)!r} -> {config_lib.lookup(config.to_dict(), k)!r})'
      for k in defining[:4]
    ) + (' ...' if len(defining) > 4 else '')
    raise errors.ConfigError(
      f'{workdir} holds a run of another model: {shown}. Use another '
      '--workdir, or --config.allow_config_change=True to resume anyway.'
    )
  return changed, defining


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json)."""
  path = storage.join(workdir, 'config.json')
  if not storage.exists(path):
    raise FileNotFoundError(
      f'{path} not found: is {workdir!r} the --workdir of a '
      'training run? Or pass --config explicitly.'
    )
  saved = read_json(path, ': pass --config explicitly')
  if not isinstance(saved, dict) or not isinstance(saved.get('config'), dict):
    raise errors.UserError(f'{path} holds no run config ("config" key); pass --config explicitly.')
  saved = saved['config']

  def tuples(x):  # JSON turned tuples into lists; configs use tuples.
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  return ml_collections.ConfigDict(tuples(saved))


def model_differences(config, workdir: str) -> str:
  """One warning line (eval.py --config) naming the fields where `config.model`
  differs from the model of the run in `workdir` (its config.json), else ''.
  Not an error: evaluating a run at another T is an experiment; a silent one
  would be a mistake."""
  try:
    run = load_run_config(workdir)
  except errors.USER_ERRORS:  # no or no readable config.json: nothing to compare with
    return ''

  def flat(d, prefix='model'):
    items = {}
    for k, v in d.items() if isinstance(d, dict) else ():
      if isinstance(v, dict):
        items.update(flat(v, f'{prefix}.{k}'))
      else:
        items[f'{prefix}.{k}'] = tuple(v) if isinstance(v, list) else v
    return items

  ours = flat(config.model.to_dict())
  theirs = flat(run.model.to_dict() if 'model' in run else {})
  diff = [
    f'{k} ({theirs.get(k, "unset")} -> {ours.get(k, "unset")})'
    for k in sorted(set(ours) | set(theirs))
    if ours.get(k) != theirs.get(k)
  ]
  if not diff:
    return ''
  return (
    f'warning: --config differs from the run\'s {workdir}/config.json in '
    f'{", ".join(diff)}: evaluating with the --config model.'
  )
