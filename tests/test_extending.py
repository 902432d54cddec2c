"""docs/extending.md, executed: an attention kind defined entirely in this file
and registered through the public API runs everywhere the built-in kinds do,
with no other file changed: on the Spikformer and SDT backbones by config,
trained on 8 devices as on 1, counted by the analysis, drawn by the plots, and
a misspelled name is refused with the registered ones listed."""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spikeformer_jax.configs import sdt as sdt_configs
from spikeformer_jax.configs import spikformer as spikformer_configs
from spikeformer_jax import analysis, attention, models, ops, plots, validation
from test_train import assert_eight_devices_equal_one


def linear_spiking_attention(q, k, v, *, gain: float):
  """A toy linear-complexity attention: Q (K^T V) * gain / N."""
  n = q.shape[-2]
  return q @ (jnp.swapaxes(k, -1, -2) @ v) * (gain / n)


class ToyLinear(attention.Kind):
  name = 'toy_linear'
  picture = 'K^T V (d x d)'
  config = {'toy_linear': lambda: ml_collections.ConfigDict({'gain': 2.0})}

  def build(self, attn, ctx):
    attention.build_qkv(attn, ctx)  # q/k/v _linear, _bn, _lif
    attn.attn_lif = ctx.s.lif(v_threshold=ctx.attn_v_threshold)
    attn.toy_gain = float(self.own_config(ctx, 'toy_linear').gain)

  def forward(self, attn, x):
    q, k, v = attention.qkv(attn, x)
    q, k, v = attention.heads(attn, attn.q_lif(q), attn.k_lif(k), attn.v_lif(v))
    attn.record_map(lambda: jnp.swapaxes(k, -1, -2) @ v)
    return attn.attn_lif(ops.merge_heads(linear_spiking_attention(q, k, v,
                                                                     gain=attn.toy_gain)))

  def products(self, attn, *, T, n, c, rate):
    d = c // attn.num_heads
    macs = T * attn.num_heads * n * d * d
    return [('K^T V', macs, rate('k_lif'), rate('v_lif')), ('Q (K^T V)', macs, rate('q_lif'), None)]

  def map_axes(self, rows, cols):
    return 'channel', 'channel', True


@pytest.fixture(autouse=True, scope='module')
def toy_kind():
  attention.register(ToyLinear())
  yield
  attention.unregister('toy_linear')


def _config(module, variant):
  c = module.get_config(variant + ',runlocal')  # after registering: carries toy_linear
  c.model.attention = 'toy_linear'
  c.model.toy_linear.gain = 3.0
  return c


@pytest.mark.slow
@pytest.mark.parametrize('module,variant', [(spikformer_configs, 'cifar10-4-384'),
                                            (sdt_configs, 'cifar10-2-256')])
def test_a_kind_from_outside_runs_on_both_backbones(module, variant, tmp_path):
  c = _config(module, variant)
  validation.validate_config(c)
  assert 'toy_linear' in attention.names()
  model = models.build_model(c.model)
  attn = model.block[0].attn
  assert attn.kind == 'toy_linear' and attn.toy_gain == 3.0
  assert {'q_lif', 'k_lif', 'v_lif', 'attn_lif'} <= set(vars(attn))

  # Trained on 8 devices as on 1 (one step: the kind's forward and backward).
  assert_eight_devices_equal_one(c, n_steps=1)

  # Counted by the analysis: its products, as AC where an operand spikes.
  model.eval()
  x = np.random.default_rng(0).normal(0, 1, (2, *c.data.shape)).astype(np.float32)
  rep = analysis.analyze(model, [x], T=c.model.T)
  rows = {r['layer']: r for r in rep['layers'] if r['type'] == 'attention'}
  n, ch, h = (c.model.img_size // models.downsampling(c.model)) ** 2, c.model.embed_dim, \
      c.model.num_heads
  kv = rows['block.0.attn.K^T V']
  assert kv['macs'] == c.model.T * h * n * (ch // h) ** 2 and kv['op'] == 'AC'
  rate_k = rep['neurons']['block.0.attn.k_lif']['rate']
  rate_v = rep['neurons']['block.0.attn.v_lif']['rate']
  assert kv['sops'] == pytest.approx(min(rate_k, rate_v) * kv['macs'])
  assert rows['block.0.attn.Q (K^T V)']['op'] == 'AC'

  # Drawn: the picture of what it records.
  path = plots.attention_maps(model, x[:1], str(tmp_path / 'toy.png'))
  assert os.path.getsize(path) > 0


def test_a_misspelled_kind_lists_the_registered_ones():
  c = _config(spikformer_configs, 'cifar10-4-384')
  c.model.attention = 'toy_linaer'
  with pytest.raises(ValueError) as e:
    validation.validate_config(c)
  assert str(e.value) == ("model.attention='toy_linaer'; valid kinds: "
                          f'{", ".join(attention.names())}.')
  assert str(e.value).endswith('vsa, vsa_float_v, toy_linear.')
  with pytest.raises(ValueError, match='is registered already'):
    attention.register(ToyLinear())


def test_plugins_are_imported_by_name_and_named_when_missing():
  c = _config(spikformer_configs, 'cifar10-4-384')
  c.plugins = ('test_extending',)  # this module: what a run's config.json records
  validation.validate_config(c)
  c.plugins = ('my_lab.no_such_attention',)
  with pytest.raises(ValueError, match=r"plugins: cannot import 'my_lab.no_such_attention' "
                     r"\(No module named 'my_lab'\); make it importable"):
    validation.validate_config(c)
