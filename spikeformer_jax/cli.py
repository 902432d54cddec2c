"""Command-line helpers of train.py and eval.py: a mistake in a flag is one line.

A mistyped `--config.model.TT=3` or a value of the wrong type otherwise ends in
a 50-line traceback from ml_collections. Here every error of the command line
(an unknown flag or config field, a value that does not parse, a missing
required flag, a config file that does not load) prints one line,
`error: ...`, and exits with status 2 (`USAGE_EXIT`, argparse's status for a
usage error). Errors the tools find later, in the config's values or the data,
exit with status 1 through `errors.report`: a user error as one line, a bug
with its traceback (`--traceback`, defined here for every tool, shows it
always).

  _CONFIG = cli.define_config_file('config', 'configs/spikformer.py:digits', 'Config file.')
  ...
  if __name__ == '__main__':
    cli.run(main)
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from spikeformer_jax import errors

USAGE_EXIT = 2
_DEFAULTS: dict[str, str | None] = {}  # config flag name -> its default 'path.py[:arg]'

# What ml_collections raises for a field that does not exist (KeyError,
# AttributeError) or a value it cannot set (TypeError, ValueError); absl
# raises flags.Error for the rest. (A config file that cannot be read is
# kept as an error object until used: see parse_flags.)
_PARSE_ERRORS = (flags.Error, KeyError, AttributeError, TypeError, ValueError)


TRACEBACK = flags.DEFINE_bool(
  'traceback',
  False,
  'Print the traceback of every error, also of the one-line ones (bugs always print theirs).',
)


def exit_usage(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USAGE_EXIT)


def define_config_file(name: str, default: str | None, help_string: str):
  """config_flags.DEFINE_config_file, locked so that mistyped fields fail.

  Without `--<name>=` on the command line, ml_collections loads the default
  config and looks up its overrides while the flag is defined, at import and
  before app.run: a mistake there is reported (and exits) here.
  """
  _DEFAULTS[name] = default
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except _PARSE_ERRORS as e:
    exit_usage(describe(e, sys.argv, name, default))


PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def config_file(spec: str | None) -> str | None:
  """A config file argument (`path.py[:VARIANT]`) as given, or, when it names
  `configs/<family>.py` and no such file is in the current directory (an
  installed package run from elsewhere), the packaged config of that family."""
  if not spec:
    return spec
  path, colon, arg = spec.partition(':')
  head, name = os.path.split(os.path.normpath(path))
  if (
    head == 'configs'
    and not os.path.exists(path)
    and os.path.exists(os.path.join(PACKAGED_CONFIGS, name))
  ):
    return os.path.join(PACKAGED_CONFIGS, name) + colon + arg
  return spec


def _packaged_config_args(argv: list[str], config_names) -> list[str]:
  """argv with `--<name>=configs/x.py[:VARIANT]` (or `--<name> configs/x.py`)
  resolved through `config_file`."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    for name in config_names:
      if arg.startswith(f'--{name}='):
        argv[i] = f'--{name}={config_file(arg.split("=", 1)[1])}'
      elif arg == f'--{name}' and i + 1 < len(argv):
        argv[i + 1] = config_file(argv[i + 1]) or argv[i + 1]
  return argv


def parse_flags(argv: list[str], config_names=('config',)) -> list[str]:
  """app.run's flags_parser: parses `argv` or exits with one line."""
  argv = _packaged_config_args(argv, config_names)
  try:
    rest = flags.FLAGS(argv)
  except _PARSE_ERRORS as e:
    exit_usage(
      describe(e, argv, config_names[0], _DEFAULTS.get(config_names[0]))
      if config_names
      else _last_line(e)
    )
  for name in config_names:  # a file that fails to load is kept as an error until used
    value = flags.FLAGS[name].value if name in flags.FLAGS else None
    if value is not None:
      try:
        _ = value.keys  # loads the file, or raises its error
      except OSError as e:
        exit_usage(f'--{name}={flags.FLAGS[name].serialize().split("=", 1)[-1]}: {_last_line(e)}')
  return rest


def reporting(main):
  """`main` returning `errors.report`'s exit status for what it raises."""

  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except  # KeyboardInterrupt: the tool's
      return errors.report(e, traceback=TRACEBACK.value)

  return guarded


def run(main, config_names=('config',), jax_flags: bool = True):
  """app.run(main) with command-line mistakes as one line and exit status 2,
  and what `main` raises through `errors.report`. JAX's own options are flags
  too (`--jax_log_compiles`, `--jax_platforms=cpu`,
  `--jax_default_matmul_precision=highest`, ...), as in big_vision / MaxText;
  `jax_flags=False` for tools that pass them on as environment variables
  (`jax_flags_to_env`)."""
  if jax_flags:
    import jax  # pylint: disable=import-outside-toplevel

    jax.config.config_with_absl()  # applied once app.run has parsed the command line
  app.run(reporting(main), flags_parser=lambda argv: parse_flags(argv, config_names))


def call(main, argv: list[str], config_names=()) -> int:
  """`main` run on the command line `argv` (argv[0]: the program) in this
  process, as `run` would, returning its exit status (tests). Flags not in
  `argv` are at their defaults, whatever an earlier call set."""
  flags.FLAGS.unparse_flags()
  try:
    rest = parse_flags(argv, config_names)
    return reporting(main)(rest)
  except SystemExit as e:  # a command-line mistake (exit_usage)
    return e.code if isinstance(e.code, int) else int(e.code is not None)


def jax_flags_to_env(argv: list[str]) -> list[str]:
  """`argv` without its `--jax_*` flags, which become JAX_* environment
  variables (JAX reads them when it starts; subprocesses inherit them): for
  tools whose work runs in subprocesses (sweep.py's points)."""
  rest = []
  for arg in argv:
    m = re.fullmatch(r'--(no)?(jax_\w+)(?:=(.*))?', arg)
    if m is None:
      rest.append(arg)
      continue
    no, name, value = m.groups()
    os.environ[name.upper()] = 'false' if no else ('true' if value is None else value)
  return rest


def _last_line(e: BaseException) -> str:
  """The line that says what went wrong: the last of a nested traceback or of
  a list of attempted paths, without its exception name."""
  msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError quotes its str
  lines = [line.strip() for line in str(msg).splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  return re.sub(r'^[\w.]+(Error|Exception): ', '', lines[-1])


def describe(e: BaseException, argv: list[str], name: str, default: str | None) -> str:
  """One line for an error of parsing `argv`: for an unknown config field, the
  field and the nearest existing one; for a value that does not parse, the
  field's type."""
  config = _load(argv, name, default)
  unknown = _unknown_field(config, argv, name)
  if unknown:
    return unknown
  msg = str(e).strip()
  first = msg.splitlines()[0] if msg else ''
  m = re.match(rf"Unknown command line flag '((?:no)?{re.escape(name)}\.[^']*)'", first)
  if m and config is None:  # overrides of a config flag that has no value (eval.py)
    return (
      f'--{m.group(1)} overrides a field of --{name}, which is not given; add '
      f'--{name}=path.py[:VARIANT].'
    )
  if not first.startswith('flag --'):
    return _last_line(e) if isinstance(e, KeyError) or '\n' in msg else errors.one_line(e)
  first = first[len('flag ') :]  # absl: 'flag --config.model.T=abc: invalid literal ...'
  if '\n' in msg:  # 'flag --config=X: Error whilst parsing config file: <traceback>'
    return f'{first.split(": ", 1)[0]}: {_last_line(e)}'
  m = re.match(rf'--{re.escape(name)}\.([\w.]+)=', first)
  field = m.group(1) if m else ''
  current = _lookup(config, field) if field and config is not None else None
  if current is not None:
    return (
      f'{errors.one_line(first)}; {field} takes {type(current).__name__} values (now {current!r}).'
    )
  return errors.one_line(first)


def _config_path(argv, name, default):
  """The value of the last --<name>= in argv, else the default."""
  path = default
  for i, arg in enumerate(argv):
    m = re.match(rf'^--?{re.escape(name)}(=(.*))?$', arg)
    if m:
      path = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return path


def _load(argv, name, default):
  """The config named on the command line (or the default), or None if it
  does not load (its own error then says why)."""
  path = _config_path(argv, name, default)
  if not isinstance(path, str) or not path:
    return None
  file, *arg = path.split(':', 1)
  try:
    spec = importlib.util.spec_from_file_location(f'_cli_{name}_config', file)
    if spec is None or spec.loader is None:
      return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*arg)
    config.keys()
  except Exception:  # pylint: disable=broad-except
    return None
  return config


def _lookup(config, field):
  node = config
  for key in field.split('.'):
    if not hasattr(node, 'keys') or key not in node.keys():
      return None
    node = node[key]
  return node


def _unknown_field(config, argv, name) -> str | None:
  """'--config.model.TT: model has no field 'TT'; did you mean model.T?' for
  the first override in argv that names no field of the config, else None."""
  if config is None:
    return None
  for arg in argv[1:]:
    m = re.match(rf'^--?(?:no)?{re.escape(name)}\.([^=]+)', arg)
    if not m:
      continue
    node, where = config, list[str]()
    for key in m.group(1).split('.'):
      if '[' in key or not hasattr(node, 'keys'):
        break  # indexing into sequences: left to ml_collections
      keys = [str(k) for k in node.keys()]
      if key not in keys:
        close = difflib.get_close_matches(key, keys, 1, 0.6)
        hint = (
          f'did you mean {".".join(where + close)}?'
          if close
          else f'its fields: {", ".join(sorted(keys))}.'
        )
        return (
          f'--{name}.{m.group(1)}: {".".join(where) or "the config"} has no field {key!r}; {hint}'
        )
      node = node[key]
      where.append(key)
  return None
