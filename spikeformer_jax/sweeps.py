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
is recorded in WORKDIR/status.json and the sweep goes on. `run_slurm` does
the same through SLURM: the points as one job array, a task each
(`run_task`), tracked with squeue and each task's own record. `collect` reads
every point's config and final metrics into a table (CSV, markdown) and a
plot.
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
import queue
import re
import shutil
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


# --------------------------------------------------------------------------
# Devices of local points: `--parallel` on a host with GPUs or TPU chips.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Devices:
  """A host's accelerators, found without starting JAX (which would hold them)."""

  kind: str  # 'GPU' | 'TPU'
  ids: tuple[str, ...]  # as CUDA_VISIBLE_DEVICES / TPU_VISIBLE_CHIPS name them
  source: str  # where they were found (for the log line)


# TPU chips on the PCI bus (Google's vendor id): those whose chips are one
# device each and take the chip-bound variables below (v4, v5p, v5e, v6e).
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = {'0x005e': 'v4', '0x0062': 'v5p', '0x0063': 'v5e', '0x006f': 'v6e'}
# Chips one process may take on a host, as libtpu's TPU_CHIPS_PER_PROCESS_BOUNDS
# (x,y,z: a 2x2 block of a v4 / v5p host, 2x4 of a v5e / v6e host).
_TPU_CHIP_BOUNDS = {1: '1,1,1', 2: '1,2,1', 4: '2,2,1', 8: '2,4,1'}
TPU_FIRST_PORT = 8476  # libtpu's default TPU_PROCESS_PORT; slot i takes this + i


def _platform_allowed(environ, *names: str) -> bool:
  """JAX_PLATFORMS (or --jax_platforms) leaves JAX free to use one of `names`."""
  platforms = environ.get('JAX_PLATFORMS', '')
  return not platforms or any(n in platforms.split(',') for n in names)


def local_devices(environ=None, root: str = '/') -> Devices | None:
  """This host's GPUs (CUDA_VISIBLE_DEVICES's list where it is set, else
  /proc/driver/nvidia/gpus, else `nvidia-smi -L`), else its TPU chips
  (TPU_VISIBLE_CHIPS's list, else the PCI bus, as JAX counts them); None on
  a CPU host or where JAX_PLATFORMS rules them out."""
  environ = os.environ if environ is None else environ
  if _platform_allowed(environ, 'cuda', 'gpu'):
    visible = environ.get('CUDA_VISIBLE_DEVICES')
    if visible is not None:  # '' or -1: no GPU
      ids = tuple(i.strip() for i in visible.split(',') if i.strip())
      ids = ids[: ids.index('-1')] if '-1' in ids else ids  # CUDA stops at an invalid id
      if ids:
        return Devices('GPU', ids, 'CUDA_VISIBLE_DEVICES')
    else:
      proc = os.path.join(root, 'proc', 'driver', 'nvidia', 'gpus')
      n = len(os.listdir(proc)) if os.path.isdir(proc) else 0
      source = '/proc/driver/nvidia/gpus'
      if not n and root == '/' and shutil.which('nvidia-smi'):
        try:
          out = subprocess.run(
            ['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30, check=False
          ).stdout
        except (OSError, subprocess.TimeoutExpired):
          out = ''
        n, source = sum(line.startswith('GPU ') for line in out.splitlines()), 'nvidia-smi -L'
      if n:
        return Devices('GPU', tuple(str(i) for i in range(n)), source)
  if _platform_allowed(environ, 'tpu'):
    visible = environ.get('TPU_VISIBLE_CHIPS')
    if visible:
      return Devices('TPU', tuple(i.strip() for i in visible.split(',')), 'TPU_VISIBLE_CHIPS')
    pci = os.path.join(root, 'sys', 'bus', 'pci', 'devices')
    n = 0
    for dev in sorted(os.listdir(pci)) if os.path.isdir(pci) else ():
      try:
        with open(os.path.join(pci, dev, 'vendor'), encoding='ascii') as f:
          vendor = f.read().strip()
        with open(os.path.join(pci, dev, 'device'), encoding='ascii') as f:
          device = f.read().strip()
      except OSError:
        continue
      n += vendor == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICES
    if n:
      return Devices('TPU', tuple(str(i) for i in range(n)), 'the PCI bus')
  return None


def placement(devices: Devices | None, parallel: int) -> tuple[list[dict], str]:
  """The environment of each of `parallel` points trained at once, so that
  each has devices of its own, and the line that says so; ([], '') on a CPU
  host (nothing changes), ([], line) where there are too few devices (every
  point sees them all, as before).

  GPUs: CUDA_VISIBLE_DEVICES, len(ids) // parallel each. TPU chips: libtpu's
  variables for independent processes on one host (TPU_VISIBLE_CHIPS, a
  block of 1, 2, 4 or 8 chips as TPU_CHIPS_PER_PROCESS_BOUNDS, a process grid
  of one, its own TPU_PROCESS_PORT, ALLOW_MULTIPLE_LIBTPU_LOAD)."""
  if devices is None or parallel < 2:
    return [], ''
  n, kind = len(devices.ids), devices.kind
  each = n // parallel
  if kind == 'TPU':  # a block libtpu can take: the largest that fits
    each = max((k for k in _TPU_CHIP_BOUNDS if k <= each), default=0)
  what = ('GPU' if kind == 'GPU' else 'TPU chip') + ('s' if n > 1 else '')
  head = f'[devices] {n} {what} ({devices.source}), --parallel={parallel}'
  if each == 0:
    return [], (
      f'{head}: too few for one each; every point sees all {n} (--parallel={n} or less '
      'gives each point its own)'
    )
  envs = []
  for i in range(parallel):
    ids = ','.join(devices.ids[i * each : (i + 1) * each])
    if kind == 'GPU':
      envs.append({'CUDA_VISIBLE_DEVICES': ids})
    else:
      port = TPU_FIRST_PORT + i
      envs.append(
        {
          'TPU_VISIBLE_CHIPS': ids,
          'TPU_CHIPS_PER_PROCESS_BOUNDS': _TPU_CHIP_BOUNDS[each],
          'TPU_PROCESS_BOUNDS': '1,1,1',
          'TPU_PROCESS_PORT': str(port),
          'TPU_PROCESS_ADDRESSES': f'localhost:{port}',
          'CLOUD_TPU_TASK_ID': '0',
          'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',  # libtpu's lock file admits one process a host
        }
      )
  var = 'CUDA_VISIBLE_DEVICES' if kind == 'GPU' else 'TPU_VISIBLE_CHIPS'
  unused = n - each * parallel
  return envs, (
    f'{head}: each point runs on {each} of its own ({var}='
    + ' | '.join(e[var] for e in envs)
    + (f'; {unused} unused' if unused else '')
    + ')'
  )


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

  def set(self, name: str, drop: tuple[str, ...] = (), **fields):
    """Updates point `name`'s record with `fields`, without the `drop` fields."""
    with self.lock:
      try:  # keep what another `run` on this sweep wrote
        self.data = {**self.data, **(read_json(self.path, self._FIX) or {})}
      except errors.UserError:
        pass  # damaged meanwhile: what this run knows replaces it
      old = {k: v for k, v in self.data.get(name, {}).items() if k not in drop}
      self.data[name] = {**old, **fields}
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


def _prepare(
  config_path: str, sweep: str, workdir: str, common: dict | None, runlocal: bool, log
) -> tuple[list[Point], _Status, list[tuple[Point, str]]]:
  """The sweep's points (validated), its status record, and the points to
  train with their state (new | interrupted | failed, ...): finished points
  are recorded and skipped, a point directory of another config is recorded
  as a conflict, never trained into."""
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
  return points, status, todo


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

  With `parallel` > 1 on a host with GPUs or TPU chips, each point gets its
  own devices when there are enough (`placement`), and a line says so.

  SIGTERM, SIGINT (Ctrl-C) or SIGHUP (a closed terminal) starts no new point
  and is passed on to the running ones, which save their step and are
  recorded (preempted / interrupted: a rerun resumes them); then
  errors.Stopped propagates, with exit code 143 / 130 / 129 as train.py's. A
  second signal is passed on too: a second Ctrl-C stops the points at once,
  as in train.py, where a second SIGTERM or SIGHUP lets the save go on.
  """
  config_path, workdir = os.path.abspath(config_path), storage.abspath(workdir)
  points, status, todo = _prepare(config_path, sweep, workdir, common, runlocal, log)
  # Each worker thread takes a slot's devices for its point and gives them back.
  slots: queue.SimpleQueue[dict] = queue.SimpleQueue()
  if parallel > 1 and todo:
    envs, line = placement(local_devices(), parallel)
    if line:
      log(line)
    for e in envs:
      slots.put(e)
  placed = not slots.empty()
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
    devices = slots.get() if placed else {}  # never waits: a slot per worker
    try:
      with lock:  # a signal either stops this start or reaches the process
        if stop.is_set():
          return
        storage.makedirs(pdir)
        proc = _start_point(
          config_path,
          sweep,
          p.name,
          pdir,
          common,
          runlocal,
          {**os.environ, **(env or {}), **devices},
        )
        running[p.name] = proc
      log(f'[{"resume" if st == "interrupted" else "start"}] {p.name}')
      status.set(p.name, drop=('job',), status='running', started=time.time())
      t0 = time.time()
      try:
        tail = _tee(proc, storage.join(pdir, 'sweep.log'))
      finally:
        with lock:
          running.pop(p.name, None)
    finally:
      if placed:
        slots.put(devices)
    fields = _ended(pdir, proc.returncode, tail, round(time.time() - t0, 1))
    announce()
    status.set(p.name, **fields)
    log(_ended_line(p.name, fields))

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


def _ended(point_dir: str, returncode: int, output: str, seconds: float) -> dict:
  """How a point's process ended, as its status fields: finished only if it
  exited 0 with its final metrics written; else stopped / busy / failed by
  its exit status, with the end of its output (`error`); `log` names its
  sweep.log."""
  log = storage.join(point_dir, 'sweep.log')
  if returncode == 0 and _status_or_damaged(point_dir) == 'finished':
    return {'status': 'finished', 'seconds': seconds, 'error': '', 'log': log}
  ended = _ENDED.get(returncode, 'failed')
  tail = output.strip()
  return {
    'status': ended,
    'seconds': seconds,
    'returncode': returncode,
    'error': tail,
    'log': log,
  }


def _ended_line(name: str, fields: dict) -> str:
  """The line `run` logs for a point that ended (`_ended`'s fields)."""
  if fields['status'] == 'finished':
    return f'[done] {name}' + (f' ({fields["seconds"]} s)' if 'seconds' in fields else '')
  if 'returncode' not in fields:  # no process of its own ended (a SLURM task that left no record)
    return f'[{fields["status"].upper()}] {name}: {fields["error"]}'
  rc = fields['returncode']
  lines = fields['error'].splitlines() or ['']
  why = next((line for line in reversed(lines) if line.startswith('error:')), lines[-1])
  how = f'exit {rc}' if rc >= 0 else f'killed by {signal.Signals(-rc).name}'
  return f'[{fields["status"].upper()}] {name} ({how}): {why}'


def _start_point(
  config_path: str,
  sweep: str,
  point: str,
  pdir: str,
  common: dict | None,
  runlocal: bool,
  env: dict | None = None,
) -> subprocess.Popen:
  """The process that trains one point (the local runner's and a SLURM array
  task's), its output piped. Its own session: the terminal's Ctrl-C reaches
  the runner only, which passes it on once (twice would mean "stop now, do
  not save")."""
  return subprocess.Popen(
    point_command(config_path, sweep, point, pdir, common, runlocal),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    errors='replace',
    cwd=_ROOT,
    start_new_session=True,
    env=env,
  )


def _tee(proc: subprocess.Popen, log_path: str) -> str:
  """Copies `proc`'s output into the point's log as it comes, until it exits;
  returns its own last 15 lines (another process, one that holds the point's
  directory, may append to the same log meanwhile)."""
  own: collections.deque[str] = collections.deque(maxlen=15)
  with _PointLog(log_path) as out, proc:
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
      out.write(line)
      out.flush()
      own.append(line)
  return ''.join(own)


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
# SLURM: the unfinished points as one job array (`run --launcher=slurm`).
# --------------------------------------------------------------------------

# A point's own record of how its array task ended, in its directory: written
# by the task (`run_task`), which may end while no `run` waits for it; read by
# `run` and `collect`.
TASK_RECORD = 'sweep_task.json'
# A point's states in SLURM (in status.json, with `job`: the task, JOBID_INDEX).
IN_SLURM = ('queued', 'running')
# squeue polls while `run` waits: the first after 0.5 s, then slower, up to this.
POLL_MAX_S = 30.0
_SQUEUE_TRIES = 5  # failed squeue calls in a row before `run` gives up waiting
# sbatch's time formats: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS,
# DAYS-HOURS, DAYS-HOURS:MINUTES, DAYS-HOURS:MINUTES:SECONDS; no limit.
_SLURM_TIME = re.compile(r'\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|unlimited|infinite', re.IGNORECASE)
# sbatch options the sweep sets itself: one task per point, where its output goes.
_OWN_SBATCH = {
  '--array': 'one array task per unfinished point',
  '-a': 'one array task per unfinished point',
  '--ntasks': 'one task per point',
  '-n': 'one task per point',
  '--output': "a point's output goes to its sweep.log",
  '-o': "a point's output goes to its sweep.log",
  '--error': "a point's output goes to its sweep.log",
  '-e': "a point's output goes to its sweep.log",
  '--wrap': 'the script runs the points',
  '--parsable': 'it reads the job id',
}


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  """What each point's array task asks SLURM for (sweep.py's --slurm_* flags)."""

  partition: str = ''  # '' = the cluster's default partition
  time: str = ''  # sbatch --time of each point; '' = the partition's default
  gpus_per_point: int = 0  # --gres=gpu:N
  cpus_per_point: int = 0  # --cpus-per-task; 0 = the cluster's default
  sbatch: tuple[str, ...] = ()  # extra sbatch options: an '#SBATCH' line each
  at_once: int = 0  # at most this many points running at once (--array=...%N); 0 = no limit

  def check(self):
    """Each mistake in one line, before anything is submitted."""
    if self.partition and not re.fullmatch(r'[\w.-]+(,[\w.-]+)*', self.partition):
      raise errors.ConfigError(
        f'--slurm_partition={self.partition!r} is not a partition name (or a comma-separated '
        'list of them); `sinfo -s` lists the partitions.'
      )
    if self.time and not _SLURM_TIME.fullmatch(self.time):
      raise errors.ConfigError(
        f"--slurm_time={self.time!r} is not a SLURM time limit; use MINUTES, HOURS:MINUTES:SECONDS "
        'or DAYS-HOURS:MINUTES:SECONDS (e.g. 90, 4:00:00, 2-00:00:00).'
      )
    for name, default in (('gpus_per_point', 'none'), ('cpus_per_point', "the cluster's default")):
      value = getattr(self, name)
      if value < 0:
        raise errors.ConfigError(f'--slurm_{name}={value}: give a number >= 0 (0: {default}).')
    for line in self.sbatch:
      option = _sbatch_option(line)
      if not option.startswith('-') or '\n' in option or len(option) < 2:
        raise errors.ConfigError(
          f'--slurm_sbatch={line!r} is not an sbatch option; give one per flag, e.g. '
          '--slurm_sbatch=--mem=32G --slurm_sbatch=--qos=high.'
        )
      key = re.split(r'[=\s]', option, maxsplit=1)[0]
      if key in _OWN_SBATCH:
        raise errors.ConfigError(
          f'--slurm_sbatch={line!r}: the sweep sets {key} itself ({_OWN_SBATCH[key]}); '
          'leave it out.'
        )


def _sbatch_option(line: str) -> str:
  line = line.strip()
  return line[len('#SBATCH') :].strip() if line.startswith('#SBATCH') else line


def need_slurm():
  """A UserError naming the fix where SLURM's client commands are missing."""
  missing = [c for c in ('sbatch', 'squeue') if shutil.which(c) is None]
  if missing:
    raise errors.UserError(
      f'--launcher=slurm: {" and ".join(missing)} not found on PATH; run on a machine that '
      "submits SLURM jobs (a login node) or add SLURM's bin directory to PATH, or use "
      '--launcher=local.'
    )


def _quote(s: str) -> str:
  return "'" + s.replace("'", "'\\''") + "'"


def slurm_script(
  config_path: str,
  sweep: str,
  workdir: str,
  names: list[str],
  options: SlurmOptions,
  output: str,
  common: dict | None = None,
  runlocal: bool = False,
) -> str:
  """The sbatch script of a job array: task i trains point names[i] as the
  local runner would (`sweep.py task`: the same train.py command, its output
  into the point's sweep.log, how it ended into its TASK_RECORD)."""
  at_once = f'%{options.at_once}' if options.at_once else ''
  lines = [
    '#!/bin/bash',
    f'# Sweep {sweep} of {config_path}: {len(names)} points, array task i trains POINTS[i]',
    '# (written by `sweep.py run --launcher=slurm`; each point\'s output is in',
    f'# {workdir}/<point>/sweep.log, this script\'s own in --output).',
    f'#SBATCH --job-name=sweep-{re.sub(r"[^A-Za-z0-9._-]", "_", sweep)}',
    f'#SBATCH --array=0-{len(names) - 1}{at_once}',
    '#SBATCH --ntasks=1',
    f'#SBATCH --output={output}',
    '#SBATCH --open-mode=append',
  ]
  if options.partition:
    lines.append(f'#SBATCH --partition={options.partition}')
  if options.time:
    lines.append(f'#SBATCH --time={options.time}')
  if options.gpus_per_point:
    lines.append(f'#SBATCH --gres=gpu:{options.gpus_per_point}')
  if options.cpus_per_point:
    lines.append(f'#SBATCH --cpus-per-task={options.cpus_per_point}')
  lines += [f'#SBATCH {_sbatch_option(line)}' for line in options.sbatch]
  task = [
    sys.executable,
    '-m',
    'spikeformer_jax.sweep',
    'task',
    f'--config={os.path.abspath(config_path)}',
    f'--sweep={sweep}',
    f'--workdir={workdir}',
    *(f'--set={k}={json.dumps(v)}' for k, v in (common or {}).items()),
    *(['--runlocal'] if runlocal else []),
  ]
  lines += [
    'POINTS=(',
    *(f'  {_quote(n)}' for n in names),
    ')',
    f'cd {_quote(_ROOT)} || exit 1  # as the local runner: beside the package',
    'exec ' + ' '.join(_quote(a) for a in task) + ' --point="${POINTS[$SLURM_ARRAY_TASK_ID]}"',
  ]
  return '\n'.join(lines) + '\n'


def _submit(script: str, workdir: str, env: dict) -> str:
  """sbatch SCRIPT: the job id; a UserError with sbatch's reason if refused.
  The script is kept as WORKDIR/slurm/JOBID.sbatch (rejected.sbatch if refused)."""
  try:
    proc = subprocess.run(
      ['sbatch', '--parsable'], input=script, capture_output=True, text=True, env=env, timeout=300
    )
  except subprocess.TimeoutExpired:
    proc = subprocess.CompletedProcess([], 1, '', 'error: sbatch did not answer in 300 s')
  if proc.returncode:
    kept = storage.join(workdir, 'slurm', 'rejected.sbatch')
    storage.write_text(kept, script)
    lines = (proc.stderr + proc.stdout).strip().splitlines() or [f'exit {proc.returncode}']
    why = next((line for line in reversed(lines) if 'error' in line), lines[-1])
    why = why.split('error:')[-1].strip().rstrip('.')
    raise errors.UserError(
      f"sbatch refused the sweep's job array: {why}; check the --slurm_* options "
      f'(the script: {kept}).'
    )
  job = proc.stdout.strip().split(';')[0]
  storage.write_text(storage.join(workdir, 'slurm', f'{job}.sbatch'), script)
  return job


def _squeue(jobs: set[str], env: dict) -> dict[str, str]:
  """{JOBID_INDEX: state} of the array tasks of `jobs` that SLURM still
  holds (pending, running, completing); a UserError if squeue fails."""
  try:
    proc = subprocess.run(
      ['squeue', '--noheader', '--array', '--format=%i %T', f'--jobs={",".join(sorted(jobs))}'],
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
    )
  except subprocess.TimeoutExpired:
    raise errors.UserError('squeue did not answer in 120 s') from None
  if proc.returncode:
    if 'Invalid job id' in proc.stderr:  # one job id, forgotten by SLURM: none of its tasks left
      return {}
    raise errors.UserError(f'squeue failed: {proc.stderr.strip() or proc.returncode}')
  return dict(line.split(maxsplit=1) for line in proc.stdout.splitlines() if line.strip())


def _task_record(point_dir: str) -> dict:
  try:
    return read_json(storage.join(point_dir, TASK_RECORD), 'rerun') or {}
  except errors.UserError:  # cut short by a kill while written: no record
    return {}


def _settle(point_dir: str, job: str, states: dict[str, str], output: str) -> dict | None:
  """How the point submitted as SLURM task `job` ended (its status fields),
  or None while SLURM holds the task (`states`, squeue's, read before)."""
  record = _task_record(point_dir)
  if record.get('job') == job and record.get('status') not in (None, 'running'):
    return record  # written before the task ended
  if job in states:
    return None
  log = storage.join(point_dir, 'sweep.log')
  if _status_or_damaged(point_dir) == 'finished':
    return {'status': 'finished', 'job': job, 'error': '', 'log': log}
  return {
    'status': 'failed',
    'job': job,
    'error': (
      f'SLURM task {job} ended without recording how its point ended (cancelled, out of '
      f'time or memory, or its node failed); see {log} and {output.replace("%A_%a", job)}'
    ),
    'log': log,
  }


def run_task(
  config_path: str,
  sweep: str,
  point: str,
  workdir: str,
  common: dict | None = None,
  runlocal: bool = False,
  job: str = '',
) -> int:
  """One point of a sweep, as an array task of `run --launcher=slurm` (`job`:
  JOBID_INDEX) runs it: the local runner's command, its output into the
  point's sweep.log, how it ended into its TASK_RECORD. SIGTERM, SIGINT and
  SIGHUP are passed on (the point saves its step). Returns the exit status:
  0 if the point finished, else the point's."""
  pdir = storage.join(workdir, point)
  storage.makedirs(pdir)
  record, log = storage.join(pdir, TASK_RECORD), storage.join(pdir, 'sweep.log')
  started = time.time()
  storage.write_text(
    record, json.dumps({'status': 'running', 'job': job, 'started': started, 'log': log})
  )
  proc = _start_point(config_path, sweep, point, pdir, common, runlocal)

  def pass_on(signum, _frame):
    try:
      proc.send_signal(signum)
    except ProcessLookupError:
      pass

  previous = {signum: signal.signal(signum, pass_on) for signum in STOP_SIGNALS}
  try:
    tail = _tee(proc, log)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  fields = _ended(pdir, proc.returncode, tail, round(time.time() - started, 1))
  storage.write_text(record, json.dumps({**fields, 'job': job}, indent=1))
  if fields['status'] == 'finished':
    return 0
  return proc.returncode if proc.returncode > 0 else 128 - proc.returncode


class _StopWaiting(Exception):
  pass


def run_slurm(
  config_path: str,
  sweep: str,
  workdir: str,
  *,
  options: SlurmOptions | None = None,
  common: dict | None = None,
  runlocal: bool = False,
  detach: bool = False,
  env: dict | None = None,
  log=print,
) -> dict:
  """Submits the points not finished yet, and not in SLURM already (queued
  or running under an earlier `run`'s job), as one SLURM job array: task i
  trains one point as the local runner would (`slurm_script`). Then, unless
  `detach`, waits for every point in SLURM (squeue, and the points' own
  records), recording each as it ends.

  Returns {point: status}: as `run`'s, plus queued / running (submitted,
  `detach`) and busy (in SLURM under an earlier job, not submitted again).
  status.json records each point's task (`job`) and log. SIGTERM, SIGINT or
  SIGHUP stops the waiting only (errors.Stopped): the points go on in SLURM.
  """
  options = options or SlurmOptions()
  options.check()
  need_slurm()
  config_path, workdir = os.path.abspath(config_path), storage.abspath(workdir)
  points, status, todo = _prepare(config_path, sweep, workdir, common, runlocal, log)
  env = {**os.environ, **(env or {})}
  storage.makedirs(storage.join(workdir, 'slurm'))
  # A task's own output (its errors before the point's log opens): beside the
  # sweep, or, for a sweep in an object store, where `run` was started.
  output = (
    os.path.join(os.getcwd(), 'slurm-%A_%a.out')
    if storage.is_remote(workdir)
    else storage.join(workdir, 'slurm', '%A_%a.out')
  )
  in_slurm: dict[str, str] = {}  # point -> its task, JOBID_INDEX
  busy: dict[str, str] = {}  # those an earlier `run` submitted
  earlier = {
    p.name: status.data[p.name]['job']
    for p, _ in todo
    if status.data.get(p.name, {}).get('status') in IN_SLURM and status.data[p.name].get('job')
  }
  if earlier:
    states = _squeue({j.split('_')[0] for j in earlier.values()}, env)
    for name, job in earlier.items():
      fields = _settle(storage.join(workdir, name), job, states, output)
      if fields is None:
        in_slurm[name] = busy[name] = job
        log(f'[busy] {name}: {states[job].lower()} as SLURM task {job}; not submitted again')
      else:
        status.set(name, **fields)
        log(_ended_line(name, fields))
  submit = [p for p, _ in todo if p.name not in in_slurm]
  if submit:
    script = slurm_script(
      config_path, sweep, workdir, [p.name for p in submit], options, output, common, runlocal
    )
    job = _submit(script, workdir, env)
    log(
      f'[submitted] {len(submit)} point{"s" if len(submit) > 1 else ""} as SLURM job array '
      f'{job} (script: {storage.join(workdir, "slurm", job + ".sbatch")})'
    )
    for i, p in enumerate(submit):
      task = f'{job}_{i}'
      status.set(
        p.name,
        status='queued',
        job=task,
        submitted=time.time(),
        log=storage.join(workdir, p.name, 'sweep.log'),
      )
      in_slurm[p.name] = task
      log(f'[queued] {p.name}: SLURM task {task}')
  names = [p.name for p in points]
  if detach:
    return {n: 'busy' if n in busy else status.data[n]['status'] for n in names}
  _wait(workdir, in_slurm, status, env, output, log)
  return {n: status.data[n]['status'] for n in names}


def _wait(workdir, in_slurm: dict[str, str], status: _Status, env: dict, output: str, log):
  """Waits until SLURM holds none of the points `in_slurm`, recording each as it ends."""
  jobs = sorted({j.split('_')[0] for j in in_slurm.values()})

  def stop(signum, _frame):
    raise _StopWaiting(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for signum in STOP_SIGNALS:
      if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
        previous[signum] = signal.signal(signum, stop)
  delay, failures = 0.5, 0
  seen: dict[str, str] = {}  # squeue's last state of each point
  try:
    while in_slurm:
      try:
        states = _squeue({j.split('_')[0] for j in in_slurm.values()}, env)
      except errors.UserError as e:  # the controller may be restarting: try again
        failures += 1
        if failures >= _SQUEUE_TRIES:
          raise errors.UserError(
            f'{e} ({failures} times in a row); the points go on in SLURM (job '
            f'{", ".join(jobs)}): rerun the same command to wait for them again.'
          ) from None
        time.sleep(delay)
        continue
      failures = 0
      for name, job in list(in_slurm.items()):
        fields = _settle(storage.join(workdir, name), job, states, output)
        if fields is None:
          if states[job] == 'RUNNING' and seen.get(name) != 'RUNNING':
            status.set(name, status='running', started=time.time())
            log(f'[running] {name} (SLURM task {job})')
          seen[name] = states[job]
          continue
        status.set(name, **fields)
        log(_ended_line(name, fields))
        del in_slurm[name]
      if in_slurm:
        time.sleep(delay)
        delay = min(delay * 1.5, POLL_MAX_S)
  except (_StopWaiting, KeyboardInterrupt) as e:
    signum = e.args[0] if isinstance(e, _StopWaiting) else signal.SIGINT
    what, name, code = STOP_SIGNALS[signal.Signals(signum)]
    raise errors.Stopped(
      f'{what} ({name}) while waiting: the points go on in SLURM (job {", ".join(jobs)}); rerun '
      f'the same command to wait for them, `sweep.py collect --workdir={workdir}` for the '
      f'table so far, or `scancel {" ".join(jobs)}` to stop them.',
      code,
    ) from None
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


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
    record = status.get(p['name'], {})
    recorded = record.get('status')
    if recorded in IN_SLURM and record.get('job'):  # submitted: its task may have ended since
      task = _task_record(pdir)
      if task.get('job') == record['job']:
        recorded = task.get('status', recorded)
      if row['status'] != 'finished':  # queued, running, or how its task ended
        row['status'] = recorded
    elif recorded == 'conflict' or (recorded == 'failed' and row['status'] != 'finished'):
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
