"""The papers' ANN baselines (issue 27): Spikformer's Transformer-8-512 and
Transformer-4-384 rows as its network without spikes, model.neuron.kind
'relu' / 'gelu' (every network neuron a float activation), softmax attention
of float Q, K, V and T=1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_one_step_moves_every_parameter
from spikeformer_jax import analysis, config_lib, models, neurons
from spikeformer_jax import validation
from spikeformer_jax.configs import spikformer as cfgs

# ANN variant -> (its Spikformer row, paper params in M, paper top-1). Table 3
# prints one count for both CIFARs, the CIFAR-10 one (CIFAR-100: +34,650).
ROWS = {
  'imagenet-transformer-8-512': ('imagenet-8-512', 29.68, 80.80),
  'cifar10-transformer-4-384': ('cifar10-4-384', 9.32, 96.73),
  'cifar100-transformer-4-384': ('cifar100-4-384', 9.32, 81.02),
}


def _tree(model_cfg):
  model = nnx.eval_shape(lambda: models.build_model(model_cfg))
  return models.count_params(model), {
    '.'.join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@pytest.mark.parametrize('variant', ROWS)
def test_ann_rows_are_the_spikformer_rows_without_spikes(variant):
  """The paper's counts (9.32M, 29.68M; its rounding varies: 36.01 and 66.34
  round up, 29.68 and 16.81 down) are the Spikformer rows' own: the same
  parameter tree, T=1, ReLU, softmax."""
  base, paper_m, top1 = ROWS[variant]
  c = cfgs.get_config(variant)
  assert (c.model.T, c.model.neuron.kind, c.model.attention) == (1, 'relu', 'vsa_float_v')
  assert c.paper_top1 == top1
  count, tree = _tree(c.model)
  assert (count, tree) == _tree(cfgs.get_config(base).model)
  ten_classes = count - 90 * (c.model.embed_dim + 1) if c.model.num_classes == 100 else count
  assert int(ten_classes / 1e4) / 100 == paper_m, count
  validation.validate_config(c)


def test_non_spiking_neuron_kinds_are_their_activations():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5))  # [B, T, units]
  for kind, f in (('relu', jax.nn.relu), ('gelu', lambda v: jax.nn.gelu(v, approximate=False))):
    n = neurons.Neuron(kind=kind)
    np.testing.assert_array_equal(neurons.multistep(n, x), f(x))
    g = jax.grad(lambda v, n=n: neurons.multistep(n, v).sum())(x)
    np.testing.assert_allclose(g, jax.grad(lambda v, f=f: f(v).sum())(x), rtol=1e-6)
  with pytest.raises(ValueError, match=r"model.neuron.kind='tanh' is not valid.*'relu', 'gelu'"):
    c = cfgs.get_config('cifar10-transformer-4-384,runlocal')
    c.model.neuron.kind = 'tanh'
    validation.validate_config(c)


def _layer_inputs(variant):
  """analysis rows of a runlocal variant on one batch: {layer: input domain},
  with test_energy_conventions' weights (every layer fires at a moderate rate)."""
  from test_energy_conventions import _model  # pylint: disable=import-outside-toplevel

  c = cfgs.get_config(f'{variant},runlocal')
  x = np.random.default_rng(0).normal(size=(4, c.model.img_size, c.model.img_size, 3))
  rep = analysis.analyze(_model(c.model), [x.astype(np.float32)], T=c.model.T)
  return {r['layer']: r['input'] for r in rep['layers'] if r['type'] != 'attention'}, rep


def test_ann_mode_has_real_activations_where_spikes_were():
  """Every conv / linear of the ANN reads real values; in its Spikformer row
  the same layers read spikes (binary) or spike sums (integer)."""
  ann, rep = _layer_inputs('cifar10-transformer-4-384')
  snn, snn_rep = _layer_inputs('cifar10-4-384')
  assert set(ann) == set(snn) and len(snn) == 12
  middle = [k for k in snn if k not in ('patch_embed.proj_conv', 'head')]
  assert all(snn[k] in ('binary', 'integer') for k in middle), snn
  assert 0.05 < snn_rep['totals']['mean_firing_rate'] < 0.95
  assert all(ann[k] == 'real' for k in ann), ann
  # The "neurons" are ReLUs now: their non-zero fraction, neither none nor all.
  assert 0.05 < rep['totals']['mean_firing_rate'] < 0.95
  # The products are MACs (float Q, K, V): an ANN's energy is E_MAC x its MACs (eq. 23).
  assert rep['totals']['sops'] == 0
  assert rep['totals']['energy_mj'] == pytest.approx(rep['totals']['macs'] * 4.6e-9, rel=1e-12)


def test_ann_variant_trains_a_step():
  c = cfgs.get_config('cifar10-transformer-4-384,runlocal')
  assert c.model.T == 1 and c.model.neuron.kind == 'relu'
  assert_one_step_moves_every_parameter(c)


@pytest.mark.slow
def test_gelu_and_other_backbones_run_without_spikes():
  """model.neuron.kind works on every family's network neurons."""
  for module, variant in (('sdt', 'cifar10-2-256'), ('msvit', 'cifar10-4-384')):
    cfg_module = __import__(f'spikeformer_jax.configs.{module}', fromlist=['get_config'])
    c = config_lib.apply_overrides(
      cfg_module.get_config(f'{variant},runlocal'), {'model.neuron.kind': 'gelu'}
    )
    validation.validate_config(c)
    model = models.build_model(c.model)
    y = model(jnp.ones((2, c.model.img_size, c.model.img_size, 3)))
    assert y.shape == (2, c.model.num_classes) and bool(jnp.all(jnp.isfinite(y)))
