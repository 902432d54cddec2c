"""`pip install .` (not editable) gives a trainer that works from any directory.

The wheel is built offline from a copy of the sources and installed into a
fresh virtual environment whose dependencies are this environment's (a .pth
file names its site-packages: nothing is downloaded). Its commands then run
from an empty directory, where no checkout is in reach, with the configs named
as in a checkout (`configs/<family>.py:VARIANT`).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SOURCES = ('pyproject.toml', 'README.md', 'LICENSE', 'spikeformer_jax')


def _run(cmd, cwd, status=0):
  p = subprocess.run(
    [str(c) for c in cmd],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'PYTHONPATH': ''},
  )
  assert p.returncode == status, (
    f'{cmd}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
  )
  return p.stdout


@pytest.mark.slow
def test_installed_wheel_trains_from_another_directory(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for name in _SOURCES:  # a copy: building writes build/ and *.egg-info beside the sources
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(ROOT / name, src / name)
  _run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '--no-deps',
      '--no-build-isolation',
      '--no-index',
      '-q',
      '-w',
      tmp_path / 'dist',
      src,
    ],
    cwd=tmp_path,
  )
  (wheel,) = (tmp_path / 'dist').glob('spikeformer_jax-*.whl')
  with zipfile.ZipFile(wheel) as z:  # type checkers read the package's annotations (PEP 561)
    assert 'spikeformer_jax/py.typed' in z.namelist()

  env = tmp_path / 'env'
  venv.create(env, with_pip=False)
  python = env / 'bin' / 'python'
  purelib = _run(
    [python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], cwd=tmp_path
  ).strip()
  deps = [p for p in sys.path if p.endswith('site-packages')]
  pathlib.Path(purelib, '_dependencies.pth').write_text('\n'.join(deps) + '\n')
  _run(
    [
      sys.executable,
      '-m',
      'pip',
      '--python',
      python,
      'install',
      '--no-deps',
      '--no-index',
      '-q',
      wheel,
    ],
    cwd=tmp_path,
  )

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  where = _run(
    [python, '-c', 'import spikeformer_jax; print(spikeformer_jax.__file__)'], cwd=elsewhere
  )
  assert where.startswith(purelib), f'imported {where}, not the installed wheel'

  bin_ = env / 'bin'
  wd = elsewhere / 'run'
  out = _run(
    [
      bin_ / 'spikeformer-train',
      '--config=configs/spikformer.py:digits,runlocal',
      f'--workdir={wd}',
    ],
    cwd=elsewhere,
  )
  assert (wd / 'final_metrics.json').exists(), out
  out = _run(
    [bin_ / 'spikeformer-eval', f'--workdir={wd}', f'--output={elsewhere}/e.json'], cwd=elsewhere
  )
  assert out.startswith('eval test step') and (elsewhere / 'e.json').exists(), out
  out = _run([bin_ / 'spikeformer-sweep', 'list', '--config=configs/a2os2a.py'], cwd=elsewhere)
  assert out.startswith('table1: 8 points'), out
  out = _run([python, '-m', 'spikeformer_jax.train', '--helpshort'], cwd=elsewhere, status=1)
  assert 'spikeformer-train' in out and '--workdir' in out, out
