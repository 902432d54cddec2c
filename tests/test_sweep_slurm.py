"""Sweeps on SLURM (`sweep.py run --launcher=slurm`) and devices of local points.

- A 4-point sweep through a real SLURM (the `slurm` fixture: a private
  one-node cluster, tests/slurm_cluster.py), each point a real training run
  on one CPU device: one point fails (its data file is not there yet), is
  recorded failed with its log named; once the file exists, a detached `run`
  submits that point only; `collect` tabulates the half-done sweep; a second
  `run` does not submit the point again (it is in SLURM) and waits for it.
- The options' mistakes in one line; the array's sbatch script.
- `--parallel` on a host with GPUs or TPU chips: each point's devices
  (`sweeps.placement`, a pure function), how they are counted without JAX,
  and the local runner giving each running point its own.
"""

import csv
import json
import os
import signal
import sys

import numpy as np
import pytest

from spikeformer_jax import cli, errors, sweeps
from spikeformer_jax import sweep  # the command line


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
  """`sweep.py run` in this process sets SIGTERM / SIGHUP handlers for itself."""
  saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
  yield
  for s, handler in saved.items():
    signal.signal(s, handler)


def _sweep(argv) -> int:
  """`python sweep.py *argv`, in this process: its exit status."""
  return cli.call(sweep.main, ['sweep.py', *argv])


def _write_config(tmp_path, points_src: str) -> str:
  """A sweep 'tiny' of Spikformer's cifar10-4-384 (`--runlocal`: depth 1,
  width 32, T 2 on 64 synthetic 32x32 images)."""
  path = tmp_path / 'tiny_sweep.py'
  path.write_text(
    'from spikeformer_jax.configs import spikformer as base\n'
    'from spikeformer_jax import sweeps\n'
    "def get_config(arg='cifar10-4-384'):\n"
    '  return base.get_config(arg)\n'
    "SWEEPS = ('tiny',)\n"
    'def get_sweep(name):\n'
    f'  return {points_src}\n'
  )
  return str(path)


def _rows(wd) -> dict[str, dict]:
  with open(wd / 'results.csv', encoding='utf-8') as f:
    return {r['point']: r for r in csv.DictReader(f)}


# --------------------------------------------------------------------------
# Through a real SLURM.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_through_slurm_fails_a_point_resubmits_it_alone_and_collects(
  slurm, tmp_path, monkeypatch, capsys
):
  data = tmp_path / 'data.npz'  # the fourth point's data: not there yet
  cfg = _write_config(
    tmp_path,
    "sweeps.chain(sweeps.grid(seed=[1, 2, 3]), "
    f"[{{'name': 'npz', 'data.name': 'npz', 'data.path': {str(data)!r}}}])",
  )
  wd = tmp_path / 'wd'
  # sbatch passes this environment on to the tasks: one CPU device per point.
  monkeypatch.setenv('SLURM_CONF', slurm.env['SLURM_CONF'])
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '1')
  monkeypatch.setattr(sweeps, 'POLL_MAX_S', 1.0)
  args = [
    f'--config={cfg}',
    '--sweep=tiny',
    f'--workdir={wd}',
    '--runlocal',
    '--set=total_steps=1',
    '--launcher=slurm',
    '--parallel=4',  # with --launcher=slurm: at most 4 tasks at a time (%4)
    '--slurm_cpus_per_point=1',
    '--slurm_time=20:00',
  ]
  seeds = ('seed=1', 'seed=2', 'seed=3')

  assert _sweep(['run', *args]) == 1
  out = capsys.readouterr().out
  assert '3/4 points finished; not finished: npz (failed).' in out
  status = json.loads((wd / 'status.json').read_text())
  assert {p: status[p]['status'] for p in status} == {
    'seed=1': 'finished',
    'seed=2': 'finished',
    'seed=3': 'finished',
    'npz': 'failed',
  }
  # One array, a task per point; the failed point's log is named, with why.
  (job,) = {status[p]['job'].split('_')[0] for p in status}
  assert sorted(status[p]['job'] for p in status) == [f'{job}_{i}' for i in range(4)]
  assert status['npz']['log'] == str(wd / 'npz' / 'sweep.log')
  assert status['npz']['returncode'] == 1 and 'does not exist' in status['npz']['error']
  assert f'data.path={str(data)!r} does not exist' in (wd / 'npz' / 'sweep.log').read_text()
  failed_line = next(line for line in out.splitlines() if line.startswith('[FAILED] npz'))
  assert failed_line.startswith('[FAILED] npz (exit 1): error: data.path=')
  script = (wd / 'slurm' / f'{job}.sbatch').read_text()
  for line in ('#SBATCH --array=0-3%4', '#SBATCH --cpus-per-task=1', '#SBATCH --time=20:00'):
    assert line in script.splitlines()
  trained = {p: (wd / p / 'final_metrics.json').stat().st_mtime_ns for p in seeds}

  # The data file appears: a detached run submits the failed point alone,
  # held in the queue (an extra sbatch line) so that it is still there below.
  rng = np.random.default_rng(0)
  np.savez(
    data,
    x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
    y_train=rng.integers(0, 10, 64),
    x_test=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
    y_test=rng.integers(0, 10, 32),
  )
  assert _sweep(['run', *args, '--detach', '--slurm_sbatch=--hold']) == 0
  out = capsys.readouterr().out
  assert '[skip] seed=1: finished' in out and '3/4 points finished, 1 in SLURM.' in out
  queued = json.loads((wd / 'status.json').read_text())['npz']
  again = queued['job'].split('_')[0]
  assert queued['status'] == 'queued' and queued['job'] == f'{again}_0' and again != job
  script = (wd / 'slurm' / f'{again}.sbatch').read_text().splitlines()
  assert '#SBATCH --array=0-0%4' in script and '#SBATCH --hold' in script
  assert script[script.index('POINTS=(') + 1 :][:2] == ["  'npz'", ')']

  # `collect` on the half-done sweep: the point in SLURM is shown as queued.
  assert _sweep(['collect', f'--workdir={wd}']) == 0
  assert '4 points; wrote' in capsys.readouterr().out
  rows = _rows(wd)
  assert rows['npz']['status'] == 'queued' and rows['npz']['test_top1'] == ''
  assert all(rows[p]['status'] == 'finished' and rows[p]['test_top1'] for p in seeds)

  # Running it again submits nothing: the point is queued under that job.
  assert _sweep(['run', *args, '--detach']) == 0
  out = capsys.readouterr().out
  assert f'[busy] npz: pending as SLURM task {again}_0; not submitted again' in out
  assert '[submitted]' not in out
  assert sorted(f.name for f in (wd / 'slurm').glob('*.sbatch')) == [
    f'{job}.sbatch',
    f'{again}.sbatch',
  ]

  # Released, the point runs; a waiting `run` picks it up and reports it.
  slurm.run('scontrol', 'release', again)
  assert _sweep(['run', *args]) == 0
  out = capsys.readouterr().out
  assert '[busy] npz' in out and '[done] npz' in out and '4/4 points finished.' in out
  assert '[submitted]' not in out
  status = json.loads((wd / 'status.json').read_text())
  assert status['npz']['status'] == 'finished' and status['npz']['job'] == f'{again}_0'
  assert {p: (wd / p / 'final_metrics.json').stat().st_mtime_ns for p in seeds} == trained
  rows = sweeps.collect(str(wd))
  assert len(rows) == 4 and all(r['status'] == 'finished' and r['steps'] == 1 for r in rows)
  assert all(0 <= r['test_top1'] <= 1 for r in rows)


# --------------------------------------------------------------------------
# The options, the script (no cluster needed).
# --------------------------------------------------------------------------


def test_slurm_options_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
  cfg = _write_config(tmp_path, "sweeps.grid(seed=[1, 2])")
  base = ['run', f'--config={cfg}', '--sweep=tiny', f'--workdir={tmp_path / "wd"}']
  cases = [
    (['--slurm_partition=gpu'], 2, '--slurm_partition: only `run --launcher=slurm` takes it.'),
    (['--detach'], 2, '--detach: only `run --launcher=slurm` takes it.'),
    (['--launcher=pbs'], 2, "--launcher"),
    (['--launcher=slurm', '--slurm_time=4h'], 1, "--slurm_time='4h' is not a SLURM time limit"),
    (['--launcher=slurm', '--slurm_gpus_per_point=-1'], 1, '--slurm_gpus_per_point=-1: give'),
    (['--launcher=slurm', '--slurm_partition=a b'], 1, "--slurm_partition='a b' is not a"),
    (['--launcher=slurm', '--slurm_sbatch=mem=4G'], 1, "--slurm_sbatch='mem=4G' is not an sbatch"),
    (
      ['--launcher=slurm', '--slurm_sbatch=#SBATCH --array=0-9'],
      1,
      '--array itself (one array task per unfinished point); leave it out.',
    ),
  ]
  for extra, code, message in cases:
    assert _sweep([*base, *extra]) == code, extra
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, (extra, err)
  # No SLURM commands here: the fix, in one line, before anything is written.
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  assert _sweep([*base, '--launcher=slurm']) == 1
  err = capsys.readouterr().err.strip()
  assert err.splitlines() == [
    'error: --launcher=slurm: sbatch and squeue not found on PATH; run on a machine that '
    "submits SLURM jobs (a login node) or add SLURM's bin directory to PATH, or use "
    '--launcher=local.'
  ]
  assert not (tmp_path / 'wd').exists()
  # `commands` keeps working (and takes no SLURM flag).
  monkeypatch.undo()
  assert _sweep(['commands', f'--config={cfg}', '--sweep=tiny', f'--workdir={tmp_path}/c']) == 0
  assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_the_array_script_runs_each_point_as_the_local_runner_would(tmp_path):
  options = sweeps.SlurmOptions(
    partition='gpu',
    time='2-00:00:00',
    gpus_per_point=2,
    cpus_per_point=8,
    sbatch=('--mem=32G', '#SBATCH --qos=high'),
    at_once=3,
  )
  options.check()
  script = sweeps.slurm_script(
    '/c/x.py',
    'lr',
    '/s/wd',
    ["T=4,lr=0.001", "it's"],
    options,
    '/s/wd/slurm/%A_%a.out',
    common={'total_steps': 8},
    runlocal=True,
  ).splitlines()
  assert script[0] == '#!/bin/bash'
  for line in (
    '#SBATCH --job-name=sweep-lr',
    '#SBATCH --array=0-1%3',
    '#SBATCH --ntasks=1',
    '#SBATCH --output=/s/wd/slurm/%A_%a.out',
    '#SBATCH --partition=gpu',
    '#SBATCH --time=2-00:00:00',
    '#SBATCH --gres=gpu:2',
    '#SBATCH --cpus-per-task=8',
    '#SBATCH --mem=32G',
    '#SBATCH --qos=high',
  ):
    assert line in script, line
  points = script.index('POINTS=(')
  assert script[points + 1 : points + 4] == ["  'T=4,lr=0.001'", "  'it'\\''s'", ')']
  assert script[-1] == (
    f"exec '{sys.executable}' '-m' 'spikeformer_jax.sweep' 'task' '--config=/c/x.py' "
    "'--sweep=lr' '--workdir=/s/wd' '--set=total_steps=8' '--runlocal' "
    '--point="${POINTS[$SLURM_ARRAY_TASK_ID]}"'
  )
  # The defaults ask for nothing the cluster does not give by default.
  plain = sweeps.slurm_script('/c/x.py', 'lr', '/s/wd', ['a'], sweeps.SlurmOptions(), 'o')
  assert not any(w in plain for w in ('--partition', '--time', '--gres', '--cpus-per-task', '%'))
  with pytest.raises(errors.ConfigError, match=r"--slurm_time='1:2:3:4'"):
    sweeps.SlurmOptions(time='1:2:3:4').check()
  for ok in ('90', '4:00:00', '2-12', '2-12:30', 'UNLIMITED'):
    sweeps.SlurmOptions(time=ok).check()


def _fake_point(monkeypatch, script: str):
  """Every point's process replaced by `python -c script` (POINT_DIR: its directory)."""
  monkeypatch.setattr(
    sweeps,
    'point_command',
    lambda _c, _s, point, pdir, *a: [sys.executable, '-c', script.replace('POINT_DIR', pdir)],
  )


_FINISH = (
  "import json; json.dump({'steps': 1, 'total_steps': 1, 'test_top1': 0.5}, "
  "open('POINT_DIR/final_metrics.json', 'w')); print('final: done')"
)


def test_a_task_records_how_its_point_ended(tmp_path, monkeypatch):
  """`sweep.py task` (what each array task runs): the point's output into its
  sweep.log, how it ended into its own record, its exit status passed on."""
  cfg = _write_config(tmp_path, "sweeps.grid(seed=[1])")
  wd = tmp_path / 'wd'
  _fake_point(monkeypatch, _FINISH)
  assert sweeps.run_task(cfg, 'tiny', 'seed=1', str(wd), job='7_0') == 0
  record = json.loads((wd / 'seed=1' / sweeps.TASK_RECORD).read_text())
  assert record['status'] == 'finished' and record['job'] == '7_0'
  assert (wd / 'seed=1' / 'sweep.log').read_text() == 'final: done\n'
  os.remove(wd / 'seed=1' / 'final_metrics.json')
  _fake_point(monkeypatch, "print('preempted (SIGTERM) at step 1/4: saved.'); exit(143)")
  before = signal.getsignal(signal.SIGTERM)
  assert sweeps.run_task(cfg, 'tiny', 'seed=1', str(wd), job='8_0') == 143
  assert signal.getsignal(signal.SIGTERM) == before
  record = json.loads((wd / 'seed=1' / sweeps.TASK_RECORD).read_text())
  assert (record['status'], record['returncode'], record['job']) == ('preempted', 143, '8_0')
  assert record['log'] == str(wd / 'seed=1' / 'sweep.log')
  assert 'preempted (SIGTERM)' in record['error']


def test_run_slurm_keeps_each_points_state_true(tmp_path, monkeypatch):
  """`run --launcher=slurm`'s bookkeeping with sbatch and squeue replaced: a
  point's end is read from its task's record, a task still in SLURM is busy
  (not submitted again), one SLURM forgot without a record is failed, naming
  its log, and submitted again; `collect` shows the points in SLURM."""
  cfg = _write_config(tmp_path, "sweeps.grid(seed=[1, 2, 3])")
  wd = tmp_path / 'wd'
  scripts, queue = [], []
  monkeypatch.setattr(sweeps, 'need_slurm', lambda: None)
  monkeypatch.setattr(
    sweeps, '_submit', lambda script, *_: scripts.append(script) or str(100 + len(scripts))
  )

  def squeue(jobs, _env):
    step = queue.pop(0)
    return step() if callable(step) else step

  monkeypatch.setattr(sweeps, '_squeue', squeue)
  monkeypatch.setattr(sweeps, 'POLL_MAX_S', 0.01)
  log = []
  result = sweeps.run_slurm(cfg, 'tiny', str(wd), detach=True, log=log.append)
  assert result == {'seed=1': 'queued', 'seed=2': 'queued', 'seed=3': 'queued'}
  assert log[0] == f'[submitted] 3 points as SLURM job array 101 (script: {wd}/slurm/101.sbatch)'
  assert log[1:] == [f'[queued] seed={i + 1}: SLURM task 101_{i}' for i in range(3)]
  assert sweeps.collect(str(wd))[0]['status'] == 'queued'

  # Meanwhile task 0 finished, task 1 runs, task 2 ended with no record.
  (wd / 'seed=1').mkdir()
  (wd / 'seed=1' / 'final_metrics.json').write_text('{"steps": 1, "total_steps": 1}')
  (wd / 'seed=1' / sweeps.TASK_RECORD).write_text(
    json.dumps({'status': 'finished', 'job': '101_0', 'seconds': 3.0, 'error': ''})
  )
  (wd / 'seed=2').mkdir()
  (wd / 'seed=2' / sweeps.TASK_RECORD).write_text('{"status": "running", "job": "101_1"}')
  by = {r['point']: r['status'] for r in sweeps.collect(str(wd))}
  assert by == {'seed=1': 'finished', 'seed=2': 'running', 'seed=3': 'queued'}
  queue.append({'101_1': 'RUNNING'})
  log.clear()
  result = sweeps.run_slurm(cfg, 'tiny', str(wd), detach=True, log=log.append)
  assert result == {'seed=1': 'finished', 'seed=2': 'busy', 'seed=3': 'queued'}
  assert log[:4] == [
    '[skip] seed=1: finished',
    '[busy] seed=2: running as SLURM task 101_1; not submitted again',
    f'[FAILED] seed=3: SLURM task 101_2 ended without recording how its point ended '
    f'(cancelled, out of time or memory, or its node failed); see {wd}/seed=3/sweep.log '
    f'and {wd}/slurm/101_2.out',
    f'[submitted] 1 point as SLURM job array 102 (script: {wd}/slurm/102.sbatch)',
  ]
  assert "POINTS=(\n  'seed=3'\n)" in scripts[1]

  # A waiting run: seed=2 ends preempted, seed=3 finishes, each by its record.
  def seed2_ends():
    (wd / 'seed=2' / sweeps.TASK_RECORD).write_text(
      json.dumps(
        {'status': 'preempted', 'job': '101_1', 'returncode': 143, 'error': 'saved.', 'log': 'L'}
      )
    )
    return {'102_0': 'PENDING'}

  def seed3_ends():
    (wd / 'seed=3').mkdir()
    (wd / 'seed=3' / 'final_metrics.json').write_text('{"steps": 1, "total_steps": 1}')
    (wd / 'seed=3' / sweeps.TASK_RECORD).write_text('{"status": "finished", "job": "102_0"}')
    return {}

  queue[:] = [
    {'101_1': 'RUNNING', '102_0': 'PENDING'},
    seed2_ends,
    {'102_0': 'RUNNING'},
    seed3_ends,
  ]
  log.clear()
  result = sweeps.run_slurm(cfg, 'tiny', str(wd), log=log.append)
  assert result == {'seed=1': 'finished', 'seed=2': 'preempted', 'seed=3': 'finished'}
  assert log[-5:] == [
    '[busy] seed=2: running as SLURM task 101_1; not submitted again',
    '[busy] seed=3: pending as SLURM task 102_0; not submitted again',
    '[PREEMPTED] seed=2 (exit 143): saved.',
    '[running] seed=3 (SLURM task 102_0)',
    '[done] seed=3',
  ]
  assert not queue and len(scripts) == 2
  status = json.loads((wd / 'status.json').read_text())
  assert status['seed=2'] == {
    'status': 'preempted',
    'job': '101_1',
    'returncode': 143,
    'error': 'saved.',
    'log': 'L',
    'submitted': status['seed=2']['submitted'],
  }


# --------------------------------------------------------------------------
# Devices of local points.
# --------------------------------------------------------------------------


def _gpus(n, source='test'):
  return sweeps.Devices('GPU', tuple(str(i) for i in range(n)), source)


def test_placement_gives_each_point_its_own_devices():
  envs, line = sweeps.placement(_gpus(8), 4)
  assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == ['0,1', '2,3', '4,5', '6,7']
  assert line == (
    '[devices] 8 GPUs (test), --parallel=4: each point runs on 2 of its own '
    '(CUDA_VISIBLE_DEVICES=0,1 | 2,3 | 4,5 | 6,7)'
  )
  envs, line = sweeps.placement(_gpus(8), 3)
  assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == ['0,1', '2,3', '4,5']
  assert line.endswith('(CUDA_VISIBLE_DEVICES=0,1 | 2,3 | 4,5; 2 unused)')
  # An existing CUDA_VISIBLE_DEVICES list is split, not renumbered.
  visible = sweeps.Devices('GPU', ('3', '5', 'GPU-8c1e'), 'CUDA_VISIBLE_DEVICES')
  envs, _ = sweeps.placement(visible, 3)
  assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == ['3', '5', 'GPU-8c1e']
  # Too few: as before (every point sees them all), and the line says so.
  assert sweeps.placement(_gpus(2), 4) == (
    [],
    '[devices] 2 GPUs (test), --parallel=4: too few for one each; every point sees all 2 '
    '(--parallel=2 or less gives each point its own)',
  )
  # CPU, or one point at a time: nothing changes, nothing is said.
  assert sweeps.placement(None, 4) == ([], '')
  assert sweeps.placement(_gpus(8), 1) == ([], '')
  # TPU chips: blocks libtpu takes (1, 2, 4, 8), a process grid of one, own ports.
  chips = sweeps.Devices('TPU', tuple('01234567'), 'the PCI bus')
  envs, line = sweeps.placement(chips, 3)
  assert [e['TPU_VISIBLE_CHIPS'] for e in envs] == ['0,1', '2,3', '4,5']
  assert envs[1] == {
    'TPU_VISIBLE_CHIPS': '2,3',
    'TPU_CHIPS_PER_PROCESS_BOUNDS': '1,2,1',
    'TPU_PROCESS_BOUNDS': '1,1,1',
    'TPU_PROCESS_PORT': str(sweeps.TPU_FIRST_PORT + 1),
    'TPU_PROCESS_ADDRESSES': f'localhost:{sweeps.TPU_FIRST_PORT + 1}',
    'CLOUD_TPU_TASK_ID': '0',
    'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
  }
  assert line.startswith('[devices] 8 TPU chips (the PCI bus), --parallel=3: each point runs on 2')
  envs, _ = sweeps.placement(sweeps.Devices('TPU', tuple('01234567'), 't'), 2)
  assert [(e['TPU_VISIBLE_CHIPS'], e['TPU_CHIPS_PER_PROCESS_BOUNDS']) for e in envs] == [
    ('0,1,2,3', '2,2,1'),
    ('4,5,6,7', '2,2,1'),
  ]


def test_local_devices_are_counted_without_jax(tmp_path):
  assert sweeps.local_devices({}, root=str(tmp_path)) is None  # a CPU host
  gpus = tmp_path / 'proc' / 'driver' / 'nvidia' / 'gpus'
  for bus in ('0000:01:00.0', '0000:41:00.0', '0000:81:00.0', '0000:c1:00.0'):
    (gpus / bus).mkdir(parents=True)
  assert sweeps.local_devices({}, root=str(tmp_path)) == sweeps.Devices(
    'GPU', ('0', '1', '2', '3'), '/proc/driver/nvidia/gpus'
  )
  # An existing list is honoured; '' or -1 hides them all; JAX_PLATFORMS=cpu rules them out.
  env = {'CUDA_VISIBLE_DEVICES': '2,3'}
  assert sweeps.local_devices(env, root=str(tmp_path)).ids == ('2', '3')
  assert sweeps.local_devices({'CUDA_VISIBLE_DEVICES': '0,-1,1'}, str(tmp_path)).ids == ('0',)
  assert sweeps.local_devices({'CUDA_VISIBLE_DEVICES': ''}, root=str(tmp_path)) is None
  assert sweeps.local_devices({'JAX_PLATFORMS': 'cpu'}, root=str(tmp_path)) is None
  assert sweeps.local_devices({'JAX_PLATFORMS': 'cuda,cpu'}, str(tmp_path)).kind == 'GPU'
  # TPU chips: Google's PCI vendor id and a TPU device id, as JAX counts them.
  tpu = tmp_path / 'tpu'
  for i, (vendor, device) in enumerate(
    [('0x1ae0', '0x0063')] * 4 + [('0x1ae0', '0x0001'), ('0x8086', '0x0063')]
  ):
    d = tpu / 'sys' / 'bus' / 'pci' / 'devices' / f'0000:00:0{i}.0'
    d.mkdir(parents=True)
    (d / 'vendor').write_text(vendor + '\n')
    (d / 'device').write_text(device + '\n')
  assert sweeps.local_devices({}, root=str(tpu)) == sweeps.Devices(
    'TPU', ('0', '1', '2', '3'), 'the PCI bus'
  )
  assert sweeps.local_devices({'TPU_VISIBLE_CHIPS': '2,3'}, str(tpu)).ids == ('2', '3')
  assert sweeps.local_devices({'JAX_PLATFORMS': 'cpu'}, root=str(tpu)) is None


def test_parallel_local_points_each_run_on_their_own_gpus(tmp_path, monkeypatch):
  cfg = _write_config(tmp_path, "sweeps.grid(seed=[1, 2, 3, 4])")
  # Points replaced by a script that records the GPUs it was given, and
  # finishes; four GPUs, two points at once: two each.
  monkeypatch.setattr(
    sweeps,
    'point_command',
    lambda _c, _s, point, pdir, *a: [
      sys.executable,
      '-c',
      'import json, os\n'
      f"open({os.path.join(pdir, 'gpus')!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])\n"
      "json.dump({'steps': 1, 'total_steps': 1}, "
      f"open({os.path.join(pdir, 'final_metrics.json')!r}, 'w'))",
    ],
  )
  monkeypatch.setattr(sweeps, 'local_devices', lambda: _gpus(4, 'nvidia-smi -L'))
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', 'all of them')  # what a point sees unplaced
  wd = tmp_path / 'wd'
  log = []
  result = sweeps.run(cfg, 'tiny', str(wd), parallel=2, log=log.append)
  assert set(result.values()) == {'finished'}
  assert log[0] == (
    '[devices] 4 GPUs (nvidia-smi -L), --parallel=2: each point runs on 2 of its own '
    '(CUDA_VISIBLE_DEVICES=0,1 | 2,3)'
  )
  given = [(wd / f'seed={i}' / 'gpus').read_text() for i in (1, 2, 3, 4)]
  assert set(given) <= {'0,1', '2,3'}
  # One point at a time: every point sees what the sweep sees, as before.
  for i in (1, 2, 3, 4):
    os.remove(wd / f'seed={i}' / 'final_metrics.json')
  log.clear()
  sweeps.run(cfg, 'tiny', str(wd), log=log.append)
  assert not any(line.startswith('[devices]') for line in log)
  assert {(wd / f'seed={i}' / 'gpus').read_text() for i in (1, 2, 3, 4)} == {'all of them'}
