"""The tools other than training on Cloud Storage (a real GCS API on loopback:
tests/gcs_server.py): a sweep run, its status and table there, eval.py and
--analyze on one of its points, convert --out, fidelity --json, an .npz
data.path; and every path flag refusing a scheme runs cannot live under."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from spikeformer_jax import cli, errors, storage, sweeps
from spikeformer_jax import sweep  # the command line

_ONE_DEVICE = {'JAX_NUM_CPU_DEVICES': '1'}  # tiny runs: less to compile
_S3 = (
  's3://b/x: s3:// is not supported (orbax cannot write checkpoints there); '
  'use a local path, a mounted file system, or gs://BUCKET/PATH.'
)


def _popen(argv):
  return subprocess.Popen(
    [sys.executable, *argv],
    cwd=ROOT,
    env=dict(os.environ, **_ONE_DEVICE),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_every_path_flag_refuses_other_schemes_in_one_line(tmp_path, capsys):
  """Before anything is read or written (no server needed)."""
  from spikeformer_jax import fidelity, prepare  # pylint: disable=import-outside-toplevel
  from spikeformer_jax.data import sources, tfds_sources  # pylint: disable=import-outside-toplevel

  # eval.py defines flags of the same names as sweep.py's, convert's are its
  # __main__'s: processes of their own (eval's in-process there: no JAX import).
  script = (
    'from spikeformer_jax import cli, eval as e\n'
    "assert cli.call(e.main, ['eval', '--workdir=s3://b/x']) == 1\n"
    f"assert cli.call(e.main, ['eval', '--workdir={tmp_path}', '--output=s3://b/x']) == 1\n"
  )
  procs = {
    ('--workdir', '--output'): _popen(['-c', script]),
    ('--out',): _popen(
      [
        '-m',
        'spikeformer_jax.convert',
        '--config=configs/spikformer.py:digits',
        '--torch=none.npz',
        '--out=s3://b/x',
      ]
    ),
  }
  # A refused path is one line, with the status of the tool's other mistakes in that flag.
  calls = {
    '--workdir': (
      1,
      lambda: cli.call(
        sweep.main, ['sweep.py', 'run', '--config=c.py', '--sweep=s', '--workdir=s3://b/x']
      ),
    ),
    '--json': (2, lambda: cli.call(fidelity.main, ['fidelity', '--json=s3://b/x', 'a.npz'])),
  }
  for flag, (status, call) in calls.items():
    assert call() == status, flag
    assert capsys.readouterr().err.splitlines() == [f'error: {flag}={_S3}']
  for names, p in procs.items():
    _, err = p.communicate(timeout=300)
    expected = [f'error: {flag}={_S3}' for flag in names]
    assert (p.returncode, err.splitlines()) == (0 if len(names) > 1 else 1, expected), err[-2000:]
  with pytest.raises(errors.ConfigError, match=r'^data.path=s3://b/x: s3:// is not supported'):
    sources.npz('train', path='s3://b/x', num_classes=10, mean=(), std=())
  # Prepared tfds data is read by array_record's C++ reader: local files only.
  local = r'prepared datasets are read from a local or mounted folder'
  with pytest.raises(errors.ConfigError, match=rf'^data_dir=gs://b/d: {local}'):
    tfds_sources.event_source(
      'nmnist',
      'train',
      data_dir='gs://b/d',
      frames=4,
      split_by='number',
      image_size=34,
      num_classes=10,
    )
  assert cli.call(prepare.main, ['prepare', '--dataset=nmnist', '--data_dir=gs://b/d']) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(f'error: data_dir=gs://b/d: {local}'), err


@pytest.mark.slow
def test_a_sweep_and_eval_on_gs(gcs_dir, tmp_path):
  """Two tiny points trained in gs://, recorded and tabulated there; then
  eval.py and eval.py --analyze on one of them write their outputs there."""
  cfg = tmp_path / 'tiny_sweep.py'
  cfg.write_text(
    'from spikeformer_jax.configs import spikformer as base\n'
    'from spikeformer_jax import sweeps\n'
    'get_config = base.get_config\n'
    "SWEEPS = ('tiny',)\n"
    'def get_sweep(name):\n'
    "  return sweeps.grid(**{'model.T': [1, 2]})\n"
  )
  common = {'total_steps': 2, 'ckpt_every_steps': 2, 'eval_every_epochs': 0, 'log_every_steps': 1}
  log = []
  result = sweeps.run(
    str(cfg),
    'tiny',
    gcs_dir,
    parallel=2,
    common=common,
    runlocal=True,
    env=_ONE_DEVICE,
    log=log.append,
  )
  assert result == {'T=1': 'finished', 'T=2': 'finished'}, log
  status = json.loads(storage.read_text(storage.join(gcs_dir, 'status.json')))
  assert {k: v['status'] for k, v in status.items()} == result
  point = storage.join(gcs_dir, 'T=1')
  assert sweeps.point_status(point) == 'finished'
  assert 'T=1' in storage.read_text(storage.join(point, 'sweep.log'))  # the point's output
  # A rerun reads the finished points there and skips them.
  log.clear()
  sweeps.run(str(cfg), 'tiny', gcs_dir, common=common, runlocal=True, log=log.append)
  assert '[skip] T=1: finished' in log and '[skip] T=2: finished' in log
  rows = sweeps.collect(gcs_dir, x='model.T')
  assert sorted((r['point'], r['model.T'], r['steps']) for r in rows) == [
    ('T=1', 1, 2),
    ('T=2', 2, 2),
  ]
  assert storage.read_text(storage.join(gcs_dir, 'results.csv')).startswith('point,status,model.T')
  assert storage.read_bytes(storage.join(gcs_dir, 'results.png'))[:4] == b'\x89PNG'

  # eval.py on a run in gs://: its JSON there; --analyze: tables and pictures there.
  # One process (one JAX start) for both: eval.main in-process there, as eval.py runs it.
  script = (
    'from spikeformer_jax import cli, eval as e\n'
    f"assert cli.call(e.main, ['eval', '--workdir={point}']) == 0\n"
    f"assert cli.call(e.main, ['eval', '--workdir={point}', '--analyze', "
    "'--analyze_examples=8']) == 0\n"
  )
  p = _popen(['-c', script])
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  res = json.loads(storage.read_text(storage.join(point, 'eval_test_2.json')))
  assert res['step'] == 2 and 0 <= res['top1'] <= 1
  assert f'-> {storage.join(point, "analysis_test_2")}' in out
  names = storage.listdir(storage.join(point, 'analysis_test_2'))
  assert sorted(names) == [
    'analysis.json',
    'analysis.md',
    'attention.png',
    'firing_rates.png',
    'layers.csv',
    'learning_curves.png',
    'neurons.csv',
  ]
  assert not [n for n in storage.listdir(point) if n.startswith('.')]  # no probes left


def test_convert_out_on_gs(shared_dir, gcs_dir, tmp_path):
  """An official state_dict becomes a workdir in gs://, which convert then
  refuses to write into again."""
  from spikeformer_jax import config_lib, convert, recordings  # pylint: disable=import-outside-toplevel
  from test_models import cfgs  # pylint: disable=import-outside-toplevel

  fixture = shared_dir / 'fixtures' / 'spikformer_cifar.npz'
  if not fixture.exists():
    pytest.skip('spikformer_cifar.npz absent')
  d, rec = recordings.read_recording(str(fixture))
  np.savez(tmp_path / 'official.npz', **recordings.state_dict(d))
  config = config_lib.apply_overrides(
    cfgs.get_config('cifar10-4-384,runlocal'), {'total_steps': 2, 'eval_every_epochs': 0}
  )
  mc = recordings.model_config_from_fixture(rec)
  mc.dtype = 'float32'
  config.model = mc
  config.data.shape = (mc.img_size, mc.img_size, 3)
  out = storage.join(gcs_dir, 'converted')
  assert convert.write_workdir(config, str(tmp_path / 'official.npz'), out) == storage.join(
    out, 'checkpoints', '0'
  )
  assert sorted(storage.listdir(out)) == ['checkpoints', 'config.json']
  run = json.loads(storage.read_text(storage.join(out, 'config.json')))['run']
  assert run['converted_from'] == str(tmp_path / 'official.npz')
  with pytest.raises(errors.UserError, match=r'already holds a run .*give a new directory'):
    convert.write_workdir(config, str(tmp_path / 'official.npz'), out)


def test_fidelity_json_and_npz_data_on_gs(gcs_dir, tmp_path, monkeypatch, capsys):
  import jax  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import fidelity  # pylint: disable=import-outside-toplevel
  from spikeformer_jax.data import sources  # pylint: disable=import-outside-toplevel

  # A file that cannot be checked still gets its report (fast: no replay; in
  # this process, whose JAX stays 32-bit).
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)
  (tmp_path / 'garbage.npz').write_bytes(b'not a zip')
  report = storage.join(gcs_dir, 'reports', 'fidelity.json')
  argv = ['fidelity', str(tmp_path / 'garbage.npz'), f'--json={report}']
  assert cli.call(fidelity.main, argv) == 1, capsys.readouterr()
  (r,) = json.loads(storage.read_text(report))
  assert r['file'] == 'garbage.npz' and not r['ok'] and r['error']
  assert storage.listdir(storage.join(gcs_dir, 'reports')) == ['fidelity.json']  # no probe left
  assert fidelity._unwritable(storage.join(gcs_dir, 'reports')) == 'it is a directory'  # pylint: disable=protected-access

  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 255, (6, 8, 8, 3), np.uint8), np.arange(6) % 3
  np.savez(tmp_path / 'd.npz', x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
  path = storage.join(gcs_dir, 'd.npz')
  storage.write_bytes(path, (tmp_path / 'd.npz').read_bytes())
  src = sources.npz('train', path=path, num_classes=3, mean=(0.5,) * 3, std=(0.5,) * 3)
  assert len(src) == 6 and np.array_equal(src[np.arange(6)]['label'], y)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    sources.npz('train', path=storage.join(gcs_dir, 'none.npz'), num_classes=3, mean=(), std=())
