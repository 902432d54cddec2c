"""Our models against recordings of the official PyTorch code (float64).

Runs `python -m spikeformer_jax.fidelity` (which needs 64-bit JAX, hence a
subprocess) on every fixture file in ../shared/fixtures and checks each
report: every family (Spikformer, SDT, MSViT) must match.
"""

import json

import numpy as np
import pytest

from conftest import run_fidelity


@pytest.fixture(scope='module')
def reports(shared_dir, tmp_path_factory):
  files = sorted((shared_dir / 'fixtures').glob('*.npz'))
  if not files:
    pytest.skip('no fixture files in ../shared/fixtures')
  reports, proc = run_fidelity(files, tmp_path_factory.mktemp('fid') / 'reports.json', 900)
  print(proc.stdout[-5000:], proc.stderr[-3000:])
  return reports, proc


@pytest.mark.parametrize(
  'name',
  [
    'spikformer_cifar.npz',
    'spikformer_imagenet.npz',
    'spikformer_dvs.npz',
    'sdt_cifar.npz',
    'sdt_imagenet.npz',
    'sdt_gesture.npz',
    'msvit_cifar.npz',
    'msvit_imagenet.npz',
  ],
)
def test_fixture_matches(reports, name):
  by_file, _ = reports
  if name not in by_file:
    pytest.skip(f'{name} absent')
  r = by_file[name]
  assert r['ok'], json.dumps(r, indent=1, default=str)
  checks = r['checks']
  assert checks['spike counts (train)']['layers'] >= 12
  assert checks['logits_train']['error'] <= 1e-9


def test_every_fixture_file_is_checked_and_passes(reports):
  by_file, proc = reports
  assert by_file and all(r['ok'] for r in by_file.values()), sorted(
    n for n, r in by_file.items() if not r['ok']
  )
  assert proc.returncode == 0


def test_unknown_family_fails_loudly():
  from spikeformer_jax import recordings  # pylint: disable=import-outside-toplevel

  with pytest.raises(NotImplementedError, match="family 'vit'"):
    recordings.model_config_from_fixture({'family': 'vit'})
  with pytest.raises(ValueError, match='unknown MSViT source file'):
    recordings.model_config_from_fixture({'family': 'msvit', 'file': 'x/model.py'})


@pytest.fixture(scope='module')
def bad_inputs(shared_dir, tmp_path_factory):
  """One fidelity run over a truncated copy, a garbage file, the real recording
  (a symlink) and a perturbed copy, in that order: one process for both tests."""
  src = shared_dir / 'fixtures' / 'spikformer_imagenet.npz'
  if not src.exists():
    pytest.skip('spikformer_imagenet.npz absent')
  tmp = tmp_path_factory.mktemp('fid_bad')
  raw = src.read_bytes()
  (tmp / 'truncated.npz').write_bytes(raw[: len(raw) // 2])
  (tmp / 'garbage.npz').write_bytes(b'not a recording\n' * 64)
  (tmp / 'spikformer_imagenet.npz').symlink_to(src)
  d = dict(np.load(src))
  d['logits_train'] = d['logits_train'] + 1e-6
  key = 'state/block.0.attn.q_bn.bias'
  d[key] = d[key] + 0.05  # a different network: spikes must change
  np.savez(tmp / 'spikformer_imagenet_bad.npz', **d)
  names = ['truncated.npz', 'garbage.npz', 'spikformer_imagenet.npz', 'spikformer_imagenet_bad.npz']
  reports, proc = run_fidelity([tmp / n for n in names], tmp / 'r.json', 600)
  return reports, proc, tmp


def test_fidelity_detects_a_wrong_model(bad_inputs):
  """A perturbed recording must be reported as a mismatch (the check can fail)."""
  by_file, proc, _ = bad_inputs
  r = by_file['spikformer_imagenet_bad.npz']
  assert not r['checks']['logits_train']['ok'], proc.stdout
  assert not r['checks']['spike counts (train)']['ok']
  assert proc.returncode == 1


def test_a_bad_recording_is_one_line_and_the_rest_are_checked(bad_inputs):
  by_file, proc, tmp = bad_inputs
  assert 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert f'{tmp}/truncated.npz: ERROR truncated (' in lines[0], lines[0]
  assert 'zip directory at its end is missing' in lines[0]
  assert lines[1].startswith(f'{tmp}/garbage.npz: ERROR not an .npz file'), lines[1]
  # The files after them were still checked: the real one matches.
  assert lines[2] == 'spikformer_imagenet.npz (spikformer): MATCH'
  assert by_file['spikformer_imagenet.npz']['ok']
  assert not by_file['truncated.npz']['ok'] and not by_file['garbage.npz']['ok']
  assert lines[-1] == '1/4 fixture files match; 2 could not be checked.'
  assert proc.returncode == 1


def test_an_unwritable_json_is_refused_before_the_replays(tmp_path, capsys):
  from spikeformer_jax import cli, fidelity  # in-process: it returns before enabling x64

  missing = tmp_path / 'nowhere' / 'x.json'
  assert cli.call(fidelity.main, ['fidelity', f'--json={missing}', str(tmp_path / 'a.npz')]) == 2
  out, err = capsys.readouterr()
  assert out == ''  # nothing replayed
  assert err.strip() == (
    f'error: cannot write --json {missing}: no such directory {missing.parent}; pass another path.'
  )
