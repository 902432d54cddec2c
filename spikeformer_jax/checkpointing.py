"""Orbax checkpoints behind one small interface.

Saves are asynchronous; only committed checkpoints are ever restored (orbax
writes to a temporary directory and renames on success), and the last `keep`
are kept. `restore` takes an abstract state whose `ShapeDtypeStruct`s carry
the target shardings, so a checkpoint restores onto any mesh.

Failures are told apart, each in one line: a checkpoint of another model
(ValueError: the stored shapes differ), an unreadable one (CheckpointError:
truncated or missing files; `restore_intact` moves it aside and falls back to
the newest intact step, deleting nothing), and a save that failed in the
background (CheckpointError from `poll`, which the training loop calls after
every step, so a full disk stops the run at once).

Readers of a run that may still be training (eval, init_from) go through
`read_committed`: the run deletes its old steps (ckpt_keep) while they read.

In Cloud Storage (a `gs://` directory, through etils.epath) orbax writes a
step in place and marks it committed with `commit_success.txt` (there is no
atomic rename), so `committed_steps` there counts the steps holding that
file; damaged steps are moved aside by copy and delete (storage.move).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time

import jax
import orbax.checkpoint as ocp

from spikeformer_jax import errors
from spikeformer_jax import sharding
from spikeformer_jax import storage
from spikeformer_jax import workdir as workdir_lib

DAMAGED_DIR = 'damaged_checkpoints'  # beside checkpoints/: unreadable steps, kept
COMMITTED = 'commit_success.txt'  # in a store: orbax's mark of a committed step


def _ocp_path(path: str):
  """A path as orbax takes it: a local one as it is, a URL as an epath.Path."""
  return storage.epath(path) if storage.is_remote(path) else path


def _chain(e: BaseException) -> str:
  """The messages of an exception and of its causes, on one line (orbax wraps
  tensorstore's status in an exception of its own)."""
  parts, seen = [], set()
  cur: BaseException | None = e
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    parts.append(' '.join(str(cur).split()) or type(cur).__name__)
    cur = cur.__cause__ or cur.__context__
  return ' <- '.join(parts)


_STATUS = re.compile(
  r'(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT'
  r'|PERMISSION_DENIED|RESOURCE_EXHAUSTED|UNAVAILABLE|INTERNAL)'
  r'(?:: )?(?:Error \w+ )?"?([^"]*)"?'
)
# What a damaged checkpoint (truncated, overwritten or missing files) reads as;
# anything else (a flaky filesystem, too little memory) is not evidence of damage.
_DAMAGE = (
  'out_of_range',
  'data_loss',
  'not_found',
  'not found',
  'no such file',
  'metadata is missing',
  'jsondecodeerror',
  'expecting value',
  'unterminated string',
  'zlib',
  'truncated',
  'corrupt',
  'decompress',
  'checksum',
)


def reason(e: BaseException, limit: int = 200) -> str:
  """A short cause of an orbax / tensorstore error: its most telling line."""
  text = _chain(e)
  if 'No space left' in text or "os_error_code='28'" in text:
    return 'no space left on device'
  m = _STATUS.search(text)
  if m:  # tensorstore: the status and what it was doing, not the whole spec
    text = text[m.start() :].split(' <- ')[0].split('. See full')[0]
    text = re.sub(r' in OCDBT database at local file "[^"]*"', '', text)
  else:
    text = text.split(' <- ')[-1]
  return text if len(text) <= limit else text[: limit - 3] + '...'


def is_damage(e: BaseException) -> bool:
  text = _chain(e).lower()
  return any(d in text for d in _DAMAGE)


class _QuietOrbax(logging.Filter):
  """Drops orbax's own error logs (tracebacks of a failed background save, one
  per thread, and of its asyncio tasks); the Checkpointer reports each failure
  once, in one line."""

  def filter(self, record):
    return record.name != 'asyncio' and '/orbax/' not in record.pathname.replace(os.sep, '/')


def _orbax_noise(exc, obj=None) -> bool:
  """An error of orbax's background machinery after its event loop closed
  (reads of a damaged checkpoint still pending): reported by the
  Checkpointer already."""
  text = f'{exc!r} {obj!r}'
  return 'Event loop is closed' in text or 'orbax' in text or 'tensorstore' in text.lower()


def quiet_orbax_logs():
  """Installs the filter on absl's handler and drops orbax's unraisable and
  thread errors (idempotent): the tools report checkpoint failures in one line."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())
  if not isinstance(sys.unraisablehook, _DropOrbaxNoise):
    sys.unraisablehook = _DropOrbaxNoise(sys.unraisablehook, 'object')
    threading.excepthook = _DropOrbaxNoise(threading.excepthook, 'thread')


class _DropOrbaxNoise:
  """A sys.unraisablehook / threading.excepthook that drops `_orbax_noise`
  and hands the rest to the hook it replaced."""

  def __init__(self, default, source: str):
    self._default, self._source = default, source  # source: the attribute naming the origin

  def __call__(self, args):
    if not _orbax_noise(args.exc_value, getattr(args, self._source)):
      self._default(args)


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 3, create: bool = True):
    self.directory = storage.abspath(directory)
    if not create and not storage.isdir(self.directory):
      raise FileNotFoundError(f'no checkpoint directory {self.directory}.')
    if keep < 1:
      raise errors.ConfigError(f'ckpt_keep={keep} would keep no checkpoint; use ckpt_keep >= 1.')
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    self._mngr = self._manager()
    self._saving: int | None = None  # the step of the save in flight (or last started)
    self._confirmed: set[int] = set()  # saves seen committed
    self._failed = False

  def _manager(self):
    if storage.is_remote(self.directory):
      storage.invalidate()  # gcsfs's cached listings: what other processes wrote meanwhile
    return ocp.CheckpointManager(
      _ocp_path(self.directory), options=self._options, item_names=('state', 'meta')
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict | None = None, *, force: bool = False):
    """Starts saving `state` (a pytree of arrays) and a JSON-able `meta`."""
    self.poll()
    self._saving = step
    try:
      self._mngr.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
        ),
        force=force,
      )
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)  # the previous save failed in its finalize thread, or this one

  def poll(self):
    """Raises CheckpointError if a background save has failed (non-blocking).

    Orbax's finalize thread consumes the error of a failed commit, so besides
    `check_for_errors` a save that is no longer in progress must have left its
    committed step directory."""
    try:
      self._mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    step = self._saving
    if step is None or step in self._confirmed or self._mngr.is_saving_in_progress():
      return
    if _is_committed(self.directory, step):
      self._confirmed.add(step)
    else:
      self._fail(self._background_error() or RuntimeError('it was never committed'))

  def _background_error(self):
    """The exception of orbax's finalize thread, if it kept one: its public
    `wait_until_finished` joins that thread and raises it (once)."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      return e
    return None

  def wait(self):
    """Blocks until the save in flight is committed; CheckpointError if it failed."""
    if self._failed:
      return
    try:
      self._mngr.wait_until_finished()
      self._mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)

  def _fail(self, e):
    self._failed = True
    good = [s for s in committed_steps(self.directory) if s != self._saving]
    last = (
      f'the last good checkpoint is step {good[-1]} in {self.directory}'
      if good
      else f'no checkpoint is in {self.directory} yet'
    )
    raise errors.CheckpointError(
      f'saving checkpoint {self._saving} failed ({reason(e)}); stopped: {last}. Free '
      'the space or fix the directory, then rerun the same command to resume.'
    ) from e

  def restore(self, abstract_state, step: int | None = None, *, backfill=None):
    """Returns (state, meta) of `step` (default: the latest) onto the shardings
    of `abstract_state` (a pytree of jax.ShapeDtypeStruct with .sharding).

    `backfill`: {key: fn(restored state) -> entry} for top-level entries of
    the state that checkpoints written before them lack (the train state's
    RNG stream): such a checkpoint restores without them, and each is derived.
    ValueError if the checkpoint holds another model; CheckpointError if it
    cannot be read."""
    if storage.is_remote(self.directory):
      storage.invalidate()  # read what is there now
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}.')
    if step not in self.all_steps():
      raise FileNotFoundError(
        f'no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}.'
      )
    stored = self._stored_shapes(step)
    missing = [
      k
      for k in (backfill or {})
      if k in abstract_state and not any(name == k or name.startswith(k + '/') for name in stored)
    ]
    target = (
      {k: v for k, v in abstract_state.items() if k not in missing} if missing else abstract_state
    )
    self._check_shapes(step, stored, target)
    try:
      out = self._mngr.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:  # pylint: disable=broad-except
      raise errors.CheckpointError(
        f'checkpoint {step} in {self.directory} is unreadable ({reason(e)})'
      ) from e
    state = out['state']
    for k in missing:
      state[k] = backfill[k](state)
    return state, out['meta']

  def restore_intact(self, abstract_state, log=print, *, backfill=None):
    """Resume: (state, meta) of the newest step that reads. Damaged newer
    steps are moved to ../damaged_checkpoints/ (nothing is deleted: a later
    save of the same step must not collide with them), each with one line.
    Nothing moves when no step reads, or when a read fails for another reason
    than damage (a flaky filesystem, too little memory): CheckpointError."""
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        out = self.restore(abstract_state, step, backfill=backfill)
        break
      except errors.CheckpointError as e:
        if not is_damage(e):
          raise errors.CheckpointError(
            f'{errors.one_line(e)}; that is no sign of a damaged checkpoint, so nothing '
            'was moved: fix the cause and rerun.'
          ) from e
        damaged.append((step, e))
    else:
      raise errors.CheckpointError(
        f'no checkpoint in {self.directory} reads ('
        + '; '.join(f'{s}: {reason(e)}' for s, e in damaged)
        + '); nothing was moved. Train '
        'from scratch in another --workdir, or move the checkpoints away.'
      )
    if damaged:
      root = storage.join(storage.dirname(self.directory), DAMAGED_DIR)
      dests = []
      for step, _ in damaged:
        dest = storage.join(root, str(step))
        if jax.process_index() == 0:
          storage.makedirs(root)
          while storage.exists(dest):
            dest += '+'
          storage.move(storage.join(self.directory, str(step)), dest)
        dests.append(dest)
      _sync('spikeformer_jax_damaged_checkpoint')
      self._mngr.close()
      self._mngr = self._manager()
      for (_, error), dest in zip(damaged, dests):
        log(f'{errors.one_line(error)}: moved to {dest}; resuming from step {out[1].get("step")}.')
    return out

  def intact_steps(self, abstract_state, exclude=(), *, backfill=None) -> list[int]:
    """The steps that restore (each is read in full: for error messages)."""
    ok = []
    for s in self.all_steps():
      if s in exclude:
        continue
      try:
        self.restore(abstract_state, s, backfill=backfill)
        ok.append(s)
      except (ValueError, errors.CheckpointError):
        pass
    return ok

  def _stored_shapes(self, step: int) -> dict:
    """{'params/...': shape} of the checkpoint's arrays; unreadable metadata is
    a damaged checkpoint, not another model."""
    try:
      md = ocp.StandardCheckpointer().metadata(
        _ocp_path(storage.join(self.directory, str(step), 'state'))
      )
      stored = _shapes(getattr(getattr(md, 'item_metadata', md), 'tree', md))
    except Exception as e:  # pylint: disable=broad-except
      raise errors.CheckpointError(
        f'checkpoint {step} in {self.directory} is unreadable (its metadata: {reason(e)})'
      ) from e
    if not stored or '' in stored:  # orbax gives an empty tree for a missing _METADATA
      raise errors.CheckpointError(
        f'checkpoint {step} in {self.directory} is unreadable (its metadata is missing or empty)'
      )
    return stored

  def _check_shapes(self, step: int, stored: dict, abstract_state):
    """One clear error, before orbax's own, when the checkpoint's arrays do
    not fit the model (another size, class count or optimizer)."""
    wanted = _shapes(abstract_state)
    diffs = [
      f'{k}: checkpoint {stored.get(k)} vs model {wanted.get(k)}'
      for k in sorted(set(stored) | set(wanted))
      if stored.get(k) != wanted.get(k)
    ]
    if diffs:
      raise errors.ConfigError(
        f'checkpoint {self.directory}/{step} does not fit this model and optimizer '
        f'(was it written with another config?); {len(diffs)} arrays differ, e.g. '
        + '; '.join(diffs[:3])
      )

  def wait_quietly(self):
    """wait(), for paths that already report another error: a failed save is
    logged, not raised over it."""
    try:
      self.wait()
    except errors.CheckpointError as e:
      print(f'error: {errors.one_line(e)}', file=sys.stderr, flush=True)

  def close(self, quiet: bool = False):
    """Waits for the save in flight (CheckpointError if it failed, unless
    `quiet`) and closes."""
    try:
      self.wait_quietly() if quiet else self.wait()
    finally:
      try:
        self._mngr.close()
      except Exception:  # pylint: disable=broad-except
        pass  # a failed save is reported by wait()


def committed_steps(directory: str) -> list[int]:
  try:
    steps = sorted(int(n) for n in storage.listdir(directory) if n.isdigit())
  except storage.errors_of_the_store():
    return []
  if storage.is_remote(directory):  # written in place there: committed once marked
    steps = [s for s in steps if _is_committed(directory, s)]
  return steps


def _is_committed(directory: str, step: int) -> bool:
  if storage.is_remote(directory):
    return storage.exists(storage.join(directory, str(step), COMMITTED))
  return str(step) in os.listdir(directory)


class RunBeingWritten(errors.CheckpointError):
  """Each checkpoint read was deleted by the run's rotation meanwhile."""


def _link_tree(src: str, dst: str):
  os.mkdir(dst)
  with os.scandir(src) as entries:
    for entry in entries:
      if entry.is_dir(follow_symlinks=False):
        _link_tree(entry.path, os.path.join(dst, entry.name))
      else:
        os.link(entry.path, os.path.join(dst, entry.name))


_HOLD = '.reading-'


def _drop_dead_holds(directory: str):
  """Removes the holds of readers on this host that were killed before they
  could (a hold keeps its step's disk space)."""
  prefix = f'{_HOLD}{socket.gethostname()}-'
  try:
    names = os.listdir(directory)
  except OSError:
    return
  for name in names:
    pid = name[len(prefix) :].split('-')[0] if name.startswith(prefix) else ''
    if pid.isdigit():
      try:
        os.kill(int(pid), 0)
      except ProcessLookupError:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
      except OSError:
        pass  # alive, another user's


def _hold(directory: str, step: int) -> str | None:
  """A private copy of step `step` of `directory` made of hard links (no data
  is copied), in a hidden directory beside it: once made, the run's rotation
  may delete the step, the copy stays whole. Returns the copy's root (it holds
  `step`), or None where links cannot be made (a read-only filesystem, several
  processes reading, a store: see `read_committed`). FileNotFoundError if the
  step vanished meanwhile."""
  if jax.process_count() > 1 or storage.is_remote(directory):  # every process: the same path
    return None
  _drop_dead_holds(directory)
  try:
    root = tempfile.mkdtemp(prefix=f'{_HOLD}{socket.gethostname()}-{os.getpid()}-', dir=directory)
  except OSError:
    return None
  try:
    _link_tree(os.path.join(directory, str(step)), os.path.join(root, str(step)))
    if step not in committed_steps(directory):  # deleted while linked: maybe partial
      raise FileNotFoundError(step)
    return root
  except FileNotFoundError:
    shutil.rmtree(root, ignore_errors=True)
    raise
  except OSError:
    shutil.rmtree(root, ignore_errors=True)
    return None


def _vanished(directory: str, step: int, workdir: str) -> bool:
  """Whether `step` was deleted (or is being deleted: a live run's rotation
  takes a moment to remove it) rather than damaged."""
  live = workdir_lib.holder(workdir) is not None
  for _ in range(20 if live else 1):
    if step not in committed_steps(directory):
      return True
    if live:
      time.sleep(0.1)
  return False


def read_committed(
  directory: str, read, *, step: int | None = None, workdir: str | None = None, tries: int = 5
):
  """`read(root, step)` of the newest committed step of `directory` (or of
  `step`), while the run in `workdir` may go on saving and deleting its old
  steps. The step is read from a hold (`_hold`); if it vanished all the same
  (no hold possible), the new newest is read, `tries` times at most. A step
  that stays and does not read is read once more in place, so that the error
  names it (a damaged checkpoint) as before. RunBeingWritten if every try
  lost its step.

  In a store there are no hard links to hold a step with: the step is read in
  place, and a read that fails because the run's rotation deleted the step
  meanwhile (it is no longer committed) is retried on the new newest step. A
  read that succeeds is whole: objects are immutable, and a step's are never
  rewritten (a damaged step is moved aside before its number is saved again)."""
  workdir = workdir or storage.dirname(storage.abspath(directory))
  for _ in range(tries):
    steps = committed_steps(directory)
    target = steps[-1] if step is None and steps else step
    if target is None or target not in steps:
      return read(directory, target)  # its own error: no checkpoint, no such step
    try:
      root = _hold(directory, target)
    except FileNotFoundError:
      continue  # deleted meanwhile: the new newest
    try:
      return read(root or directory, target)
    except Exception:  # pylint: disable=broad-except  # told apart here
      if not _vanished(directory, target, workdir):
        if root is None:
          raise
        return read(directory, target)
    finally:
      if root:
        shutil.rmtree(root, ignore_errors=True)
  who = workdir_lib.holder(workdir)
  raise RunBeingWritten(
    f'the run in {workdir} is being written'
    + (f' by {workdir_lib.describe(who)}' if who else '')
    + f', which deleted each checkpoint while it was read ({tries} tries): retry, or '
    'stop that run first (or give it a larger ckpt_keep).'
  )


def _sync(name: str):
  if jax.process_count() > 1:  # the coordination service's barrier: no 30 s gloo limit
    sharding.barrier(name)


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings` (same tree or a prefix)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
  )


def flatten(tree, prefix: str = '') -> dict:
  """{'params/block/0/attn/q_bn/scale': leaf}, in leaf order, whatever the
  path key types (dict keys, nnx.State, restored nested dicts)."""

  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = ([prefix] if prefix else []) + [name(k) for k in path]
    if parts and parts[-1] == 'value':  # nnx.Variable wrappers
      parts = parts[:-1]
    out['/'.join(parts)] = leaf
  return out


def _shapes(tree) -> dict:
  """{'params/block/0/attn/q_bn/scale': shape}."""
  return {k: tuple(getattr(leaf, 'shape', ())) for k, leaf in flatten(tree).items()}
