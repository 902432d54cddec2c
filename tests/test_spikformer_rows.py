"""Spikformer's paper rows beyond the released code (issue 18): the DVS128
Gesture model the paper describes (8 heads, a 1-D max-pool after Q and K, a
learnable attention scale, 200 epochs), the CIFAR10-DVS one (the learnable
scale, issue 27), Table 4's T=10 rows, and the sweeps of
Table 5 (VSA with float V), Table 6 (T=1 ablations, IF neurons) and appendix
C.1 (the Gesture pool)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from spikeformer_jax import attention, blocks, experiment, layers, models, sharding, sweeps
from spikeformer_jax import data as data_lib
from spikeformer_jax import validation
from spikeformer_jax.attention import ssa as ssa_kind
from spikeformer_jax.configs import spikformer as cfgs
from spikeformer_jax.models import spikformer

CONFIG = str(ROOT / 'spikeformer_jax' / 'configs' / 'spikformer.py')
NEW = (
  'cifar10dvs-2-256-t10',
  'dvs128gesture-2-256-paper',
  'dvs128gesture-2-256-paper-t10',
  'cifar10dvs-2-256-paper',
  'cifar10dvs-2-256-paper-t10',
)


def _count(model_cfg):
  return models.count_params(nnx.eval_shape(lambda: models.build_model(model_cfg)))


def _attention(pool=0, learnable=False, dim=16, heads=2):
  m = spikformer.model_config('dvs', embed_dim=dim, depth=1, num_heads=heads, T=2)
  m.qk_pool, m.attn_scale_learnable = pool, learnable
  return blocks.SpikingAttention(
    dim,
    heads,
    settings=layers.Settings(T=2),
    kind='ssa',
    style='spikformer',
    scale=0.25,
    init='torch_default',
    model=m,
    rngs=nnx.Rngs(0),
  )


def test_qk_max_pool_is_a_channel_max_of_groups():
  """Kernel = stride = k over the last (channel) axis; tokens untouched."""
  x = (np.random.default_rng(0).random((3, 5, 16)) > 0.8).astype(np.float32)
  ref = np.stack([x[..., c * 4 : (c + 1) * 4].max(-1) for c in range(4)], -1)
  out = np.asarray(ssa_kind.qk_max_pool(jnp.asarray(x), 4))
  np.testing.assert_array_equal(out, ref)
  assert out.shape == (3, 5, 4) and out.mean() > x.mean()  # denser, as the paper says
  assert ssa_kind.qk_max_pool(x, 0) is x and ssa_kind.qk_max_pool(x, 1) is x


def test_pooled_q_and_k_reach_the_equation_and_v_does_not(monkeypatch):
  """In the SSA: Q and K are the neurons' spikes pooled over channels (within
  each head), V is not; the function changes, the parameters do not."""
  seen = {}
  real = ssa_kind.spiking_self_attention

  def spy(q, k, v, **kw):
    out = real(q, k, v, **kw)
    seen.update(q=np.asarray(q), k=np.asarray(k), v=np.asarray(v), out=np.asarray(out))
    return out

  monkeypatch.setattr(ssa_kind, 'spiking_self_attention', spy)
  x = 3.0 * jax.random.normal(jax.random.key(1), (4, 6, 16))  # [B*T, N, C]
  attn, plain = _attention(pool=4), _attention()
  attn(x)
  pooled_out = seen['out']
  q = np.asarray(attn.q_lif(attn.q_bn(attn.q_linear(x))))  # the Q spikes, [B*T, N, 16]
  k = np.asarray(attn.k_lif(attn.k_bn(attn.k_linear(x))))
  v = np.asarray(attn.v_lif(attn.v_bn(attn.v_linear(x))))

  def pool_then_heads(s, p):  # numpy: channel groups of p, then 2 heads of 8 / p
    pooled = s.reshape(4, 6, 16 // p, p).max(-1)
    return pooled.reshape(4, 6, 2, 8 // p).transpose(0, 2, 1, 3)

  np.testing.assert_array_equal(seen['q'], pool_then_heads(q, 4))
  np.testing.assert_array_equal(seen['k'], pool_then_heads(k, 4))
  np.testing.assert_array_equal(seen['v'], pool_then_heads(v, 1))
  assert seen['q'].shape == (4, 2, 6, 2) and seen['v'].shape == (4, 2, 6, 8)
  assert q.any() and not np.array_equal(seen['q'], pool_then_heads(q, 1)[..., :2])
  assert models.count_params(attn) == models.count_params(plain)
  nnx.update(plain, nnx.state(attn))
  plain(x)  # the same weights, Q K^T V over 8 channels per head: another function
  assert pooled_out.shape == seen['out'].shape and not np.array_equal(pooled_out, seen['out'])


def test_learnable_scale_is_one_parameter_per_block_at_the_constant():
  m = cfgs.get_config('cifar10dvs-2-256,runlocal').model
  m.depth = 2
  base = _count(m)
  m.attn_scale_learnable = True
  assert _count(m) == base + 2  # exactly one scalar per SSA
  for flavour, scale in (('dvs', 0.25), ('cifar', 0.125)):  # each flavour's constant
    m = spikformer.model_config(flavour, embed_dim=16, depth=1, num_heads=2, T=2)
    m.attn_scale_learnable = True
    block = spikformer.Block(
      16,
      2,
      4.0,
      settings=layers.Settings(T=2),
      cfg=m,
      rngs=nnx.Rngs(0),
      flavour=spikformer.FLAVOURS[flavour],
    )
    assert float(block.attn.attn_scale[...]) == scale


def test_learnable_scale_starts_as_the_constant_and_scales_the_product():
  x = 3.0 * jax.random.normal(jax.random.key(2), (4, 6, 16))
  attn, const = _attention(learnable=True), _attention()
  assert attn.attn_scale.get_value().shape == ()
  const.q_linear.kernel.set_value(jnp.zeros_like(const.q_linear.kernel.get_value()))
  nnx.update(const, nnx.state(attn, nnx.Not(nnx.PathContains('attn_scale'))))
  np.testing.assert_array_equal(np.asarray(attn(x)), np.asarray(const(x)))  # at the constant
  attn.attn_scale.set_value(jnp.float32(4.0))  # a larger s: the attention neuron fires more
  q, k, v = (
    ssa_kind.qk_max_pool(n(bn(lin(x))), 0)
    for n, bn, lin in (
      (attn.q_lif, attn.q_bn, attn.q_linear),
      (attn.k_lif, attn.k_bn, attn.k_linear),
      (attn.v_lif, attn.v_bn, attn.v_linear),
    )
  )
  qh, kh, vh = (np.asarray(t).reshape(4, 6, 2, 8).transpose(0, 2, 1, 3) for t in (q, k, v))
  ref = (qh @ kh.swapaxes(-1, -2) @ vh) * 4.0
  got = ssa_kind.spiking_self_attention(
    qh, kh, vh, scale=ssa_kind.attention_scale(attn), order='qk_first'
  )
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)


def _one_train_step(config):
  src = data_lib.get_source(config.data, 'train')
  loader = data_lib.Loader(src, global_batch=config.batch_size, seed=config.seed)
  mesh = sharding.make_mesh(1)
  exp = experiment.build(config, mesh, loader.steps_per_epoch)
  state = exp.init_state()
  before = jax.device_get(state['params'])
  state, m = experiment.make_train_step(exp)(state, sharding.global_batch(loader.batch(0), mesh))
  return float(m['loss']), before, jax.device_get(state['params'])


@pytest.mark.slow
def test_paper_gesture_variant_trains_and_its_scale_learns():
  c = cfgs.get_config('dvs128gesture-2-256-paper,runlocal')
  assert c.model.qk_pool == 4 and c.model.attn_scale_learnable
  c.model.neuron.kind = 'if'  # and Table 6's IF neurons train (one compile for both)
  loss, before, after = _one_train_step(c)
  assert np.isfinite(loss)
  s0, s1 = before['block'][0]['attn']['attn_scale'], after['block'][0]['attn']['attn_scale']
  assert float(s0) == 0.25 and float(s1) != 0.25  # it has a gradient and is updated


@pytest.mark.parametrize(
  'variant,heads,T,pool,learnable,paper',
  [
    ('cifar10dvs-2-256-t10', 16, 10, 0, False, 78.9),
    ('dvs128gesture-2-256-paper', 8, 16, 4, True, 98.3),
    ('dvs128gesture-2-256-paper-t10', 8, 10, 4, True, 96.9),
    # Section 4.2's learnable scale on CIFAR10-DVS; all else the official code.
    ('cifar10dvs-2-256-paper', 16, 16, 0, True, 80.9),
    ('cifar10dvs-2-256-paper-t10', 16, 10, 0, True, 78.9),
  ],
)
def test_new_variants_are_the_paper_rows(variant, heads, T, pool, learnable, paper):
  c = cfgs.get_config(variant)
  m = c.model
  assert (m.num_heads, m.T, m.qk_pool, m.attn_scale_learnable, c.paper_top1) == (
    heads,
    T,
    pool,
    learnable,
    paper,
  )
  assert c.data.shape == (T, 128, 128, 2)  # frames = T: prepare.py --frames=T
  base = cfgs.get_config(variant.split('-2-256')[0] + '-2-256')
  total = c.epochs + c.cooldown_epochs
  assert total == (200 if 'gesture' in variant else 106)  # the paper's epoch counts
  for key in ('optimizer', 'mixup', 'batch_size'):  # the rest as the official DVS recipe
    assert c[key] == base[key], key
  assert c.data.augment == base.data.augment
  # No dead / official counts: +1 learnable scale per block over the official model.
  official = {'cifar10dvs': (2_566_666, 2_585_610), 'dvs128gesture': (2_566_923, 2_585_867)}
  no_dead, dead = official[variant.split('-')[0]]
  assert _count(m) == no_dead + 2 * learnable
  m.dead_modules = True
  assert _count(m) == dead + 2 * learnable
  validation.validate_config(cfgs.get_config(variant + ',runlocal'))


def test_official_models_unchanged_and_old_configs_build():
  m = cfgs.get_config('dvs128gesture-2-256,runlocal').model
  assert (m.qk_pool, m.attn_scale_learnable) == (0, False)
  attn = nnx.eval_shape(lambda: models.build_model(m)).block[0].attn
  assert not hasattr(attn, 'qk_pool') and not hasattr(attn, 'attn_scale')  # the same graph
  old = ml_collections.ConfigDict(
    {k: v for k, v in m.to_dict().items() if k not in ('qk_pool', 'attn_scale_learnable')}
  )
  assert _count(old) == _count(m)  # a config saved before the fields existed


@pytest.mark.parametrize(
  'over,message',
  [
    (
      {'qk_pool': -1},
      r"model.qk_pool=-1: 0 \(off\) or a kernel dividing the head width "
      r"embed_dim / num_heads = 16: one of \[1, 2, 4, 8, 16\]",
    ),
    ({'qk_pool': 3}, r'model.qk_pool=3: .* one of \[1, 2, 4, 8, 16\]'),
    (
      {'qk_pool': 4, 'attention': 'vsa'},
      r"model.qk_pool=4 is an option of the 'ssa' attention, not of model.attention='vsa'; "
      r"valid: model.attention='ssa', or model.qk_pool=0",
    ),
    (
      {'attn_scale_learnable': True, 'attention': 'a_i'},
      r"model.attn_scale_learnable=True is an option of the 'ssa' attention, not of "
      r"model.attention='a_i'; valid: model.attention='ssa', or model.attn_scale_learnable=False",
    ),
  ],
)
def test_bad_values_are_one_clear_error(over, message):
  c = cfgs.get_config('cifar10dvs-2-256,runlocal')
  c.model.update(over)
  with pytest.raises(ValueError, match=message):
    validation.validate_config(c)
  with pytest.raises(ValueError, match=message):
    models.build_model(c.model)


def test_operation_counts_follow_the_pooled_width():
  attn = _attention(pool=4)
  rate = {'q_lif': 0.1, 'k_lif': 0.2, 'v_lif': 0.3}.get
  T, n, c, h = 2, 6, 16, 2  # d = 8, pooled Q / K: 2 channels per head
  got = attention.get('ssa').products(attn, T=T, n=n, c=c, rate=rate)
  assert got == [
    ('Q K^T', T * h * n * n * 2, 0.1, 0.2),
    ('(Q K^T) V', T * h * n * n * 8, None, 0.3),
  ]
  kv = attention.matmul_products('kv_first', T=T, n=n, c=c, h=h, fq=0.1, fk=0.2, fv=0.3, qk_pool=4)
  assert kv == [('K^T V', T * h * n * 2 * 8, 0.2, 0.3), ('Q (K^T V)', T * h * n * 2 * 8, 0.1, None)]
  assert (
    attention.get('ssa').products(_attention(), T=T, n=n, c=c, rate=rate)[0][1] == T * h * n * n * 8
  )


@pytest.mark.slow
def test_new_sweeps_carry_the_paper_numbers():
  pts = {
    s: {p.name: p.config for p in sweeps.get_points(CONFIG, s)}
    for s in ('attention-float-v', 'table6', 'gesture-qk-pool')
  }
  fv = pts['attention-float-v']
  assert {k: (c.paper_top1, c.model.attention, c.model.T) for k, c in fv.items()} == {
    'cifar10-4-384': (95.17, 'vsa_float_v', 4),
    'cifar100-4-384': (78.37, 'vsa_float_v', 4),
  }
  t6 = pts['table6']
  assert len(t6) == 10
  assert (
    t6['cifar10-4-384,T=1,attention=a_i'].paper_top1,
    t6['cifar100-4-384,T=1,attention=vsa'].paper_top1,
  ) == (92.39, 74.37)
  for v, acc in (('cifar10-4-384', 95.33), ('cifar100-4-384', 78.14)):
    c = t6[f'{v},kind=if']
    assert (c.paper_top1, c.model.neuron.kind, c.model.T, c.model.attention) == (
      acc,
      'if',
      4,
      'ssa',
    )
  assert all(c.model.T == 1 for k, c in t6.items() if 'attention=' in k)
  g = pts['gesture-qk-pool']
  assert {k: (c.paper_top1, c.model.qk_pool, c.model.num_heads) for k, c in g.items()} == {
    'qk_pool=0': (97.9, 0, 8),
    'qk_pool=4': (98.3, 4, 8),
  }
  assert set(NEW) <= set(cfgs.VARIANTS)
