"""The persistent compilation cache of a run (config.compile_cache_dir)."""

import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest

from spikeformer_jax import compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cache_set_up():
  """jax_compilation_cache_dir unset (the tests set one up) while a test
  reads the rule; restored after. Nothing compiles meanwhile."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    yield
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


def _config(value=None):
  c = ml_collections.ConfigDict({'seed': 0})
  if value is not None:
    c.compile_cache_dir = value
  return c


def test_the_default_is_the_workdir_on_accelerators_and_none_on_cpu(no_cache_set_up):
  for platform in ('tpu', 'gpu'):
    assert compile_cache.directory(_config(''), '/runs/a', platform) == '/runs/a/compile_cache'
    # Runs saved before the field: the same default.
    assert compile_cache.directory(_config(), '/runs/a', platform) == '/runs/a/compile_cache'
  assert compile_cache.directory(_config(''), 'gs://b/run', 'tpu') == 'gs://b/run/compile_cache'
  assert compile_cache.directory(_config(''), '/runs/a', 'cpu') is None
  for off in ('none', 'off', 'None'):
    assert compile_cache.directory(_config(off), '/runs/a', 'tpu') is None
  # An explicit directory holds on every platform.
  assert compile_cache.directory(_config('/c'), '/runs/a', 'cpu') == '/c'
  assert compile_cache.directory(_config('gs://b/c'), '/runs/a', 'gpu') == 'gs://b/c'
  assert compile_cache.directory(_config('rel'), '/runs/a', 'cpu') == os.path.abspath('rel')


def test_a_cache_set_up_before_is_kept_unless_the_config_names_one():
  assert jax.config.jax_compilation_cache_dir  # tests/conftest.py's
  assert compile_cache.directory(_config(''), '/runs/a', 'tpu') is None
  assert compile_cache.directory(_config('/c'), '/runs/a', 'tpu') == '/c'


def _cache_entries(path: pathlib.Path) -> set:
  return {p.name for p in path.glob('*-cache')}


@pytest.mark.slow
def test_a_second_run_compiles_nothing(tmp_path):
  """Two runs of the same tiny training on one cache (an explicit
  compile_cache_dir: on CPU it is off by default, and it replaces the tests'
  own cache): the second finds every program there."""
  cache = tmp_path / 'cache'
  cmd = [
    sys.executable,
    'train.py',
    '--config.total_steps=2',
    '--config.tensorboard=False',
    '--config.model.T=1',
    '--config.model.depth=1',
    '--config.model.embed_dim=16',
    '--config.model.num_heads=1',
    '--config.batch_size=8',
    f'--config.compile_cache_dir={cache}',
  ]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1')

  def run(name, *flags):
    p = subprocess.run(
      [*cmd, f'--workdir={tmp_path / name}', *flags],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p

  first = run('first')
  assert f'compilation cache: {cache} (config.compile_cache_dir)' in first.stdout
  entries = _cache_entries(cache)
  assert len(entries) >= 2, entries  # at least the train and eval steps
  second = run('second', '--jax_explain_cache_misses', '--jax_log_compiles')
  assert 'PERSISTENT COMPILATION CACHE MISS' not in second.stderr, second.stderr[-3000:]
  assert second.stderr.count('Persistent compilation cache hit') >= len(entries)
  assert _cache_entries(cache) == entries
