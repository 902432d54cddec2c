"""JAX's persistent compilation cache for a run (`config.compile_cache_dir`).

A restarted pod job otherwise recompiles its train and eval steps, minutes on
a large mesh. The rule:

  ''            (default) <workdir>/compile_cache on TPU and GPU, none on CPU
                (seconds to compile there). A cache the user already set up
                (JAX_COMPILATION_CACHE_DIR, jax.config) is left as it is.
  'none', 'off' no persistent cache for this run, whatever was set up.
  a path        that directory (local or gs://, which JAX reaches through
                etils.epath), even over one set up before.

Every program goes in once the cache is ours (no minimum compile time or
size): a step compiles in seconds on CPU and small programs add up.
"""

from __future__ import annotations

import os

import jax

OFF = ('none', 'off')


def _setting(name: str):
  """A JAX option's value (jax.config's attributes, which its type does not declare)."""
  return getattr(jax.config, name)


def _absolute(path: str) -> str:
  return path if '://' in path else os.path.abspath(path)


def directory(config, workdir: str, platform: str | None = None) -> str | None:
  """The cache directory `config.compile_cache_dir` asks of this run, or
  None: no cache of ours (none at all, or the one already set up)."""
  value = str(config.get('compile_cache_dir', '') or '')  # .get: runs saved before the field
  if value.lower() in OFF:
    return None
  if value:
    return _absolute(value)
  if _setting('jax_compilation_cache_dir'):  # the user's (or the tests'): kept
    return None
  if (platform or jax.default_backend()) == 'cpu':
    return None
  return _absolute(os.path.join(str(workdir), 'compile_cache'))


def setup(config, workdir: str, log=None) -> str | None:
  """Points JAX's persistent compilation cache where `config` asks, before
  the run's first compile; returns the directory that is ours, if any.

  The settings are the process's: an explicit directory (or 'none') also
  holds for what this process compiles afterwards."""
  value = str(config.get('compile_cache_dir', '') or '')
  if value.lower() in OFF:
    if _setting('jax_enable_compilation_cache'):
      jax.config.update('jax_enable_compilation_cache', False)
      _reset()
    return None
  path = directory(config, workdir)
  if path is None:
    return None
  if _setting('jax_compilation_cache_dir') != path or not _setting('jax_enable_compilation_cache'):
    jax.config.update('jax_enable_compilation_cache', True)
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
    _reset()
  if log is not None:
    log(f'compilation cache: {path} (config.compile_cache_dir)')
  return path


def _reset():
  """JAX reads the cache settings once, at a process's first compile: an
  earlier compile (a library caller, a test) would keep the old ones."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel

  compilation_cache.reset_cache()
