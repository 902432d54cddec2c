"""Never lose a run: SIGTERM checkpoints and exits; kill -9 then rerun resumes;
both end with parameters bit-identical to an uninterrupted run (real
train.py processes)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

from conftest import ROOT

ARGS = ['--config=configs/spikformer.py:digits', '--config.total_steps=30',
        '--config.ckpt_every_steps=5', '--config.log_every_steps=1',
        '--config.eval_every_epochs=0']
ENV = dict(os.environ, JAX_NUM_CPU_DEVICES='1')


def _cmd(wd):
  return [sys.executable, 'train.py', f'--workdir={wd}', *ARGS]


def _run(wd):
  p = subprocess.run(_cmd(wd), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def _logged_step(wd) -> int:
  try:
    lines = (wd / 'metrics.jsonl').read_text().splitlines()
    return max((json.loads(l)['step'] for l in lines if l.strip()), default=0)
  except (OSError, json.JSONDecodeError):
    return 0


def _start_and_wait(wd, until_step):
  proc = subprocess.Popen(_cmd(wd), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while _logged_step(wd) < until_step:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, 'training did not reach the step in time'
    time.sleep(0.05)
  return proc


def _params(wd, step):
  tree = ocp.PyTreeCheckpointer().restore(str(wd / 'checkpoints' / str(step) / 'state'))
  return {'/'.join(map(str, k)): np.asarray(v)
          for k, v in _flatten(tree['params']) + _flatten(tree['batch_stats'])}


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    return [kv for k, v in tree.items() for kv in _flatten(v, prefix + (k,))]
  return [(prefix, tree)]


def test_sigterm_and_kill9_lose_nothing(tmp_path):
  base = tmp_path / 'uninterrupted'
  _run(base)
  want = _params(base, 30)
  want_final = json.loads((base / 'final_metrics.json').read_text())

  # SIGTERM (preemption): a checkpoint at the step reached, exit 143, no traceback.
  wd = tmp_path / 'preempted'
  proc = _start_and_wait(wd, 7)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert 'preempted (SIGTERM) at step' in err and 'Traceback' not in err
  stopped = int(err.split('preempted (SIGTERM) at step ')[1].split('/')[0])
  steps = sorted(int(s) for s in os.listdir(wd / 'checkpoints') if s.isdigit())
  assert 7 <= stopped < 30 and steps[-1] == stopped
  assert not (wd / 'final_metrics.json').exists()
  p = _run(wd)
  assert f'Resuming from {wd / "checkpoints"}/{stopped}' in p.stdout + p.stderr
  resumed = json.loads((wd / 'final_metrics.json').read_text())
  assert resumed['steps_this_run'] == 30 - stopped

  # kill -9 between checkpoints: the rerun resumes from the last committed one.
  wd9 = tmp_path / 'killed'
  proc = _start_and_wait(wd9, 13)
  proc.kill()
  proc.communicate(timeout=60)
  last = max(int(s) for s in os.listdir(wd9 / 'checkpoints') if s.isdigit())
  assert 10 <= last <= 15
  _run(wd9)
  killed = json.loads((wd9 / 'final_metrics.json').read_text())

  for run, final in ((wd, resumed), (wd9, killed)):
    got = _params(run, 30)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{run.name}: {k}')
    assert final['test_loss'] == want_final['test_loss']
    # Every step logged exactly once, with the uninterrupted run's losses.
    rows = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    train = {r['step']: r['train_loss'] for r in rows if 'train_loss' in r}
    base_rows = [json.loads(l) for l in (base / 'metrics.jsonl').read_text().splitlines()]
    assert train == {r['step']: r['train_loss'] for r in base_rows if 'train_loss' in r}
    assert sorted(train) == list(range(1, 31))


def test_resume_drops_later_and_half_written_metric_lines(tmp_path):
  from spikeformer_jax import metrics  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x": 3}\n{"step": 4, "x"')
  w = metrics.MetricWriter(str(tmp_path), resume_step=2)
  w.write(3, x=30)
  w.close()
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  assert [(r['step'], r['x']) for r in rows] == [(1, 1), (2, 2), (3, 30)]
