"""Config sweeps: declare next to the configs, run, resume, tabulate.

A sweep is a list of points; a point is a dict of overrides, dotted keys into
the config (`'model.T': 4`), plus optionally `'config'` (the config file's
argument, e.g. a paper row 'cifar10-2-256') and `'name'`. A config module
declares its sweeps with `get_sweep(name)`, returning the points, built with:

    grid(**{'model.T': [1, 2, 4, 6]})                  # cartesian product
    zipped(**{'config': [...], 'model.depth': [...]})   # element-wise
    random_search(8, seed=0, **{'optimizer.lr': loguniform(1e-4, 1e-2)})
    product(a, b), chain(a, b)                          # combine sweeps

`expand` turns them into complete configs and rejects invalid ones (unknown
fields, values of the wrong type, what train.py's config checks refuse, models
that cannot be built) before anything runs. `run` trains each point in WORKDIR/<point> (train_lib's own resume makes
a rerun skip finished points and continue interrupted ones); a point that
fails, is stopped by a signal or finds its directory in use by another process
is recorded in WORKDIR/status.json and the sweep goes on. `collect` reads every
point's config and final metrics into a table (CSV, markdown) and a plot.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np

from spikeformer_jax import config_lib
from spikeformer_jax import errors
from spikeformer_jax import extras
from spikeformer_jax import storage
from spikeformer_jax import workdir as workdir_lib

# Keys that annotate a point without being swept: not in its name, not a column.
ANNOTATIONS = ('name', 'paper_top1')


# --------------------------------------------------------------------------
# Declaring.
# --------------------------------------------------------------------------


def grid(**axes) -> list[dict]:
  """Every combination of the axes' values (the last axis varies fastest)."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zipped(**axes) -> list[dict]:
  """The i-th values of all axes together; the axes must have equal lengths."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise errors.ConfigError(f'zipped axes of different lengths: {lengths}.')
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def product(*sweeps: list[dict]) -> list[dict]:
  """Every combination of one point from each sweep, merged."""
  out = []
  for parts in itertools.product(*sweeps):
    merged = {}
    for p in parts:
      merged.update(p)
    out.append(merged)
  return out


def chain(*sweeps: list[dict]) -> list[dict]:
  """The points of each sweep, one after another."""
  return [dict(p) for s in sweeps for p in s]


@dataclasses.dataclass(frozen=True)
class uniform:  # pylint: disable=invalid-name
  lo: float
  hi: float

  def sample(self, rng):
    return float(rng.uniform(self.lo, self.hi))


@dataclasses.dataclass(frozen=True)
class loguniform:  # pylint: disable=invalid-name
  lo: float
  hi: float

  def sample(self, rng):
    return float(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi))))


def random_search(n: int, seed: int = 0, **space) -> list[dict]:
  """n points drawn with a fixed seed: a list is a uniform choice, uniform /
  loguniform a continuous range, anything else a constant."""
  rng = np.random.default_rng(seed)

  def draw(v):
    if isinstance(v, (uniform, loguniform)):
      return v.sample(rng)
    if isinstance(v, (list, tuple)):
      return v[int(rng.integers(len(v)))]
    return v

  return [{k: draw(v) for k, v in space.items()} for _ in range(n)]


# --------------------------------------------------------------------------
# Expanding into complete, validated configs.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Point:
  name: str
  overrides: dict  # dotted key -> value (without 'config' / 'name')
  config_arg: str  # the config file's argument ('' = its default)
  config: ml_collections.ConfigDict


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location(
    'sweep_config_' + re.sub(r'\W', '_', os.path.abspath(path)), path
  )
  if spec is None or spec.loader is None or not os.path.exists(path):
    file, colon, _ = path.rpartition(':')
    if colon and os.path.exists(file):  # each point names its variant
      raise FileNotFoundError(
        f'config file {path!r}: sweeps take the config file without '
        f':VARIANT (each point names its own); use --config={file}.'
      )
    raise FileNotFoundError(f'config file {path!r} not found.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def declared_sweeps(module) -> list[str]:
  return list(getattr(module, 'SWEEPS', ()))


def _fmt(v) -> str:
  if isinstance(v, float):
    return f'{v:.3g}'
  if isinstance(v, (tuple, list)):
    return '-'.join(_fmt(x) for x in v)
  return str(v)


def point_name(overrides: dict, keys=None) -> str:
  """'T=4,surrogate=atan' from the overrides (last key component = value),
  over `keys` (default: all); an explicit 'name' wins."""
  if 'name' in overrides:
    return str(overrides['name'])
  keys = [k for k in overrides if k not in ANNOTATIONS] if keys is None else keys
  parts = [
    _fmt(overrides[k]) if k == 'config' else f'{k.split(".")[-1]}={_fmt(overrides[k])}'
    for k in keys
    if k in overrides
  ]
  name = ','.join(parts) or 'base'
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', name)


def varying_keys(points: list[dict]) -> list[str]:
  """Keys whose value differs between points (the swept fields), in order."""
  keys = list(dict.fromkeys(k for p in points for k in p if k not in ANNOTATIONS))
  return [k for k in keys if len({repr(p.get(k)) for p in points}) > 1]


def check_buildable(config: ml_collections.ConfigDict):
  """train.py's checks of the config (validation.validate_config: fields,
  sizes, finite floats; validate_start: a fine-tuning row names its weights),
  then the model built abstractly (no arrays): catches what would fail each
  point's run before any point runs."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import models, validation  # pylint: disable=import-outside-toplevel

  validation.validate_config(config)  # imports config.plugins: their kinds / families
  validation.validate_start(config)
  nnx.eval_shape(lambda: models.build_model(config.model))


class InvalidPoints(errors.ConfigError):
  """Points that cannot run: a line for each, after a summary line."""

  multiline = True


def _default_arg(module) -> str:
  """The default of `get_config`'s argument (its default variant), or ''."""
  params = list(inspect.signature(module.get_config).parameters.values())
  default = params[0].default if params else None
  return default if isinstance(default, str) else ''


def expand(
  config_path: str,
  points: list[dict],
  common: dict | None = None,
  validate: bool = True,
  runlocal: bool = False,
) -> list[Point]:
  """Complete configs of every point (common overrides applied to all;
  `runlocal` adds the configs' ',runlocal' flag: a seconds-long smoke run of
  each point); raises ValueError listing every invalid point before anything
  runs."""
  module = load_config_module(config_path)
  out, problems, seen = [], [], {}
  swept = varying_keys(points)
  for i, raw in enumerate(points):
    raw = dict(raw)
    name = point_name(raw, swept)
    arg = str(raw.pop('config', ''))
    if runlocal:  # the smoke run of the point's variant, the default one included
      arg = ','.join(filter(None, [arg or _default_arg(module), 'runlocal']))
    raw.pop('name', None)
    if name in seen:
      name = f'{name}#{i}'
    seen[name] = True
    where = f'sweep point {name!r}: '
    try:
      config = module.get_config(arg) if arg else module.get_config()
      config_lib.apply_overrides(config, {**(common or {}), **raw}, where)
      if validate:
        check_buildable(config)
    except errors.UserError as e:  # anything else is a bug: its traceback
      msg = str(e)
      problems.append(msg if msg.startswith('sweep point') else where + msg)
      continue
    out.append(Point(name, raw, arg, config))
  if problems:
    raise InvalidPoints(
      f'{len(problems)} of {len(points)} sweep points are invalid '
      '(nothing was run):\n  ' + '\n  '.join(problems)
    )
  return out


def overridden_common(points: list[Point], common: dict | None) -> str:
  """A one-line warning naming the --set fields that points set themselves
  (there the point's value wins), or '' if there are none."""
  parts = []
  for key in common or {}:
    names = [p.name for p in points if key in p.overrides]
    if names:
      shown = ', '.join(names[:3]) + (f' +{len(names) - 3} more' if len(names) > 3 else '')
      parts.append(
        f'{key} (in {"all " if len(names) == len(points) else ""}{len(names)} points: {shown})'
      )
  if not parts:
    return ''
  return (
    'warning: --set ' + '; '.join(parts) + ": these points set the field themselves "
    "and keep their own value."
  )


def get_points(
  config_path: str,
  sweep: str,
  common: dict | None = None,
  validate: bool = True,
  runlocal: bool = False,
) -> list[Point]:
  """The expanded points of sweep `sweep` declared in `config_path`."""
  module = load_config_module(config_path)
  names = declared_sweeps(module)
  if sweep not in names:
    raise errors.ConfigError(
      f'{config_path} declares no sweep {sweep!r}; declared: {", ".join(names) or "none"}.'
    )
  return expand(config_path, module.get_sweep(sweep), common, validate, runlocal)


# --------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------


def read_json(path: str, fix: str, kind: type = dict):
  """A JSON file of the sweep (a `kind` at its top), or a UserError naming it,
  what is wrong and `fix`; None where it does not exist."""
  if not storage.exists(path):
    return None
  try:
    data = json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    what = (
      f'not valid JSON ({e.msg}, line {e.lineno})'
      if isinstance(e, json.JSONDecodeError)
      else 'not a text file'
    )
    raise errors.UserError(f'{path} is {what}: {fix}.') from e
  if not isinstance(data, kind):
    raise errors.UserError(
      f'{path} holds a {type(data).__name__}, not a JSON '
      f'{"object" if kind is dict else kind.__name__}: {fix}.'
    )
  return data


# What `collect` says to do about a damaged file of a point; `run` redoes the point.
_REDO = 'delete it and rerun `sweep.py run` with the same arguments to evaluate that point again'


def final_metrics(point_dir: str, fix: str = _REDO) -> dict | None:
  """The point's final_metrics.json, None if it has none; UserError if damaged."""
  return read_json(storage.join(point_dir, 'final_metrics.json'), fix)


def point_status(point_dir: str, fix: str = _REDO) -> str:
  """finished | interrupted (started, not finished) | new; UserError naming a
  damaged final_metrics.json (and `fix`)."""
  m = final_metrics(point_dir, fix)
  if m is not None and m.get('steps') == m.get('total_steps'):
    return 'finished'
  if storage.exists(storage.join(point_dir, 'config.json')):
    return 'interrupted'
  return 'new'


# How a point process that did not finish ended, from its exit status: stopped
# by a signal after saving its step (rerun to resume; 143 / 130 from the point's
# own handler, negative if the signal came before it was installed), or
# refused because another process trains in its directory.
BUSY_EXIT = 75  # sysexits' EX_TEMPFAIL: try again later
_ENDED = {
  143: 'preempted',
  -signal.SIGTERM: 'preempted',
  130: 'interrupted',
  -signal.SIGINT: 'interrupted',
  129: 'interrupted',
  -signal.SIGHUP: 'interrupted',
  BUSY_EXIT: 'busy',
}


def point_command(
  config_path: str,
  sweep: str,
  point: str,
  workdir: str,
  common: dict | None = None,
  runlocal: bool = False,
) -> list[str]:
  """The command that trains one point (also what `commands` prints)."""
  # Absolute paths: the process runs beside the package (the repository root of a
  # checkout), not in the caller's cwd, so that it imports the same spikeformer_jax.
  cmd = [
    sys.executable,
    '-m',
    'spikeformer_jax.sweep',
    'point',
    f'--config={os.path.abspath(config_path)}',
    f'--sweep={sweep}',
    f'--point={point}',
    f'--workdir={storage.abspath(workdir)}',
  ]
  for k, v in (common or {}).items():
    cmd.append(f'--set={k}={json.dumps(v)}')
  return cmd + (['--runlocal'] if runlocal else [])


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Status:
  """WORKDIR/status.json: each point's state, rewritten atomically.

  A record, not the truth (that is each point's directory): with `log`
  (`run`), a damaged one is moved aside with a line that says so and written
  anew; without (`collect`), it is a UserError naming it and the fix.
  """

  _FIX = 'delete it (`sweep.py run` writes it again)'

  def __init__(self, workdir: str, log=None):
    self.path = storage.join(workdir, 'status.json')
    self.lock = threading.Lock()
    fix = (
      self._FIX
      if log is None
      else f"moved to {self.path}.damaged; the points' states are recorded anew"
    )
    try:
      self.data = read_json(self.path, fix) or {}
    except errors.UserError as e:
      if log is None:
        raise
      storage.move(self.path, self.path + '.damaged')
      log(f'[warning] {e}')
      self.data = {}

  def set(self, name: str, **fields):
    with self.lock:
      try:  # keep what another `run` on this sweep wrote
        self.data = {**self.data, **(read_json(self.path, self._FIX) or {})}
      except errors.UserError:
        pass  # damaged meanwhile: what this run knows replaces it
      self.data[name] = {**self.data.get(name, {}), **fields}
      storage.write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def config_changes(point_dir: str, config: ml_collections.ConfigDict) -> list[str]:
  """Fields where the config a point's run was started with (its config.json)
  differs from `config`: resuming or skipping it would mix two experiments."""
  run = read_json(storage.join(point_dir, 'config.json'), _CONFIG_FIX)
  if run is None:
    return []
  if not isinstance(run.get('config'), dict):
    raise errors.UserError(f'{point_dir}/config.json holds no run config: {_CONFIG_FIX}.')
  return config_lib.config_diff(run['config'], json.loads(json.dumps(config.to_dict())))


_CONFIG_FIX = (
  "it records the config the point was trained with; restore it from a copy, or "
  "delete the point's directory to train it again"
)


def _conflict_message(point_dir: str, changes: list[str]) -> str:
  shown = ', '.join(changes[:6]) + (f' (+{len(changes) - 6} more)' if len(changes) > 6 else '')
  return (
    f'{point_dir} was trained with other values of {shown}; delete that directory '
    'to retrain the point, or use another --workdir.'
  )


def write_manifest(
  config_path: str,
  sweep: str,
  workdir: str,
  points: list[Point],
  common: dict | None = None,
  runlocal: bool = False,
):
  """WORKDIR/sweep.json: what `collect` reads. Refuses a workdir that holds
  another sweep (mixing two sweeps' points would corrupt both tables) or a
  train.py run (the sweep's files would land among the run's)."""
  path = storage.join(workdir, 'sweep.json')
  who = storage.isdir(workdir) and workdir_lib.holder(workdir)  # points have their own dirs
  if who:
    raise errors.ConfigError(
      f'{workdir} is in use by {workdir_lib.describe(who)}: it is a run\'s '
      'workdir, not a sweep directory; use another --workdir.'
    )
  run_files = [
    n
    for n in ('config.json', 'checkpoints', workdir_lib.LOCK_NAME)
    if storage.exists(storage.join(workdir, n))
  ]
  if run_files and not storage.exists(path):  # a finished train.py run: not a sweep's
    raise errors.ConfigError(
      f'{workdir} holds a train.py run ({", ".join(run_files)}), not a '
      'sweep: use another --workdir (a new directory, or a sweep\'s).'
    )
  try:
    storage.makedirs(workdir)
  except OSError as e:
    raise errors.ConfigError(
      f'cannot create the sweep directory {workdir} ({e.strerror}): use a '
      '--workdir in a folder you can write to.'
    ) from e
  old = read_json(
    path,
    f'delete it if {workdir} holds sweep {sweep!r} (`run` writes it again), '
    'else use another --workdir',
  )
  if old is not None:
    if (os.path.abspath(old.get('config') or '?'), old.get('sweep')) != (
      os.path.abspath(config_path),
      sweep,
    ):
      raise errors.ConfigError(
        f'{workdir} holds sweep {old.get("sweep")!r} of '
        f'{old.get("config")}, not {sweep!r} of {config_path}: use '
        'another --workdir.'
      )
  swept = varying_keys([{'config': p.config_arg, **p.overrides} for p in points])
  manifest = {
    'config': os.path.abspath(config_path),
    'sweep': sweep,
    'common': common or {},
    'runlocal': runlocal,
    'swept': swept,
    'points': [
      {
        'name': p.name,
        'config': p.config_arg,
        'overrides': p.overrides,
        # only a number the point declares (not its base variant's)
        'paper_top1': p.overrides.get('paper_top1', 0.0),
      }
      for p in points
    ],
  }
  storage.write_text(path, json.dumps(manifest, indent=1, default=str))


class _PointLog:
  """A point's sweep.log, the point process's output: appended to locally; on
  gs:// (an object store cannot append) the earlier content and this run's
  lines rewritten whole, at most every `every` seconds and at the end."""

  def __init__(self, path: str, every: float = 10.0):
    self.path, self.every = path, every
    self.remote = storage.is_remote(path)
    if self.remote:
      self.text = storage.read_text(path, errors_='replace') if storage.exists(path) else ''
      self.written = time.monotonic()
    else:
      self.file = open(path, 'a', encoding='utf-8')  # noqa: SIM115  # closed by __exit__

  def write(self, line: str):
    if not self.remote:
      self.file.write(line)
      return
    self.text += line

  def flush(self, force: bool = False):
    if not self.remote:
      self.file.flush()
    elif force or time.monotonic() - self.written >= self.every:
      self.written = time.monotonic()
      try:
        storage.write_text(self.path, self.text)
      except OSError:  # a passing store error: the next flush writes it all again
        if force:
          raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.remote:
      self.flush(force=True)
    else:
      self.file.close()


def run(
  config_path: str,
  sweep: str,
  workdir: str,
  *,
  parallel: int = 1,
  common: dict | None = None,
  runlocal: bool = False,
  env: dict | None = None,
  log=print,
) -> dict:
  """Runs every point not finished yet, `parallel` at a time, each in its own
  process and workdir. Returns {point: finished | failed | conflict | busy |
  preempted | interrupted}.

  SIGTERM, SIGINT (Ctrl-C) or SIGHUP (a closed terminal) starts no new point
  and is passed on to the running ones, which save their step and are
  recorded (preempted / interrupted: a rerun resumes them); then
  errors.Stopped propagates, with exit code 143 / 130 / 129 as train.py's. A
  second signal is passed on too: a second Ctrl-C stops the points at once,
  as in train.py, where a second SIGTERM or SIGHUP lets the save go on.
  """
  config_path, workdir = os.path.abspath(config_path), storage.abspath(workdir)
  points = get_points(config_path, sweep, common, runlocal=runlocal)
  warning = overridden_common(points, common)
  if warning:
    log(warning)
  write_manifest(config_path, sweep, workdir, points, common, runlocal)
  status = _Status(workdir, log)
  todo = []
  for p in points:
    pdir = storage.join(workdir, p.name)
    try:
      changes = config_changes(pdir, p.config)
    except errors.UserError as e:  # a damaged config.json: this point only
      log(f'[FAILED] {p.name}: {e}')
      status.set(p.name, status='failed', error=str(e))
      continue
    if changes:
      msg = _conflict_message(pdir, changes)
      log(f'[CONFLICT] {p.name}: {msg}')
      status.set(p.name, status='conflict', error=msg)
      continue
    final = storage.join(pdir, 'final_metrics.json')
    try:
      st = point_status(
        pdir, fix=f'moved to {final}.damaged; the point is evaluated (or trained on) again'
      )
    except errors.UserError as e:  # e.g. a kill while it was written: redo, not refuse
      storage.move(final, final + '.damaged')
      log(f'[warning] {e}')
      st = point_status(pdir)
    if st == 'finished':
      log(f'[skip] {p.name}: finished')
      status.set(p.name, status='finished')
    else:
      todo.append((p, st))
  stop = threading.Event()
  # The running point processes; a re-entrant lock, since a second signal's
  # handler may run inside the first's (both in the main thread).
  running: dict[str, subprocess.Popen] = {}
  lock = threading.RLock()
  received: list[signal.Signals] = []
  told, told_lock = [0], threading.Lock()

  def announce():
    """Logs the signals received so far (once each): by the main loop, and by
    a worker before the end of its point, which the signal may have caused."""
    with told_lock:
      while told[0] < len(received):
        name = received[told[0]].name
        again = (
          'the running points stop without saving'
          if received[told[0]] == signal.SIGINT
          else 'their save goes on'
        )  # train.py's StopSignals.URGENT_AGAIN
        log(
          '[stopping] waiting for the running points to save their step'
          if told[0] == 0
          else f'[stopping] {name} again: passed on; {again}'
        )
        told[0] += 1

  def one(item):
    p, st = item
    pdir = storage.join(workdir, p.name)
    with lock:  # a signal either stops this start or reaches the process
      if stop.is_set():
        return
      storage.makedirs(pdir)
      # Its own session: the terminal's Ctrl-C reaches this process only, which
      # passes it on once (twice would mean "stop now, do not save").
      proc = subprocess.Popen(
        point_command(config_path, sweep, p.name, pdir, common, runlocal),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors='replace',
        cwd=_ROOT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
      )
      running[p.name] = proc
    log(f'[{"resume" if st == "interrupted" else "start"}] {p.name}')
    status.set(p.name, status='running', started=time.time())
    t0 = time.time()
    # The point's own last lines: another process (one that holds the point's
    # directory) may append to the same sweep.log meanwhile.
    own: collections.deque[str] = collections.deque(maxlen=15)
    try:
      with _PointLog(storage.join(pdir, 'sweep.log')) as out, proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
          out.write(line)
          out.flush()
          own.append(line)
    finally:
      with lock:
        running.pop(p.name, None)
    secs, rc = round(time.time() - t0, 1), proc.returncode
    announce()
    if rc == 0 and _status_or_damaged(pdir) == 'finished':
      status.set(p.name, status='finished', seconds=secs, error='')
      log(f'[done] {p.name} ({secs} s)')
      return
    tail = ''.join(own).strip()
    lines = tail.splitlines() or ['']
    why = next((line for line in reversed(lines) if line.startswith('error:')), lines[-1])
    ended = _ENDED.get(rc, 'failed')
    status.set(p.name, status=ended, seconds=secs, returncode=rc, error=tail)
    how = f'exit {rc}' if rc >= 0 else f'killed by {signal.Signals(-rc).name}'
    log(f'[{ended.upper()}] {p.name} ({how}): {why}')

  def pass_on(signum, _frame):
    # Only records and signals: the main loop below logs, the workers record
    # how each point ended.
    with lock:
      received.append(signal.Signals(signum))
      stop.set()
      for proc in running.values():
        try:
          proc.send_signal(signum)
        except ProcessLookupError:
          pass

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for signum in STOP_SIGNALS:
      if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
        previous[signum] = signal.signal(signum, pass_on)
  pool = concurrent.futures.ThreadPoolExecutor(max(1, parallel))
  try:
    futures = [pool.submit(one, item) for item in todo]
    while True:
      _, pending = concurrent.futures.wait(futures, timeout=0.1)
      announce()
      if not pending:
        break
    for f in futures:
      f.result()  # a worker's own error (not a point's) is a bug: its traceback
  finally:
    pool.shutdown(wait=True)
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  if received:
    what, name, code = STOP_SIGNALS[received[0]]
    raise errors.Stopped(
      f'{what} ({name}): no new point started; the running ones saved '
      f'their step (see {workdir}/status.json); rerun the same command to '
      'resume.',
      code,
    )
  return {name: s['status'] for name, s in status.data.items() if name in {p.name for p in points}}


# As train.py: how a sweep stopped by each signal reports itself, and exits.
STOP_SIGNALS = {
  signal.SIGTERM: ('preempted', 'SIGTERM', 143),
  signal.SIGINT: ('interrupted', 'SIGINT', 130),
  signal.SIGHUP: ('hung up', 'SIGHUP', 129),
}  # a closed terminal


def _status_or_damaged(point_dir: str) -> str:
  try:
    return point_status(point_dir)
  except errors.UserError:
    return 'damaged'


def run_point(
  config_path: str,
  sweep: str,
  point: str,
  workdir: str,
  common: dict | None = None,
  runlocal: bool = False,
) -> dict:
  """Trains one point in this process (what each sweep process runs)."""
  from spikeformer_jax import train_lib  # pylint: disable=import-outside-toplevel

  points = {
    p.name: p for p in get_points(config_path, sweep, common, validate=False, runlocal=runlocal)
  }
  if point not in points:
    raise errors.ConfigError(
      f'sweep {sweep!r} has no point {point!r}; points: {", ".join(points)}.'
    )
  changes = config_changes(workdir, points[point].config)
  if changes:
    raise errors.ConfigError(_conflict_message(workdir, changes))
  return train_lib.train_and_evaluate(points[point].config, workdir)


# --------------------------------------------------------------------------
# Collecting.
# --------------------------------------------------------------------------

# Columns from each point's final_metrics.json; paper_top1 (the paper's number
# for the point, as a fraction like test_top1) comes from the declaration.
METRICS = (
  'test_top1',
  'paper_top1',
  'test_top5',
  'test_loss',
  'steps',
  'wall_time_s',
  'num_params',
)


def check_collect_options(metric: str, x: str, swept: list[str]):
  """`collect`'s options, before anything is written: one line each."""
  if metric not in METRICS:
    raise errors.ConfigError(
      f'--metric={metric!r}: collect sorts and plots a number of each '
      f'point; valid: {", ".join(METRICS)}.'
    )
  if x and x not in swept:
    valid = ', '.join(swept) if swept else 'none (its points differ in no field)'
    raise errors.ConfigError(f'--x={x!r} is not a field this sweep varies; valid: {valid}.')


def collect(
  workdir: str, *, metric: str = 'test_top1', x: str = '', descending: bool | None = None
) -> list[dict]:
  """Reads every point of the sweep in `workdir` into rows; writes
  results.csv, results.md (sorted by `metric`) and results.png (`metric`
  against swept field `x`, one line per combination of the other fields)."""
  path = storage.join(workdir, 'sweep.json')
  sweep = read_json(
    path, 'run `sweep.py run` (or `commands`) with the sweep\'s arguments to write it again'
  )
  if sweep is None:
    raise FileNotFoundError(f'{path} not found: is {workdir!r} the --workdir of a sweep?')
  swept = list(sweep['swept'])
  check_collect_options(metric, x, swept)
  status = _Status(workdir).data
  rows = []
  for p in sweep['points']:
    pdir = storage.join(workdir, p['name'])
    row = {'point': p['name'], 'status': point_status(pdir)}
    recorded = status.get(p['name'], {}).get('status')
    if recorded == 'conflict' or (recorded == 'failed' and row['status'] != 'finished'):
      row['status'] = recorded
    cfg = (read_json(storage.join(pdir, 'config.json'), _CONFIG_FIX) or {}).get('config', {})
    for k in swept:  # the value the run actually used, else the declared one
      used = p['config'] if k == 'config' else config_lib.lookup(cfg, k)
      row[k] = used if used is not None else p['overrides'].get(k)
    final = final_metrics(pdir) or {}
    for m in METRICS:  # a conflicting directory holds another experiment's numbers
      row[m] = None if row['status'] == 'conflict' else final.get(m)
    row['paper_top1'] = (p.get('paper_top1') or 0.0) / 100 or None
    rows.append(row)
  if descending is None:
    descending = 'loss' not in metric
  rows.sort(
    key=lambda r: (
      r.get(metric) is None,
      -(r.get(metric) or 0) if descending else (r.get(metric) or 0),
    )
  )
  metrics = [m for m in METRICS if m != 'paper_top1' or any(r[m] for r in rows)]
  columns = ['point', 'status', *swept, *metrics]
  with storage.open_file(
    storage.join(workdir, 'results.csv'), 'w', newline='', encoding='utf-8'
  ) as f:
    w = csv.DictWriter(f, columns)
    w.writeheader()
    for r in rows:
      w.writerow({c: _cell(r.get(c), c) for c in columns})
  with storage.open_file(storage.join(workdir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(markdown_table(rows, columns))
  _plot(rows, swept, metric, x or (swept[0] if swept else ''), storage.join(workdir, 'results.png'))
  return rows


def _cell(v, column: str = ''):
  if isinstance(v, float):
    return f'{v:.1f}' if column == 'wall_time_s' or abs(v) >= 1000 else f'{v:.4f}'
  if isinstance(v, (list, tuple)):
    return str(tuple(v))
  return '' if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(_cell(r.get(c), c) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def _plot(rows, swept, metric, x, path):
  """`metric` against `x`, a line per combination of the other swept fields;
  the paper's numbers (where declared) as hollow markers of the same colour."""
  matplotlib = extras.require(
    'matplotlib', extra='plots', package='matplotlib', needed_for='the sweep plot'
  )
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  done = [r for r in rows if r.get(metric) is not None]
  fig, ax = plt.subplots(figsize=(6, 4))
  if x and done:
    others = [k for k in swept if k != x]
    groups: dict[tuple, list[dict]] = {}
    for r in done:
      groups.setdefault(tuple(_cell(r[k]) for k in others), []).append(r)
    numeric = all(isinstance(r[x], (int, float)) and not isinstance(r[x], bool) for r in done)
    cats = sorted({_cell(r[x]) for r in done})
    pos = (lambda r: r[x]) if numeric else (lambda r: cats.index(_cell(r[x])))
    for key, rs in sorted(groups.items()):
      label = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in zip(others, key)) or metric
      rs = sorted(rs, key=pos)
      (line,) = ax.plot(
        [pos(r) for r in rs], [r[metric] for r in rs], 'o-' if numeric else 'o', label=label
      )
      paper = [r for r in rs if metric == 'test_top1' and r.get('paper_top1')]
      if paper:
        ax.plot(
          [pos(r) for r in paper],
          [r['paper_top1'] for r in paper],
          'o--',
          mfc='none',
          color=line.get_color(),
          label=f'{label} (paper)',
        )
    if not numeric:
      ax.set_xticks(range(len(cats)), cats, rotation=30, ha='right')
    elif all(isinstance(r[x], int) for r in done):
      ax.set_xticks(sorted({r[x] for r in done}))
    ax.set_xlabel(x)
    if len(ax.get_lines()) > 1:
      ax.legend(fontsize=7)
  ax.set_ylabel(metric)
  ax.set_title(f'{metric} ({len(done)} of {len(rows)} points finished)')
  fig.tight_layout()
  if storage.is_remote(path):  # drawn in memory, uploaded whole
    import io  # pylint: disable=import-outside-toplevel

    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format='png')
    storage.write_bytes(path, buf.getvalue())
  else:
    fig.savefig(path, dpi=120)
  plt.close(fig)
