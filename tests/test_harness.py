"""The suite's own machinery: the compile cache that its workers share."""

import os
import subprocess
import sys

import conftest

_COMPILE = 'import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64)))'


def test_cache_entries_from_an_unbounded_run_do_not_stop_writes(tmp_path):
  # An entry as JAX writes it with no size limit: no '-atime' beside it.
  old = tmp_path / 'jit_old-0123-cache'
  old.write_bytes(b'x' * 10)
  conftest._give_every_cache_entry_an_atime(str(tmp_path))  # pylint: disable=protected-access
  atime = int.from_bytes((tmp_path / 'jit_old-0123-atime').read_bytes(), 'little')
  assert atime == old.stat().st_mtime_ns
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=str(tmp_path),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  p = subprocess.run(
    [sys.executable, '-c', _COMPILE], env=env, capture_output=True, text=True, check=True
  )
  assert 'Error writing persistent compilation cache' not in p.stderr, p.stderr
  assert list(tmp_path.glob('jit__lambda-*-cache')), sorted(os.listdir(tmp_path))
