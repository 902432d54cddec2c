"""Firing rates, operation counts, SOPs and energy (spikeformer_jax.analysis)."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from spikeformer_jax.configs import a2os2a as a2os2a_configs
from spikeformer_jax.configs import spikformer as spikformer_configs
from spikeformer_jax import analysis, flops, models


def _loud(model):
  """Scales the synaptic weights so that an untrained network fires throughout."""
  for _, m in nnx.iter_modules(model):
    if isinstance(m, (nnx.Linear, nnx.Conv)):
      m.kernel[...] = m.kernel[...] * 6
  return model


def _tiny_spikformer():
  c = spikformer_configs.get_config('cifar10-4-384,runlocal')  # depth 1, D 32, 2 heads, T 2
  return c, _loud(models.build_model(c.model))


def _inputs(n=4, seed=0):
  return np.random.default_rng(seed).normal(0, 1, (n, 32, 32, 3)).astype(np.float32)


@pytest.mark.slow
def test_rates_match_the_official_recordings(shared_dir, tmp_path):
  files = [
    shared_dir / 'fixtures' / f
    for f in ('spikformer_cifar.npz', 'sdt_cifar.npz', 'msvit_cifar.npz')
  ]
  files = [f for f in files if f.exists()]
  if not files:
    pytest.skip('no CIFAR fixtures in ../shared/fixtures')
  out = tmp_path / 'rates.json'
  env = dict(os.environ, JAX_ENABLE_X64='1', JAX_NUM_CPU_DEVICES='1')
  proc = subprocess.run(
    [sys.executable, 'tests/analysis_fixture_check.py', *map(str, files), '--json', str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for r in json.loads(out.read_text()):
    # Fixture README: spike rates |delta| <= 1e-12 (identical spike counts).
    assert r['worst'] <= 1e-12 and not r['only_official'] and not r['only_ours'], r
    assert r['logits_unchanged'] and r['layers'] >= 19, r


def test_operation_counts_equal_hand_computation():
  c, model = _tiny_spikformer()
  T, D, h, N = 2, 32, 2, 64  # CIFAR SPS: 32x32 convs, pool, 16x16 conv, pool -> 8x8 tokens
  rep = analysis.analyze(model, [_inputs()], T=T)
  macs = {r['layer']: r['macs'] for r in rep['layers']}
  k = 9  # 3x3 kernels
  expected = {
    'patch_embed.proj_conv': T * 32 * 32 * (D // 8) * k * 3,
    'patch_embed.proj_conv1': T * 32 * 32 * (D // 4) * k * (D // 8),
    'patch_embed.proj_conv2': T * 32 * 32 * (D // 2) * k * (D // 4),
    'patch_embed.proj_conv3': T * 16 * 16 * D * k * (D // 2),
    'patch_embed.rpe_conv': T * N * D * k * D,
    'block.0.attn.q_linear': T * N * D * D,
    'block.0.attn.Q K^T': T * h * N * N * (D // h),
    'block.0.attn.(Q K^T) V': T * h * N * N * (D // h),
    'block.0.attn.proj_linear': T * N * D * D,
    'block.0.mlp.fc1_linear': T * N * D * 4 * D,
    'block.0.mlp.fc2_linear': T * N * 4 * D * D,
    'head': D * 10,  # after the mean over tokens and time: once
  }
  for name, n in expected.items():
    assert macs[name] == n, name
  # The dense total equals the jaxpr count of every dot and convolution.
  x = jnp.asarray(_inputs(1))
  model.eval()
  assert rep['totals']['macs'] == flops.forward_flops(lambda x: model(x), x) // 2
  # Network order: the stem first, the products after Q/K/V and before proj.
  order = [r['layer'] for r in rep['layers']]
  assert order[0] == 'patch_embed.proj_conv' and order[-1] == 'head'
  assert (
    order.index('block.0.attn.v_linear')
    < order.index('block.0.attn.Q K^T')
    < order.index('block.0.attn.proj_linear')
  )


def test_sops_energy_and_totals_are_consistent():
  c, model = _tiny_spikformer()
  T = c.model.T
  rep = analysis.analyze(model, [_inputs(seed=1), _inputs(seed=2)], T=T)
  assert rep['examples'] == 8
  rows = rep['layers']
  first = rows[0]
  assert first['first'] and first['input'] == 'real' and first['op'] == 'MAC'
  assert first['energy_mj'] == pytest.approx(first['macs'] * 4.6e-9)
  spiking = [r for r in rows if r['input'] == 'binary']
  assert spiking and any(r['input_rate'] > 0.01 for r in spiking)
  for r in spiking:
    assert r['op'] == 'AC' and r['sops'] == pytest.approx(r['input_rate'] * r['macs'])
    assert r['energy_mj'] == pytest.approx(r['sops'] * 0.9e-9)
  # Spikformer's residual stream (x + attn(x)) holds spike sums: integer inputs.
  assert rows[[r['layer'] for r in rows].index('block.0.mlp.fc1_linear')]['input'] == 'integer'
  t = rep['totals']
  assert t['sops'] == pytest.approx(sum(r['sops'] for r in rows))
  assert t['energy_mj'] == pytest.approx(sum(r['energy_mj'] for r in rows))
  # Without spikes: one pass instead of T; the head (after the mean over T) runs once.
  head = rows[-1]
  assert head['layer'] == 'head' and not head['time_folded'] and rows[1]['time_folded']
  assert t['ann_macs'] == pytest.approx((t['macs'] - head['macs']) / T + head['macs'])
  assert t['ann_energy_mj'] == pytest.approx(t['ann_macs'] * 4.6e-9)
  assert 0 < t['energy_mj'] < t['ann_energy_mj']
  assert t['energy_with_memory_mj'] > t['energy_mj']
  # Per-timestep rates average to the overall rate; every neuron is reported.
  for v in rep['neurons'].values():
    assert np.mean(v['rate_per_t']) == pytest.approx(v['rate'])
  assert len(rep['neurons']) == 12
  # The 'ac' convention counts integer inputs as one accumulate per unit.
  rep_ac = analysis.analyze(
    model,
    [_inputs(seed=1), _inputs(seed=2)],
    T=T,
    conventions=analysis.Conventions(integer_inputs='ac'),
  )
  for r, r_ac in zip(rows, rep_ac['layers']):
    if r['input'] == 'integer':
      assert (
        r['op'] == 'MAC'
        and r_ac['op'] == 'AC'
        and r_ac['sops'] >= r_ac['input_rate'] * r_ac['macs']
      )
    else:
      assert r_ac['op'] == r['op'] and r_ac['sops'] == pytest.approx(r['sops'])
  with pytest.raises(ValueError, match="integer_inputs='x'"):
    analysis.Conventions(integer_inputs='x')
  # Outputs: JSON, CSVs and the markdown table.
  paths = analysis.write(rep, os.path.join(os.environ.get('TMPDIR', '/tmp'), f'an_{os.getpid()}'))
  assert json.load(open(paths['json']))['totals']['sops'] == pytest.approx(t['sops'])
  assert open(paths['table']).read().startswith('| layer | input | rate | op |')
  # layers.csv names each row's class (a bug once wrote 'Module' for every one).
  with open(paths['layers'], newline='') as f:
    types = {r['layer']: r['type'] for r in csv.DictReader(f)}
  assert types['patch_embed.proj_conv'] == 'Conv' and types['head'] == 'Linear'
  assert types['block.0.attn.q_linear'] == 'Linear' and types['block.0.attn.Q K^T'] == 'attention'
  assert set(types.values()) == {'Conv', 'Linear', 'attention'}, types
  # The analysed model itself is left as it was: no recorder, flax's own hooks.
  for _, m in nnx.iter_modules(model):
    assert getattr(m, 'recorder', None) is None, m
    if isinstance(m, (nnx.Linear, nnx.Conv)):
      assert m.promote_dtype is nnx.nn.dtypes.promote_dtype, m


def test_a2os2a_attention_is_addition_only():
  c = a2os2a_configs.get_config('cifar10-2-256,runlocal')
  model = _loud(models.build_model(c.model))
  rep = analysis.analyze(model, [_inputs()], T=c.model.T)
  prods = [r for r in rep['layers'] if r['type'] == 'attention']
  assert prods and all(r['op'] == 'AC' for r in prods)  # binary Q, ternary V: additions
  names = {r['layer'] for r in rep['layers']}
  # V's neuron is ternary: the ternary rate is its non-zero fraction.
  assert any(n.endswith('v_lif') for n in rep['neurons'])
  assert 'block.0.attn.Q (K^T V)' in names or 'block.0.attn.Q K^T' in names


def test_spikformer_cifar10_4_384_total_operations():
  """Users of the official code report 3.70 G operations for CIFAR-10 4-384
  (Spikingformer's counter: conv and linear layers, T=4)."""
  c = spikformer_configs.get_config('cifar10-4-384')
  # Zero weights, not 9.3M random ones: operation counts do not depend on them.
  graph, state = nnx.split(nnx.eval_shape(lambda: models.build_model(c.model)))
  model = nnx.merge(graph, jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), state))
  x = np.zeros((1, 32, 32, 3), np.float32)
  rep = analysis.analyze(model, [x], T=4)
  synaptic = sum(r['macs'] for r in rep['layers'] if r['type'] != 'attention')
  assert synaptic == pytest.approx(3.70e9, rel=0.01)  # 3.686 G
  # With SSA's products: the jaxpr count of the benchmark (7.4723 GFLOP forward).
  assert rep['totals']['macs'] == flops.forward_flops(model, jnp.asarray(x)) // 2 == 3736145664


@pytest.mark.parametrize(
  'family,arg',
  [
    ('sdt', 'cifar10-2-256,runlocal'),
    ('msvit', 'cifar10-4-384,runlocal'),
    ('spikformer', 'cifar10dvs-2-256,runlocal'),
  ],
)
def test_every_family_is_analysed(family, arg):
  import importlib  # pylint: disable=import-outside-toplevel

  c = importlib.import_module(f'configs.{family}').get_config(arg)
  model = _loud(models.build_model(c.model))
  shape = tuple(c.data.shape)
  x = np.abs(np.random.default_rng(0).normal(0, 1, (2, *shape))).astype(np.float32)
  if len(shape) == 4:
    x = np.round(x * 2)  # event counts: integers
  rep = analysis.analyze(model, [x], T=c.model.T)
  assert rep['layers'][0]['first'] and rep['layers'][0]['op'] == 'MAC'
  assert rep['layers'][0]['input'] == ('integer' if len(shape) == 4 else 'real')
  kinds = {r['layer'].rsplit('.', 1)[-1] for r in rep['layers'] if r['type'] == 'attention'}
  assert kinds, 'no attention products'
  if family == 'sdt':
    assert kinds == {'k*v token sum'}
  if family == 'msvit':
    assert 'sum_d Q' in kinds and 'sum_d P' in kinds  # MSSA stages
  assert rep['totals']['energy_mj'] == pytest.approx(sum(r['energy_mj'] for r in rep['layers']))
  assert all(0 <= v['rate'] <= 1 for v in rep['neurons'].values())


@pytest.mark.slow
def test_eval_analyze_cli(tmp_path):
  from spikeformer_jax import train_lib  # pylint: disable=import-outside-toplevel

  wd = tmp_path / 'wd'
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1')
  c = spikformer_configs.get_config('digits')  # trained here: eval.py's CLI is under test
  c.total_steps, c.log_every_steps, c.num_devices = 6, 2, 1
  train_lib.train_and_evaluate(c, str(wd))
  p = subprocess.run(
    [
      sys.executable,
      'eval.py',
      f'--workdir={wd}',
      '--analyze',
      '--analyze_examples=100',
      '--attention_heads=0,1',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'analysis test step 6, 100 examples' in p.stdout
  out = wd / 'analysis_test_6'
  rep = json.loads((out / 'analysis.json').read_text())
  assert rep['step'] == 6 and rep['T'] == 4 and len(rep['neurons']) == 12
  for name in (
    'layers.csv',
    'neurons.csv',
    'analysis.md',
    'firing_rates.png',
    'attention.png',
    'learning_curves.png',
  ):
    assert (out / name).stat().st_size > 100, name
  assert (out / 'firing_rates.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  bad = subprocess.run(
    [sys.executable, 'eval.py', f'--workdir={wd}', '--analyze', '--analyze_examples=0'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert (bad.returncode, bad.stderr.strip()) == (
    2,
    'error: --analyze_examples=0: the number of examples analysed must be >= 1.',
  )
  # Out-of-range heads fail before the analysis, naming the flag; nothing is written.
  out.rename(tmp_path / 'first')
  bad = subprocess.run(
    [sys.executable, 'eval.py', f'--workdir={wd}', '--analyze', '--attention_heads=99'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
    'error: --attention_heads=99: timesteps [0, 1, 2, 3] / heads [99]: the model has T=4, 4 heads.'
  ), bad.stderr[-2000:]
  assert not [f for f in os.listdir(wd) if f.startswith(('analysis_', '.analysis_'))]

  # A stop (SIGTERM raises KeyboardInterrupt) mid-analysis leaves nothing either.
  def stop(*args, **kwargs):
    raise KeyboardInterrupt('SIGTERM')

  with pytest.MonkeyPatch.context() as m:
    m.setattr(analysis, 'write', stop)
    with pytest.raises(KeyboardInterrupt):
      analysis.analyze_checkpoint(c, str(wd), examples=4)
  assert not [f for f in os.listdir(wd) if f.startswith(('analysis_', '.analysis_'))]


def test_vsa_is_counted_as_computed_on_kv_first_backbones():
  c = spikformer_configs.get_config('imagenet-8-512,runlocal')  # attn_order kv_first
  c.model.attention = 'vsa'
  model = _loud(models.build_model(c.model))
  x = np.random.default_rng(0).normal(0, 1, (2, 32, 32, 3)).astype(np.float32)
  rep = analysis.analyze(model, [x], T=c.model.T)
  names = {r['layer'].rsplit('.', 1)[-1] for r in rep['layers'] if r['type'] == 'attention'}
  assert names == {'Q K^T', '(Q K^T) V'}  # the softmax map exists whatever the order
  model.eval()
  assert rep['totals']['macs'] == flops.forward_flops(lambda x: model(x), jnp.asarray(x[:1])) // 2


@pytest.mark.parametrize('batch_as_time', [False, True])
def test_rates_per_timestep_split_time_not_units(batch_as_time):
  from spikeformer_jax import layers, neurons  # pylint: disable=import-outside-toplevel

  B, T, U = 3, 4, 10
  x = np.zeros((B * T, U), np.float32)
  x[::T] = 5.0  # a strong input at t = 0 only: one spike per unit, then silence
  neuron = layers.SpikingNeuron(neurons.Neuron(), T, batch_as_time=batch_as_time)
  neuron.record_spikes = True
  _, inter = nnx.capture(neuron, nnx.Intermediate)(jnp.asarray(x))
  counts = np.asarray(inter['spike_count'].get_value()[0])
  np.testing.assert_array_equal(counts, [B * U, 0, 0, 0])


@pytest.mark.slow
def test_training_evaluations_record_per_layer_firing_rates():
  """What train.py's evaluations send to TensorBoard (firing_rate/<neuron>):
  each neuron's rate over the examples only, not the padding of the last
  batch, equal to the analysis' on the same examples."""
  from spikeformer_jax import experiment, sharding  # pylint: disable=import-outside-toplevel
  from spikeformer_jax.data import sources  # pylint: disable=import-outside-toplevel

  c = spikformer_configs.get_config('cifar10-4-384,runlocal')
  exp = experiment.build(c, sharding.make_mesh(1), 4)
  state = exp.init_state()
  state['params'] = jax.tree_util.tree_map_with_path(  # _loud: fires throughout
    lambda p, x: x * 6 if 'kernel' in jax.tree_util.keystr(p) else x, state['params']
  )
  x = _inputs(6, seed=3)
  source = sources.ArraySource(x, np.zeros(6, np.int64), 10, None, None)
  res = experiment.evaluate(
    experiment.make_eval_step(exp, firing_rates=True), state, source, exp.mesh, batch_size=4
  )  # 2 batches, 2 padded examples
  rates = res['firing_rates']
  model = nnx.merge(exp.graphdef_eval, state['params'], state['batch_stats'])
  want = {k: v['rate'] for k, v in analysis.analyze(model, [x], T=c.model.T)['neurons'].items()}
  assert rates.keys() == want.keys() and len(want) > 5, (rates.keys(), want.keys())
  assert 0.05 < np.mean(list(want.values())) < 0.95, want
  np.testing.assert_allclose([rates[k] for k in want], list(want.values()), rtol=1e-6)
  assert 'firing_rates' not in experiment.evaluate(
    experiment.make_eval_step(exp), state, source, exp.mesh, batch_size=4
  )


def test_eval_warns_of_a_config_whose_model_differs_from_the_run(tmp_path):
  from spikeformer_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  c = spikformer_configs.get_config('digits')
  workdir_lib.write_json(str(tmp_path / 'config.json'), {'config': c.to_dict()})
  assert workdir_lib.model_differences(c, str(tmp_path)) == ''
  other = spikformer_configs.get_config('digits')
  other.model.T, other.total_steps = 2, 1  # only model fields are named
  assert workdir_lib.model_differences(other, str(tmp_path)) == (
    f"warning: --config differs from the run's {tmp_path}/config.json in model.T (4 -> 2): "
    'evaluating with the --config model.'
  )
  assert workdir_lib.model_differences(other, str(tmp_path / 'none')) == ''
