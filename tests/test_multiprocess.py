"""Two real processes (jax.distributed over CPU collectives, 4 devices each)
train exactly like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT
from spikeformer_jax import config_lib, restore, train_lib
from spikeformer_jax import workdir as workdir_lib

ARGS = [
  '--config=configs/spikformer.py:cifar10-4-384,runlocal',
  '--config.total_steps=6',
  '--config.log_every_steps=1',
  '--config.ckpt_every_steps=3',
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _losses(wd):
  rows = [json.loads(line) for line in (wd / 'metrics.jsonl').read_text().splitlines()]
  return [r['train_loss'] for r in rows if 'train_loss' in r]


def _config():
  """ARGS as a config: what train.py hands train_lib."""
  from spikeformer_jax.configs import spikformer  # pylint: disable=import-outside-toplevel

  return config_lib.apply_overrides(
    spikformer.get_config('cifar10-4-384,runlocal'),
    {'total_steps': 6, 'log_every_steps': 1, 'ckpt_every_steps': 3},
  )


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  # The one-process reference and the one-device evaluation run here, in this
  # process of 8 devices (train.py and eval.py are thin: test_train's CLI test).
  assert jax.device_count() == 8
  one = tmp_path / 'one'
  train_lib.train_and_evaluate(_config(), str(one))

  two = tmp_path / 'two'
  port = _free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='4')
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        'train.py',
        f'--workdir={two}',
        *ARGS,
        '--multihost',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [pr.communicate(timeout=600) for pr in procs]
  except subprocess.TimeoutExpired:
    for pr in procs:  # a hung peer would outlive the test
      pr.kill()
    outs = [pr.communicate() for pr in procs]
  # Both processes' output: the first to fail is often the other one's cause.
  assert [pr.returncode for pr in procs] == [0, 0], '\n'.join(
    f'--- process {i} (exit {pr.returncode}):\n{err[-3000:]}'
    for i, (pr, (_, err)) in enumerate(zip(procs, outs))
  )
  run = json.loads((two / 'config.json').read_text())['run']
  assert run['processes'] == 2 and run['devices'] == 8
  assert len(_losses(two)) == 6
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-6, atol=1e-6)
  a = json.loads((one / 'final_metrics.json').read_text())
  b = json.loads((two / 'final_metrics.json').read_text())
  assert b['test_examples'] == a['test_examples']
  np.testing.assert_allclose(b['test_loss'], a['test_loss'], rtol=1e-5)
  # The 2-process checkpoint restores onto one device of one process.
  res = restore.evaluate_checkpoint(workdir_lib.load_run_config(str(two)), str(two), num_devices=1)
  assert res['step'] == 6
  np.testing.assert_allclose(res['loss'], b['test_loss'], rtol=1e-5)
