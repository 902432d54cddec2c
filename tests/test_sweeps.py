"""Sweeps: declaration forms, validation before running, run / skip / resume /
failure recording with real train.py processes, and the collected table."""

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from spikeformer_jax import cli, errors, sweeps
from spikeformer_jax import sweep  # the command line


def _sweep(argv) -> int:
  """`python sweep.py *argv`, in this process: its exit status."""
  return cli.call(sweep.main, ['sweep.py', *argv])


def test_grid_zipped_product_chain():
  g = sweeps.grid(**{'model.T': [1, 2], 'model.neuron.surrogate': ['sigmoid', 'atan']})
  assert g == [
    {'model.T': 1, 'model.neuron.surrogate': 'sigmoid'},
    {'model.T': 1, 'model.neuron.surrogate': 'atan'},
    {'model.T': 2, 'model.neuron.surrogate': 'sigmoid'},
    {'model.T': 2, 'model.neuron.surrogate': 'atan'},
  ]
  z = sweeps.zipped(config=['a', 'b'], **{'model.depth': [2, 4]})
  assert z == [{'config': 'a', 'model.depth': 2}, {'config': 'b', 'model.depth': 4}]
  with pytest.raises(ValueError, match='different lengths'):
    sweeps.zipped(a=[1, 2], b=[1])
  p = sweeps.product(sweeps.grid(x=[1, 2]), [{'epochs': 8}])
  assert p == [{'x': 1, 'epochs': 8}, {'x': 2, 'epochs': 8}]
  assert sweeps.chain([{'a': 1}], [{'b': 2}]) == [{'a': 1}, {'b': 2}]
  assert sweeps.varying_keys(p) == ['x']
  assert (
    sweeps.point_name({'config': 'cifar10-4-384', 'model.T': 4, 'optimizer.lr': 1e-3})
    == 'cifar10-4-384,T=4,lr=0.001'
  )


def test_random_search_is_seeded_and_in_range():
  space = {
    'optimizer.lr': sweeps.loguniform(1e-4, 1e-2),
    'model.T': [1, 2, 4],
    'model.neuron.alpha': sweeps.uniform(2.0, 6.0),
    'epochs': 3,
  }
  a = sweeps.random_search(20, seed=3, **space)
  assert a == sweeps.random_search(20, seed=3, **space)
  assert a != sweeps.random_search(20, seed=4, **space)
  assert all(
    1e-4 <= p['optimizer.lr'] <= 1e-2
    and p['model.T'] in (1, 2, 4)
    and 2 <= p['model.neuron.alpha'] <= 6
    and p['epochs'] == 3
    for p in a
  )
  assert len({p['model.T'] for p in a}) == 3


def _write_config(tmp_path, points_src):
  path = tmp_path / 'tiny_sweep.py'
  path.write_text(
    'from spikeformer_jax.configs import spikformer as base\n'
    'from spikeformer_jax import sweeps\n'
    'get_config = base.get_config\n'
    "SWEEPS = ('tiny',)\n"
    'def get_sweep(name):\n'
    f'  return {points_src}\n'
  )
  return str(path)


def test_invalid_points_are_rejected_before_anything_runs(tmp_path):
  cfg = _write_config(
    tmp_path,
    "[{'model.T': 2}, {'model.num_heads': 5}, "
    "{'model.nope': 1}, {'model.T': 'four'}, "
    "{'model.neuron.tau': float('nan')}, "
    "{'init_required': True}]",
  )
  with pytest.raises(ValueError) as e:
    sweeps.run(cfg, 'tiny', str(tmp_path / 'wd'))
  msg = str(e.value)
  assert '5 of 6 sweep points are invalid (nothing was run)' in msg
  assert 'fine-tunes trained weights but init_from is not set' in msg  # validate_start
  assert 'model.neuron.tau=nan must be finite.' in msg  # train.py's checks of the config
  assert 'is not divisible by model.num_heads=5' in msg
  assert "unknown config field 'model.nope'" in msg
  assert "model.T='four'" in msg
  assert not (tmp_path / 'wd').exists()
  with pytest.raises(ValueError, match="declares no sweep 'other'; declared: tiny"):
    sweeps.get_points(cfg, 'other')


@pytest.mark.slow
def test_shipped_sweeps_expand_and_validate():
  expected = {
    'spikformer': {'timesteps': 12, 'attention': 15, 'attention-imagenet': 5, 'digits-small': 6},
    'a2os2a': {'table1': 8},
    'msvit': {'table3': 8},
  }
  for family, sizes in expected.items():
    path = os.path.join(ROOT, 'configs', f'{family}.py')
    for name, n in sizes.items():
      points = sweeps.get_points(path, name)
      assert len(points) == n and len({p.name for p in points}) == n, (family, name)
  t3 = {
    p.name: p.config.model
    for p in sweeps.get_points(os.path.join(ROOT, 'configs', 'msvit.py'), 'table3')
  }
  assert t3['mssa-pp'].attention == ('mssa', 'mssa', 'mssa')
  assert t3['mssa-pp'].mssa_kernels == ((1, 3), (1, 3), (3, 3))
  assert t3['q'].mssa_kernels[0] == (1, 0)
  assert t3['msvit'].attention == ('mssa', 'mssa', 'ssa')
  # Each paper point carries the paper's number; names leave it out.
  t5 = {
    p.name: p
    for p in sweeps.get_points(os.path.join(ROOT, 'configs', 'spikformer.py'), 'timesteps')
  }
  assert t5['cifar100-4-384,T=6'].config.model.T == 6
  assert t5['cifar100-4-384,T=6'].config.paper_top1 == 78.61
  assert t5['imagenet-8-512,T=1'].config.paper_top1 == 70.14
  a1 = {
    p.name: p.config
    for p in sweeps.get_points(os.path.join(ROOT, 'configs', 'a2os2a.py'), 'table1')
  }
  assert a1['cifar100-2-512,attention=sdsa'].paper_top1 == 78.83
  assert a1['cifar10-2-256,attention=a2os2a'].model.attention == 'a2os2a'
  # --runlocal: the same points (names, overrides) on each config's smoke variant.
  local = sweeps.get_points(os.path.join(ROOT, 'configs', 'a2os2a.py'), 'table1', runlocal=True)
  assert [p.name for p in local] == list(a1)
  assert all(
    p.config_arg.endswith(',runlocal')
    and p.config.data.name == 'synthetic'
    and p.config.model.depth == 1
    for p in local
  )
  assert local[1].config.model.attention == 'a2os2a'


@pytest.mark.slow
def test_every_shipped_sweep_expands_under_runlocal():
  """--runlocal works for every declared sweep of every config module, points
  with their own variant or without (the module's default variant)."""
  count = 0
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    module = sweeps.load_config_module(path)
    for name in sweeps.declared_sweeps(module):
      full = sweeps.get_points(path, name, validate=False)
      local = sweeps.get_points(path, name, runlocal=True)
      assert [p.name for p in local] == [p.name for p in full], (path, name)
      assert all(p.config_arg.endswith(',runlocal') and p.config.total_steps == 4 for p in local), (
        path,
        name,
      )
      count += len(local)
  assert count >= 54
  digits = sweeps.get_points(
    os.path.join(ROOT, 'configs', 'spikformer.py'), 'digits-small', runlocal=True
  )
  assert {p.config_arg for p in digits} == {'digits,runlocal'}


@pytest.mark.slow
def test_run_skips_finished_resumes_interrupted_records_failures(tmp_path):
  cfg = _write_config(
    tmp_path,
    "sweeps.chain(sweeps.grid(**{'model.T': [1, 2]}), "
    "[{'name': 'broken', 'data.name': 'npz', 'data.path': '/nonexistent.npz'}])",
  )
  wd = tmp_path / 'wd'
  common = {'total_steps': 4, 'ckpt_every_steps': 2, 'eval_every_epochs': 0, 'log_every_steps': 2}
  # Every run is --runlocal (the points' smoke configs, end to end). An
  # interrupted point: T=1 as killed after its step-2 checkpoint (the same
  # run, with its step-4 checkpoint and final metrics removed).
  pre = subprocess.run(
    sweeps.point_command(cfg, 'tiny', 'T=1', str(wd / 'T=1'), common, True),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert pre.returncode == 0, pre.stderr[-2000:]
  assert sorted(os.listdir(wd / 'T=1' / 'checkpoints')) == ['2', '4']
  shutil.rmtree(wd / 'T=1' / 'checkpoints' / '4')
  os.remove(wd / 'T=1' / 'final_metrics.json')
  assert sweeps.point_status(str(wd / 'T=1')) == 'interrupted'

  log = []
  result = sweeps.run(cfg, 'tiny', str(wd), common=common, runlocal=True, log=log.append)
  assert result == {'T=1': 'finished', 'T=2': 'finished', 'broken': 'failed'}
  assert '[resume] T=1' in log and '[start] T=2' in log
  resumed = json.loads((wd / 'T=1' / 'final_metrics.json').read_text())
  assert resumed['steps'] == 4 and resumed['steps_this_run'] == 2
  status = json.loads((wd / 'status.json').read_text())
  assert status['broken']['status'] == 'failed' and status['broken']['returncode'] == 1
  assert '/nonexistent.npz' in status['broken']['error']

  before = (wd / 'T=2' / 'final_metrics.json').stat().st_mtime_ns
  log.clear()
  result = sweeps.run(cfg, 'tiny', str(wd), common=common, runlocal=True, log=log.append)
  assert '[skip] T=1: finished' in log and '[skip] T=2: finished' in log
  assert '[start] broken' in log and result['broken'] == 'failed'  # retried, still failing
  assert (wd / 'T=2' / 'final_metrics.json').stat().st_mtime_ns == before

  rows = sweeps.collect(str(wd))
  assert [r['point'] for r in rows][-1] == 'broken'  # no metric: sorted last
  by = {r['point']: r for r in rows}
  assert by['T=1']['model.T'] == 1 and by['T=2']['model.T'] == 2
  assert by['broken']['status'] == 'failed' and by['broken']['test_top1'] is None
  assert all(0 <= by[p]['test_top1'] <= 1 and by[p]['steps'] == 4 for p in ('T=1', 'T=2'))
  tops = [r['test_top1'] for r in rows if r['test_top1'] is not None]
  assert tops == sorted(tops, reverse=True)
  with open(wd / 'results.csv', encoding='utf-8') as f:
    table = list(csv.DictReader(f))
  assert [t['point'] for t in table] == [r['point'] for r in rows]
  assert table[0]['test_top1'] == f"{rows[0]['test_top1']:.4f}"
  md = (wd / 'results.md').read_text()
  assert md.splitlines()[0].startswith('| point | status | model.T | data.name | data.path |')
  assert (wd / 'results.png').stat().st_size > 1000

  cli = subprocess.run(
    [
      sys.executable,
      'sweep.py',
      'collect',
      f'--workdir={wd}',
      '--jax_log_compiles',
    ],  # JAX's options pass to every point
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert cli.returncode == 0 and '3 points; wrote' in cli.stdout
  # A --set field that points sweep themselves is reported (on stderr: stdout
  # is the commands), and the points keep their own values.
  cmds = subprocess.run(
    [
      sys.executable,
      'sweep.py',
      'commands',
      f'--config={cfg}',
      '--sweep=tiny',
      f'--workdir={wd}',
      '--set',
      'total_steps=4',
      '--set',
      'model.T=3',
      '--runlocal',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert cmds.returncode == 0, cmds.stderr
  assert cmds.stderr.strip().splitlines() == [
    'warning: --set model.T (in 2 points: T=1, T=2): these points set the field '
    'themselves and keep their own value.'
  ]
  lines = cmds.stdout.strip().splitlines()
  assert len(lines) == 3 and all(
    '-m spikeformer_jax.sweep point' in line
    and '--set=total_steps=4' in line
    and line.endswith('--runlocal')
    for line in lines
  )

  # Changing a point's config under a trained point is refused, never mixed.
  changed = {**common, 'total_steps': 6}
  with pytest.raises(ValueError, match=r'trained with other values of total_steps; delete'):
    sweeps.run_point(cfg, 'tiny', 'T=1', str(wd / 'T=1'), changed, runlocal=True)
  log.clear()
  result = sweeps.run(cfg, 'tiny', str(wd), common=changed, runlocal=True, log=log.append)
  assert result == {'T=1': 'conflict', 'T=2': 'conflict', 'broken': 'failed'}
  assert any(line.startswith('[CONFLICT] T=2:') and 'total_steps' in line for line in log)
  assert (wd / 'T=2' / 'final_metrics.json').stat().st_mtime_ns == before
  conflicted = {r['point']: r for r in sweeps.collect(str(wd))}['T=1']
  assert conflicted['status'] == 'conflict' and conflicted['test_top1'] is None  # not mixed in
  # A workdir holds one sweep.
  with pytest.raises(ValueError, match="holds sweep 'tiny'.*use another --workdir"):
    sweeps.write_manifest(cfg, 'other', str(wd), [])


def test_common_overrides_fill_in_but_points_keep_their_own(tmp_path, capsys):
  cfg = _write_config(tmp_path, "sweeps.grid(**{'model.T': [1, 2]})")
  common = {'model.T': 5, 'epochs': 3}
  points = sweeps.get_points(cfg, 'tiny', common)
  assert [(p.name, p.config.model.T, p.config.epochs) for p in points] == [
    ('T=1', 1, 3),
    ('T=2', 2, 3),
  ]
  # ... and that is reported, not silent: by `list`, `commands` (see above) and `run`.
  warning = (
    'warning: --set model.T (in all 2 points: T=1, T=2): these points set the '
    'field themselves and keep their own value.'
  )
  assert sweeps.overridden_common(points, common) == warning
  assert sweeps.overridden_common(points, {'epochs': 3}) == ''
  assert _sweep(['list', f'--config={cfg}', '--set', 'model.T=5', '--set', 'epochs=3']) == 0
  out, err = capsys.readouterr()
  assert err.splitlines() == [warning] and out.splitlines() == ['tiny: 2 points', '  T=1', '  T=2']
  for name in ('T=1', 'T=2'):  # directories of another experiment: nothing trains
    (tmp_path / 'wd' / name).mkdir(parents=True)
    (tmp_path / 'wd' / name / 'config.json').write_text('{"config": {}}')
  log = []
  assert sweeps.run(cfg, 'tiny', str(tmp_path / 'wd'), common=common, log=log.append) == {
    'T=1': 'conflict',
    'T=2': 'conflict',
  }
  assert log[0] == warning


def _fake_points(monkeypatch, scripts):
  """Point processes replaced by `python -c scripts[point]` (POINT_DIR: its directory)."""
  monkeypatch.setattr(
    sweeps,
    'point_command',
    lambda _c, _s, point, pdir, *a: [
      sys.executable,
      '-c',
      scripts[point].replace('POINT_DIR', pdir),
    ],
  )


def test_run_records_stopped_busy_and_killed_points(tmp_path, monkeypatch):
  cfg = _write_config(tmp_path, "sweeps.grid(**{'model.T': [1, 2, 3, 4]})")
  _fake_points(
    monkeypatch,
    {
      'T=1': "print('preempted (SIGTERM) at step 2/4: saved; rerun to resume.'); exit(143)",
      # The process holding T=2 writes to T=2's sweep.log too.
      'T=2': "print('error: the workdir /w/T=2 is in use by process 12 on h', flush=True)\n"
      "open('POINT_DIR/sweep.log', 'a').write('step 20/400 | loss 2.3\\n'); exit(75)",
      'T=3': "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
      'T=4': "print('interrupted (SIGINT) at step 1/4: saved.'); exit(130)",
    },
  )
  wd = tmp_path / 'wd'
  log = []
  result = sweeps.run(cfg, 'tiny', str(wd), log=log.append)
  assert result == {'T=1': 'preempted', 'T=2': 'busy', 'T=3': 'failed', 'T=4': 'interrupted'}
  assert (
    '[PREEMPTED] T=1 (exit 143): preempted (SIGTERM) at step 2/4: saved; rerun to resume.' in log
  )
  assert '[BUSY] T=2 (exit 75): error: the workdir /w/T=2 is in use by process 12 on h' in log
  assert '[FAILED] T=3 (killed by SIGKILL): ' in log
  status = json.loads((wd / 'status.json').read_text())
  assert [status[p]['returncode'] for p in ('T=1', 'T=2', 'T=3', 'T=4')] == [143, 75, -9, 130]
  assert 'in use by process 12' in status['T=2']['error']
  assert 'step 20/400' not in status['T=2']['error']  # the other process's line
  assert 'step 20/400' in (wd / 'T=2' / 'sweep.log').read_text()


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_is_passed_on_starts_no_new_point_and_is_recorded(tmp_path, monkeypatch, signum):
  cfg = _write_config(tmp_path, "sweeps.grid(**{'model.T': [1, 2, 3]})")
  # T=1 signals the sweep process (as a terminal's Ctrl-C or a scheduler's
  # SIGTERM does), gets the signal passed on, saves once the sweep has noticed
  # (`stopping`) and exits as train.py does; T=2 and T=3 must not start.
  noticed = tmp_path / 'noticed'
  what, name, code = {
    signal.SIGINT: ('interrupted', 'SIGINT', 130),
    signal.SIGTERM: ('preempted', 'SIGTERM', 143),
  }[signum]
  _fake_points(
    monkeypatch,
    {
      'T=1': "import os, signal, time; got = []\n"
      f"signal.signal({int(signum)}, lambda *_: got.append(1))\n"
      f"os.kill(os.getppid(), {int(signum)})\n"
      f"while not (got and os.path.exists({str(noticed)!r})): time.sleep(0.05)\n"
      f"print('{what} ({name}) at step 1/4: saved.'); exit({code})",
      'T=2': 'exit(0)',
      'T=3': 'exit(0)',
    },
  )
  log = []

  def record(line):
    log.append(line)
    if line.startswith('[stopping]'):
      noticed.touch()

  before = signal.getsignal(signum)
  with pytest.raises(errors.Stopped) as e:
    sweeps.run(cfg, 'tiny', str(tmp_path / 'wd'), log=record)
  assert e.value.exit_code == code and str(e.value).startswith(
    f'{what} ({name}): no new point started; the running ones saved their step'
  )
  assert signal.getsignal(signum) == before and log == [
    '[start] T=1',
    '[stopping] waiting for the running points to save their step',
    f'[{what.upper()}] T=1 (exit {code}): {what} ({name}) at step 1/4: saved.',
  ]
  status = json.loads((tmp_path / 'wd' / 'status.json').read_text())
  assert list(status) == ['T=1'] and status['T=1']['status'] == what


def test_damaged_sweep_files_are_named_and_redone_not_refused(tmp_path, monkeypatch, capsys):
  cfg = _write_config(tmp_path, "sweeps.grid(**{'model.T': [1, 2, 3]})")
  finish = (
    "import json; json.dump({'steps': 4, 'total_steps': 4, 'test_top1': 0.5}, "
    "open('POINT_DIR/final_metrics.json', 'w'))"
  )
  _fake_points(monkeypatch, {'T=1': finish, 'T=2': finish, 'T=3': finish})
  wd = tmp_path / 'wd'
  assert set(sweeps.run(cfg, 'tiny', str(wd), log=lambda _: None).values()) == {'finished'}
  # What a kill -9 or a full disk leaves: truncated JSON.
  (wd / 'status.json').write_text('{"T=1": {"sta')
  (wd / 'T=1' / 'final_metrics.json').write_text('{"steps": 4, "tot')
  (wd / 'T=3' / 'config.json').write_text('[1, 2]')
  damaged_status = f'{wd}/status.json is not valid JSON (Unterminated string starting at, line 1)'
  for argv in (
    ['collect', f'--workdir={wd}'],
    ['collect', f'--workdir={wd}', '--x=bogus'],
    ['collect', f'--workdir={wd}', '--metric=status'],
  ):
    assert _sweep(argv) == 1
  assert capsys.readouterr().err.splitlines() == [
    f'error: {damaged_status}: delete it (`sweep.py run` writes it again).',
    "error: --x='bogus' is not a field this sweep varies; valid: model.T.",
    "error: --metric='status': collect sorts and plots a number of each point; valid: "
    'test_top1, paper_top1, test_top5, test_loss, steps, wall_time_s, num_params.',
  ]
  assert not list(wd.glob('results.*'))  # refused before writing anything
  assert _sweep(['run', f'--config={cfg}', '--sweep=tiny', f'--workdir={wd}', '--parallel=0']) == 2
  assert capsys.readouterr().err.splitlines() == [
    'error: --parallel=0: the number of points trained at once must be >= 1.'
  ]
  log = []
  result = sweeps.run(cfg, 'tiny', str(wd), log=log.append)
  assert result == {'T=1': 'finished', 'T=2': 'finished', 'T=3': 'failed'}
  assert log[:-1] == [
    f"[warning] {damaged_status}: moved to {wd}/status.json.damaged; the points' states are "
    'recorded anew.',
    f'[warning] {wd}/T=1/final_metrics.json is not valid JSON (Unterminated string starting '
    f'at, line 1): moved to {wd}/T=1/final_metrics.json.damaged; the point is evaluated (or '
    'trained on) again.',
    '[skip] T=2: finished',
    f'[FAILED] T=3: {wd}/T=3/config.json holds a list, not a JSON object: it records the '
    "config the point was trained with; restore it from a copy, or delete the point's "
    'directory to train it again.',
    '[start] T=1',
  ] and log[-1].startswith('[done] T=1 ('), log
  (wd / 'T=2' / 'final_metrics.json').write_bytes(b'\xff\xfe')
  with pytest.raises(
    errors.UserError,
    match=(
      f'^{wd}/T=2/final_metrics.json is not a text file: delete it and rerun `sweep.py run` '
      'with the same arguments to evaluate that point again.$'
    ),
  ):
    sweeps.collect(str(wd))


def _wait_for_line(path, prefix, after=0, timeout=600):
  """The first line of `path` from character `after` on that starts with `prefix`."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    text = path.read_text() if path.exists() else ''
    line = next((c for c in text[after:].splitlines() if c.startswith(prefix)), None)
    if line is not None:
      return line
    time.sleep(0.2)
  pytest.fail(f'no line {prefix!r} in {path} after {timeout} s:\n{text[-3000:]}')


@pytest.mark.slow
def test_sigterm_of_the_sweep_saves_the_running_point_and_a_rerun_resumes_it(tmp_path):
  """Real processes: `sweep.py run` (what a scheduler or `kill` stops) passes
  SIGTERM on to the training point, which saves its step; the sweep records
  it as preempted and exits 143; the rerun resumes the point from that step
  (stopped again once it has restored it: a second compile is not needed)."""
  cfg = _write_config(tmp_path, "[{'name': 'long'}]")
  wd = tmp_path / 'wd'
  cmd = [
    sys.executable,
    'sweep.py',
    'run',
    f'--config={cfg}',
    '--sweep=tiny',
    f'--workdir={wd}',
    '--runlocal',
    '--set',
    'total_steps=100000',
    '--set',
    'ckpt_every_steps=100000',
    '--set',
    'log_every_steps=1',
    '--set',
    'eval_every_epochs=0',
  ]
  log, saved = wd / 'long' / 'sweep.log', None
  for attempt in range(2):
    after = len(log.read_text()) if log.exists() else 0
    sweep_proc = subprocess.Popen(
      cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
      if attempt == 0:
        _wait_for_line(log, 'step ')  # training
      else:
        assert _wait_for_line(log, 'Resuming from', after).endswith(f'/checkpoints/{saved}.')
      sweep_proc.send_signal(signal.SIGTERM)
      out, err = sweep_proc.communicate(timeout=300)
    finally:
      if sweep_proc.poll() is None:
        sweep_proc.kill()
    assert sweep_proc.returncode == 143, (out, err)
    assert err.strip().splitlines() == [
      'preempted (SIGTERM): no new point started; the running ones saved their step (see '
      f'{wd}/status.json); rerun the same command to resume.'
    ]
    lines = out.splitlines()
    assert lines[0] == ('[resume] long' if attempt else '[start] long')
    assert lines[-1].startswith('[PREEMPTED] long (exit 143): preempted (SIGTERM) '), out
    status = json.loads((wd / 'status.json').read_text())
    assert status['long']['status'] == 'preempted' and status['long']['returncode'] == 143
    if attempt == 0:
      assert ' at step ' in lines[-1]
      saved = int(lines[-1].split(' at step ')[1].split('/')[0])
      assert saved >= 1
    assert max(int(n) for n in os.listdir(wd / 'long' / 'checkpoints')) == saved


def test_point_stopped_busy_and_clear_errors_are_one_line(tmp_path, monkeypatch, capsys):
  argv = ['point', '--config=c.py', '--sweep=s', '--point=p', f'--workdir={tmp_path}']
  for exc, code, line in [
    (
      errors.Stopped('preempted (SIGTERM) at step 3/8: saved.', 143),
      143,
      'preempted (SIGTERM) at step 3/8: saved.',
    ),
    (
      errors.Stopped('interrupted (SIGINT) at step 3/8: saved.', 130),
      130,
      'interrupted (SIGINT) at step 3/8: saved.',
    ),
    (
      errors.WorkdirBusy(f'the workdir {tmp_path} is in use by process 12 on h.'),
      sweeps.BUSY_EXIT,
      f'error: the workdir {tmp_path} is in use by process 12 on h.',
    ),
    (errors.ConfigError('bad value\n  of a field'), 1, 'error: bad value of a field'),
    (PermissionError(13, 'Permission denied'), 1, 'error: [Errno 13] Permission denied'),
  ]:

    def fail(*_a, exc=exc):
      raise exc

    monkeypatch.setattr(sweeps, 'run_point', fail)
    assert _sweep(argv) == code, exc
    assert capsys.readouterr().err.splitlines() == [line]
    assert _sweep([*argv, '--traceback']) == code  # --traceback: where, then the same line
    err = capsys.readouterr().err.splitlines()
    traced = err[0] == 'Traceback (most recent call last):'
    assert err[-1] == line and traced == (not isinstance(exc, errors.Stopped))


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
  """A plain ValueError (from JAX, NumPy or a plug-in) is not a user error."""

  def fail(*_a):
    raise ValueError('Incompatible shapes for broadcasting: (2, 3) and (4,)')

  monkeypatch.setattr(sweeps, 'run_point', fail)
  argv = ['point', '--config=c.py', '--sweep=s', '--point=p', f'--workdir={tmp_path}']
  assert _sweep(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith('Traceback (most recent call last):')
  assert f'File "{__file__}", line ' in err and 'in fail' in err  # the file and line
  assert err.strip().splitlines()[-1] == (
    'error: ValueError: Incompatible shapes for broadcasting: (2, 3) and (4,) (a bug, not a '
    'problem with the input: the traceback above shows where)'
  )


def test_command_line_mistakes_are_one_line_and_status_2(capsys):
  for argv, line in [
    (['list'], 'error: list needs --config.'),
    (
      ['launch', '--config=c.py'],
      "error: give one command, list | run | commands | point | "
      "collect | task (got 'launch'); e.g. python sweep.py list --config=configs/spikformer.py.",
    ),
    (['list', '--config=c.py', '--set', 'model.T'], "error: --set 'model.T': expected KEY=VALUE."),
    (
      ['collect', '--workdir=w', '--parallel=x'],
      "error: flag --parallel=x: invalid literal for int() with base 10: 'x'",
    ),
    (
      ['collect', '--workdir=w', '--sweeep=s'],
      "error: Unknown command line flag 'sweeep'. Did you mean: sweep ?",
    ),
  ]:
    assert _sweep(argv) == 2, argv
    assert capsys.readouterr().err.splitlines() == [line]


def test_commands_use_absolute_paths_and_declared_paper_numbers(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cmd = sweeps.point_command('cfg.py', 'tiny', 'T=1', 'sw/T=1')
  assert f'--config={tmp_path}/cfg.py' in cmd and f'--workdir={tmp_path}/sw/T=1' in cmd
  # A point inherits no paper number from its base variant (that is another row).
  cfg = _write_config(tmp_path, "sweeps.grid(config=['cifar10-4-384'], **{'model.T': [1, 2]})")
  points = sweeps.get_points(cfg, 'tiny', validate=False)
  assert points[0].config.paper_top1 == 95.19
  sweeps.write_manifest(cfg, 'tiny', str(tmp_path / 'sw'), points)
  manifest = json.loads((tmp_path / 'sw' / 'sweep.json').read_text())
  assert [p['paper_top1'] for p in manifest['points']] == [0.0, 0.0]
  assert manifest['config'] == cfg


def test_jax_flags_become_environment_variables_for_the_points(monkeypatch):
  from spikeformer_jax import cli  # pylint: disable=import-outside-toplevel

  for name in ('JAX_LOG_COMPILES', 'JAX_ENABLE_X64', 'JAX_DEFAULT_MATMUL_PRECISION'):
    monkeypatch.delenv(name, raising=False)
  rest = cli.jax_flags_to_env(
    [
      'run',
      '--jax_log_compiles',
      '--nojax_enable_x64',
      '--x=1',
      '--jax_default_matmul_precision=highest',
    ]
  )
  assert rest == ['run', '--x=1']
  assert (
    os.environ['JAX_LOG_COMPILES'],
    os.environ['JAX_ENABLE_X64'],
    os.environ['JAX_DEFAULT_MATMUL_PRECISION'],
  ) == ('true', 'false', 'highest')


def test_run_workdirs_and_unwritable_workdirs_are_refused(tmp_path):
  cfg = _write_config(tmp_path, "sweeps.grid(**{'model.T': [1]})")
  points = sweeps.get_points(cfg, 'tiny')
  for name in ('config.json', 'checkpoints'):  # what a finished train.py run leaves
    run_dir = tmp_path / f'run_{name}'
    (run_dir / 'checkpoints').mkdir(parents=True)
    if name == 'config.json':
      os.rmdir(run_dir / 'checkpoints')
      (run_dir / name).write_text('{"config": {}}')
    with pytest.raises(
      ValueError,
      match=rf'holds a train.py run \({name}\), not a sweep: use '
      r'another --workdir',
    ):
      sweeps.run(cfg, 'tiny', str(run_dir), runlocal=True, log=lambda _: None)
    assert sorted(os.listdir(run_dir)) == [name]  # nothing written into the run
  (tmp_path / 'file').write_text('')
  with pytest.raises(
    ValueError,
    match=r'cannot create the sweep directory .*file/sw \(Not a '
    r'directory\): use a --workdir in a folder you can write',
  ):
    sweeps.write_manifest(cfg, 'tiny', str(tmp_path / 'file' / 'sw'), points)


def test_a_config_with_variant_names_the_fix(tmp_path, capsys):
  cfg = _write_config(tmp_path, '[]')
  assert _sweep(['list', f'--config={cfg}:digits']) == 1
  assert capsys.readouterr().err.strip() == (
    f"error: config file '{cfg}:digits': sweeps take the config file without :VARIANT "
    f'(each point names its own); use --config={cfg}.'
  )
