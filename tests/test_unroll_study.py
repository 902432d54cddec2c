"""The timestep-loop study (benchmarks/unroll_study.py) end to end on a tiny
config: every choice compiled, timed, checked against the reference; and the
remat policies, which must not change results."""

import csv
import importlib
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT  # noqa: F401
from benchmarks import unroll_study
from spikeformer_jax import blocks, losses, models
from spikeformer_jax.configs import spikformer as spikformer_configs


def test_choices_cover_scan_unrolls_python_vjp_and_remat():
  names = [unroll_study.label(c) for c in unroll_study.choices(4, ['', 'full'])]
  assert names == [
    'scan/unroll 1',
    'scan/unroll 2',
    'scan/unroll 4',
    'python',
    'vjp',
    'scan/unroll 1 + remat full',
    'scan/unroll 2 + remat full',
    'scan/unroll 4 + remat full',
    'python + remat full',
    'vjp + remat full',
  ]
  names = [
    unroll_study.label(c)
    for c in unroll_study.choices(
      16, [''], ['autodiff', 'lean'], loops=('scan', 'vjp'), unrolls='1,T'
    )
  ]
  assert names == [
    'scan/unroll 1',
    'scan/unroll 16',
    'vjp',
    'scan/unroll 1 + lean',
    'scan/unroll 16 + lean',
    'vjp + lean',
  ]
  cs = unroll_study.choices(
    2, [''], ['lean'], loops=('scan',), unrolls='1', kernels=('xla', 'pallas')
  )
  assert [unroll_study.label(c) for c in cs] == [
    'scan/unroll 1 + lean',
    'scan/unroll 1 + lean + pallas kernels',
  ]
  assert [c['kernels'] for c in cs] == ['xla', 'pallas']  # the reference: the pure-JAX path
  config = unroll_study.choice_config(
    spikformer_configs.get_config('digits'), cs[1], T=2, dtype='float32', batch=8
  )
  assert config.model.kernels == 'pallas'


@pytest.mark.slow
def test_study_runs_and_every_choice_equals_the_reference(tmp_path, capsys):
  # One group, T=2, two loops under both synapse backwards; each choice compiles
  # two programs, so every extra choice, T or dtype costs seconds. Every loop and
  # unroll agrees with the others: test_neurons.test_all_loops_agree.
  unroll_study.main(
    [
      '--config=configs/spikformer.py:digits',
      '--T=2',
      '--dtypes=float32',
      '--remat=',
      '--batch=8',
      '--steps=1',
      '--repeats=1',
      '--loops=scan,vjp',
      '--unrolls=1',
      '--set',
      'num_devices=1',
      f'--out={tmp_path}',
    ]
  )
  with open(tmp_path / 'study.csv', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  # scan/1, vjp; each with autodiff and lean synapses
  assert len(rows) == 2 * 2
  for r in rows:
    assert float(r['max_diff_logits']) <= 1e-5 and float(r['max_diff_grads']) <= 1e-5, r
    assert float(r['step_s_median']) > 0 and float(r['compile_s']) > 0
  assert rows[0]['equal'] == 'exact'  # the reference
  assert [r['choice'] for r in rows] == [
    'scan/unroll 1',
    'vjp',
    'scan/unroll 1 + lean',
    'vjp + lean',
  ]
  assert [r['synapse'] for r in rows] == ['autodiff'] * 2 + ['lean'] * 2
  assert {r['kernels'] for r in rows} == {'xla'}  # --kernels: xla unless asked
  assert (tmp_path / 'study.png').stat().st_size > 0
  md = (tmp_path / 'study.md').read_text()
  assert '| 2 | float32 | vjp |' in md and '| 2 | float32 | vjp + lean |' in md
  assert 'study.csv' in capsys.readouterr().out


# Every policy on one family; each family's remat wiring (blocks, stem
# stages) under 'full', which recomputes the most: the policies themselves
# are JAX's, the same in every family.
@pytest.mark.slow
@pytest.mark.parametrize(
  'family,variant,policies',
  [
    (
      'spikformer',
      'cifar10-4-384',
      tuple(blocks.REMAT_POLICIES) + ('neuron.recompute', 'bn_recompute'),
    ),
    ('sdt', 'cifar10-2-256', ('', 'full')),
    ('msvit', 'cifar10-4-384', ('', 'full')),
  ],
  ids=['spikformer', 'sdt', 'msvit'],
)
def test_remat_policies_do_not_change_results(family, variant, policies):
  """Loss, gradients and the new BatchNorm statistics of a train-mode forward
  are bit-identical under every model.remat (blocks) and model.remat_stem
  (patch stem stages) policy, with model.neuron.recompute and with
  model.bn_recompute: the same arithmetic, recomputed."""
  module = importlib.import_module(f'configs.{family}')
  c = module.get_config(variant + ',runlocal').model
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  y = jnp.arange(4) % 10
  fns, params = {}, {}
  for remat in policies:
    c.neuron.recompute = remat == 'neuron.recompute'
    c.bn_recompute = remat == 'bn_recompute'
    c.remat = c.remat_stem = remat if remat in blocks.REMAT_POLICIES else ''
    model = models.build_model(c, seed=0)
    model.train()
    graph, params[remat], stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss(p, graph=graph, stats=stats):
      m = nnx.merge(graph, p, stats, copy=True)
      return losses.cross_entropy(m(x), y).mean(), nnx.state(m, nnx.BatchStat)

    fns[remat] = jax.value_and_grad(loss, has_aux=True)
  # Every policy in one program (each on its own copy of the parameters):
  # compiled in about 60% of the time of one program each.
  results = jax.device_get(jax.jit(lambda ps: {k: f(ps[k]) for k, f in fns.items()})(params))
  for remat, got in results.items():
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(results[''])):
      np.testing.assert_array_equal(a, b, err_msg=remat)
  with pytest.raises(ValueError, match="model.remat='all'; valid: '', 'full'"):
    blocks.apply_block(None, x, 'all')


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason="libtpu is not installed (pip install '.[tpu]')",
)
def test_study_target_mode_compiles_each_choice_for_a_tpu(tmp_path):
  """--target: every choice also compiled for a TPU topology from this CPU
  machine; --target_only: only those columns (and the plot and table still
  write)."""
  unroll_study.main(
    [
      '--config=configs/spikformer.py:digits',
      '--T=2',
      '--dtypes=bfloat16',
      '--remat=',
      '--synapses=lean',
      '--loops=python',
      '--recompute=1',
      '--batch=8',
      '--target=v5e:2x2',
      '--target_batch=16',
      '--target_only',
      f'--out={tmp_path}',
    ]
  )
  with open(tmp_path / 'study.json', encoding='utf-8') as f:
    rows = json.load(f)
  assert [r['choice'] for r in rows] == ['python + lean + recompute']
  r = rows[0]
  assert r['target'] == 'v5e:2x2' and r['target_fits'] and 'step_s_median' not in r
  assert r['target_hbm_peak_bytes'] > 0 and r['target_hbm_bytes_per_image'] > 0
  assert r['target_roofline_images_per_s'] > 0
  assert 'HBM peak' in (tmp_path / 'study.md').read_text() and (tmp_path / 'study.png').exists()
