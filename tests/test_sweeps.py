"""Sweeps: declaration forms, validation before running, run / skip / resume /
failure recording with real train.py processes, and the collected table."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from spikeformer_jax import sweeps


def test_grid_zipped_product_chain():
  g = sweeps.grid(**{'model.T': [1, 2], 'model.neuron.surrogate': ['sigmoid', 'atan']})
  assert g == [{'model.T': 1, 'model.neuron.surrogate': 'sigmoid'},
               {'model.T': 1, 'model.neuron.surrogate': 'atan'},
               {'model.T': 2, 'model.neuron.surrogate': 'sigmoid'},
               {'model.T': 2, 'model.neuron.surrogate': 'atan'}]
  z = sweeps.zipped(config=['a', 'b'], **{'model.depth': [2, 4]})
  assert z == [{'config': 'a', 'model.depth': 2}, {'config': 'b', 'model.depth': 4}]
  with pytest.raises(ValueError, match='different lengths'):
    sweeps.zipped(a=[1, 2], b=[1])
  p = sweeps.product(sweeps.grid(x=[1, 2]), [{'epochs': 8}])
  assert p == [{'x': 1, 'epochs': 8}, {'x': 2, 'epochs': 8}]
  assert sweeps.chain([{'a': 1}], [{'b': 2}]) == [{'a': 1}, {'b': 2}]
  assert sweeps.varying_keys(p) == ['x']
  assert sweeps.point_name({'config': 'cifar10-4-384', 'model.T': 4, 'optimizer.lr': 1e-3}) == \
      'cifar10-4-384,T=4,lr=0.001'


def test_random_search_is_seeded_and_in_range():
  space = {'optimizer.lr': sweeps.loguniform(1e-4, 1e-2), 'model.T': [1, 2, 4],
           'model.neuron.alpha': sweeps.uniform(2.0, 6.0), 'epochs': 3}
  a = sweeps.random_search(20, seed=3, **space)
  assert a == sweeps.random_search(20, seed=3, **space)
  assert a != sweeps.random_search(20, seed=4, **space)
  assert all(1e-4 <= p['optimizer.lr'] <= 1e-2 and p['model.T'] in (1, 2, 4)
             and 2 <= p['model.neuron.alpha'] <= 6 and p['epochs'] == 3 for p in a)
  assert len({p['model.T'] for p in a}) == 3


def _write_config(tmp_path, points_src):
  path = tmp_path / 'tiny_sweep.py'
  path.write_text(
      'from configs import spikformer as base\n'
      'from spikeformer_jax import sweeps\n'
      'get_config = base.get_config\n'
      "SWEEPS = ('tiny',)\n"
      'def get_sweep(name):\n'
      f'  return {points_src}\n')
  return str(path)


def test_invalid_points_are_rejected_before_anything_runs(tmp_path):
  cfg = _write_config(tmp_path, "[{'model.T': 2}, {'model.num_heads': 5}, "
                                "{'model.nope': 1}, {'model.T': 'four'}]")
  with pytest.raises(ValueError) as e:
    sweeps.run(cfg, 'tiny', str(tmp_path / 'wd'))
  msg = str(e.value)
  assert '3 of 4 sweep points are invalid (nothing was run)' in msg
  assert 'not divisible by num_heads 5' in msg
  assert "unknown config field 'model.nope'" in msg
  assert "model.T='four'" in msg
  assert not (tmp_path / 'wd').exists()
  with pytest.raises(ValueError, match="declares no sweep 'other'; declared: tiny"):
    sweeps.get_points(cfg, 'other')


def test_shipped_sweeps_expand_and_validate():
  expected = {'spikformer': {'timesteps': 12, 'attention': 15, 'attention-imagenet': 5,
                             'digits-small': 6},
              'a2os2a': {'table1': 8}, 'msvit': {'table3': 8}}
  for family, sizes in expected.items():
    path = os.path.join(ROOT, 'configs', f'{family}.py')
    for name, n in sizes.items():
      points = sweeps.get_points(path, name)
      assert len(points) == n and len({p.name for p in points}) == n, (family, name)
  t3 = {p.name: p.config.model for p in sweeps.get_points(
      os.path.join(ROOT, 'configs', 'msvit.py'), 'table3')}
  assert t3['mssa-pp'].attention == ('mssa', 'mssa', 'mssa')
  assert t3['mssa-pp'].mssa_kernels == ((1, 3), (1, 3), (3, 3))
  assert t3['q'].mssa_kernels[0] == (1, 0)
  assert t3['msvit'].attention == ('mssa', 'mssa', 'ssa')
  # Each paper point carries the paper's number; names leave it out.
  t5 = {p.name: p for p in sweeps.get_points(os.path.join(ROOT, 'configs', 'spikformer.py'),
                                             'timesteps')}
  assert t5['cifar100-4-384,T=6'].config.model.T == 6
  assert t5['cifar100-4-384,T=6'].config.paper_top1 == 78.61
  assert t5['imagenet-8-512,T=1'].config.paper_top1 == 70.14
  a1 = {p.name: p.config for p in sweeps.get_points(
      os.path.join(ROOT, 'configs', 'a2os2a.py'), 'table1')}
  assert a1['cifar100-2-512,attention=sdsa'].paper_top1 == 78.83
  assert a1['cifar10-2-256,attention=a2os2a'].model.attention == 'a2os2a'
  # --runlocal: the same points (names, overrides) on each config's smoke variant.
  local = sweeps.get_points(os.path.join(ROOT, 'configs', 'a2os2a.py'), 'table1', runlocal=True)
  assert [p.name for p in local] == list(a1)
  assert all(p.config_arg.endswith(',runlocal') and p.config.data.name == 'synthetic'
             and p.config.model.depth == 1 for p in local)
  assert local[1].config.model.attention == 'a2os2a'


def test_run_skips_finished_resumes_interrupted_records_failures(tmp_path):
  cfg = _write_config(
      tmp_path, "sweeps.chain(sweeps.grid(**{'model.T': [1, 2]}), "
                "[{'name': 'broken', 'data.name': 'npz', 'data.path': '/nonexistent.npz'}])")
  wd = tmp_path / 'wd'
  common = {'total_steps': 4, 'ckpt_every_steps': 2, 'eval_every_epochs': 0,
            'log_every_steps': 2}
  # An interrupted point: T=1 as killed after its step-2 checkpoint (the same
  # run, with its step-4 checkpoint and final metrics removed).
  pre = subprocess.run(sweeps.point_command(cfg, 'tiny', 'T=1', str(wd / 'T=1'), common),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert pre.returncode == 0, pre.stderr[-2000:]
  assert sorted(os.listdir(wd / 'T=1' / 'checkpoints')) == ['2', '4']
  shutil.rmtree(wd / 'T=1' / 'checkpoints' / '4')
  os.remove(wd / 'T=1' / 'final_metrics.json')
  assert sweeps.point_status(str(wd / 'T=1')) == 'interrupted'

  log = []
  result = sweeps.run(cfg, 'tiny', str(wd), common=common, log=log.append)
  assert result == {'T=1': 'finished', 'T=2': 'finished', 'broken': 'failed'}
  assert '[resume] T=1' in log and '[start] T=2' in log
  resumed = json.loads((wd / 'T=1' / 'final_metrics.json').read_text())
  assert resumed['steps'] == 4 and resumed['steps_this_run'] == 2
  status = json.loads((wd / 'status.json').read_text())
  assert status['broken']['status'] == 'failed' and status['broken']['returncode'] == 1
  assert '/nonexistent.npz' in status['broken']['error']

  before = (wd / 'T=2' / 'final_metrics.json').stat().st_mtime_ns
  log.clear()
  result = sweeps.run(cfg, 'tiny', str(wd), common=common, log=log.append)
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

  cli = subprocess.run([sys.executable, 'sweep.py', 'collect', f'--workdir={wd}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert cli.returncode == 0 and '3 points; wrote' in cli.stdout
  cmds = subprocess.run([sys.executable, 'sweep.py', 'commands', f'--config={cfg}',
                         '--sweep=tiny', f'--workdir={wd}', '--set', 'total_steps=4'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert cmds.returncode == 0, cmds.stderr
  lines = cmds.stdout.strip().splitlines()
  assert len(lines) == 3 and all('sweep.py point' in l and '--set=total_steps=4' in l
                                 for l in lines)

  # Changing a point's config under a trained point is refused, never mixed.
  changed = {**common, 'total_steps': 6}
  with pytest.raises(ValueError, match=r'trained with other values of total_steps; delete'):
    sweeps.run_point(cfg, 'tiny', 'T=1', str(wd / 'T=1'), changed)
  log.clear()
  result = sweeps.run(cfg, 'tiny', str(wd), common=changed, log=log.append)
  assert result == {'T=1': 'conflict', 'T=2': 'conflict', 'broken': 'failed'}
  assert any(l.startswith('[CONFLICT] T=2:') and 'total_steps' in l for l in log)
  assert (wd / 'T=2' / 'final_metrics.json').stat().st_mtime_ns == before
  conflicted = {r['point']: r for r in sweeps.collect(str(wd))}['T=1']
  assert conflicted['status'] == 'conflict' and conflicted['test_top1'] is None  # not mixed in
  # A workdir holds one sweep.
  with pytest.raises(ValueError, match="holds sweep 'tiny'.*use another --workdir"):
    sweeps.write_manifest(cfg, 'other', str(wd), [])


def test_common_overrides_fill_in_but_points_keep_their_own(tmp_path):
  cfg = _write_config(tmp_path, "sweeps.grid(**{'model.T': [1, 2]})")
  points = sweeps.get_points(cfg, 'tiny', {'model.T': 5, 'epochs': 3})
  assert [(p.name, p.config.model.T, p.config.epochs) for p in points] == \
      [('T=1', 1, 3), ('T=2', 2, 3)]


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
