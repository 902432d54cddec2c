"""A2OS2A: its neurons, its addition-only attention, and attention swaps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT  # noqa: F401  (puts the repo root on sys.path)
from spikeformer_jax.configs import a2os2a as a2os2a_configs
from spikeformer_jax.configs import sdt as sdt_configs
from spikeformer_jax import attention, blocks, convert, layers, losses, models, neurons
from spikeformer_jax.attention import a2os2a as a2os2a_kind
from spikeformer_jax.attention import ablations, sdsa as sdsa_kind, ssa as ssa_kind
from spikeformer_jax.models import sdt
from spikeformer_jax.data import mixup


def test_ternary_neuron_hand_computed():
  """SpikingJelly form, tau=2, Vth=1, Vreset=0: H = V + (X - V)/2,
  S = sign(H) [|H| >= 1], V = H (1 - |S|)."""
  x = jnp.asarray([[2.0, -0.5, -3.0, 0.8, 1.2]])[..., None]  # [B=1, T=5, 1]
  n = neurons.Neuron(kind='ternary')
  s = neurons.multistep(n, x)[0, :, 0]
  # H: 1.0 (fires +1, V=0); -0.25 (V=-0.25); -1.625 (fires -1, V=0); 0.4; 0.8
  np.testing.assert_array_equal(s, [1.0, 0.0, -1.0, 0.0, 0.0])
  # The paper's form, beta=0.5: U = H + X, H = beta U (1 - |S|):
  p = neurons.Neuron(kind='ternary', charge_form='paper', beta=0.5)
  sp = neurons.multistep(p, x)[0, :, 0]
  # U: 2 (+1, H=0); -0.5 (H=-0.25); -3.25 (-1, H=0); 0.8 (H=0.4); 1.6 (+1)
  np.testing.assert_array_equal(sp, [1.0, 0.0, -1.0, 0.0, 1.0])


def test_ternary_surrogate_gradient_hand_computed():
  """dS/dU = g(|U| - Vth) for either sign (g: sigmoid surrogate, alpha 4)."""
  n = neurons.Neuron(kind='ternary')
  g = lambda z: 4 * jax.nn.sigmoid(4 * z) * (1 - jax.nn.sigmoid(4 * z))
  for u in (1.3, -1.3, 0.4, -0.4):
    # One step: H = X / 2, so dS/dX = g(|X/2| - 1) / 2.
    grad = jax.grad(lambda x: neurons.multistep(n, x.reshape(1, 1)).sum())(jnp.float32(2 * u))
    np.testing.assert_allclose(grad, g(abs(u) - 1.0) / 2, rtol=1e-6)
  clamp = neurons.Neuron(kind='ternary', ternary_grad='clamp', v_threshold=0.8)
  grad = jax.grad(lambda x: neurons.multistep(clamp, x.reshape(1, 1)).sum())
  np.testing.assert_allclose(grad(jnp.float32(1.0)), 0.5 / 0.8)  # |U| = 0.5 < Vth
  np.testing.assert_allclose(grad(jnp.float32(4.0)), 0.0)  # |U| = 2 > Vth


def _attention(order='auto'):
  settings = layers.Settings(T=2)
  return blocks.SpikingAttention(
    16,
    2,
    settings=settings,
    kind='a2os2a',
    style='sdt',
    order=order,
    init='trunc_normal',
    rngs=nnx.Rngs(0),
  )


def test_a2os2a_operands_and_addition_only_product(monkeypatch):
  seen = {}
  real = a2os2a_kind.a2os2a_self_attention

  def spy(q, k, v, *, order):
    seen.update(q=np.asarray(q), k=np.asarray(k), v=np.asarray(v))
    out = real(q, k, v, order=order)
    seen['out'] = np.asarray(out)
    return out

  monkeypatch.setattr(a2os2a_kind, 'a2os2a_self_attention', spy)
  x = 2.0 * jax.random.normal(jax.random.key(0), (4, 9, 16))  # [B*T, N, C] membrane
  _attention()(x)
  q, k, v = seen['q'], seen['k'], seen['v']
  assert set(np.unique(q)) <= {0.0, 1.0} and q.any()
  assert (k >= 0).all() and (k > 0).any() and len(np.unique(k)) > 3  # real-valued ReLU
  assert set(np.unique(v)) == {-1.0, 0.0, 1.0}
  # Q K^T V by additions only: A[i, j] = sum of K[j, c] where Q[i, c] = 1, then
  # out[i, c] = sum of A[i, j] over V[j, c] = +1 minus over V[j, c] = -1.
  a = np.where(q[..., :, None, :] == 1, k[..., None, :, :], 0.0).sum(-1)
  plus = np.where(v[..., None, :, :] == 1, a[..., :, :, None], 0.0).sum(-2)
  minus = np.where(v[..., None, :, :] == -1, a[..., :, :, None], 0.0).sum(-2)
  np.testing.assert_allclose(seen['out'], plus - minus, rtol=1e-5, atol=1e-5)


def test_a2os2a_product_orders_are_equal():
  x = jax.random.normal(jax.random.key(1), (3, 2, 7, 5))
  q = (x > 0).astype(jnp.float32)
  k = jax.nn.relu(jax.random.normal(jax.random.key(2), x.shape))
  v = jnp.sign(jnp.round(jax.random.normal(jax.random.key(3), x.shape)))
  a = a2os2a_kind.a2os2a_self_attention(q, k, v, order='qk_first')
  b = a2os2a_kind.a2os2a_self_attention(q, k, v, order='kv_first')
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_swapping_attention_back_gives_sdt():
  a = a2os2a_configs.get_config('cifar10-2-512')
  s = sdt_configs.get_config('cifar10-2-512')
  a.model.attention = 'sdsa'
  assert a.model.to_dict() == s.model.to_dict()
  for k in ('optimizer', 'data', 'tet', 'batch_size', 'epochs', 'bn_scope'):
    assert a[k] == s[k], k
  # A2OS2A's parameters are SDT's: the same tree, the same shapes.
  small = sdt.model_config('cifar', embed_dim=32, depth=1, num_heads=2, T=2, img_size=16)
  shapes = {}
  for kind in ('sdsa', 'a2os2a'):
    small.attention = kind
    m = nnx.eval_shape(lambda: models.build_model(small))
    shapes[kind] = jax.tree.map(lambda x: x.shape, nnx.state(m, nnx.Param))
  assert shapes['sdsa'] == shapes['a2os2a']


def test_official_sdt_weights_load_into_a2os2a(shared_dir):
  path = shared_dir / 'fixtures' / 'sdt_cifar.npz'
  if not path.exists():
    pytest.skip('sdt_cifar.npz absent')
  d = np.load(path)
  state = {k[len('state/') :]: d[k] for k in d.files if k.startswith('state/')}
  mc = sdt.model_config(
    'cifar', embed_dim=64, depth=2, num_heads=8, T=2, img_size=32, attention='a2os2a'
  )
  mc.dead_modules = True
  model = nnx.eval_shape(lambda: models.build_model(mc))  # every variable comes from the file
  convert.load_state_dict(model, state)
  x = jnp.asarray(d['input'].transpose(0, 2, 3, 1), jnp.float32)
  assert np.isfinite(np.asarray(nnx.jit(lambda m, x: m(x))(model, x))).all()


@pytest.mark.slow
@pytest.mark.parametrize('attention', ['a2os2a', 'sdsa'])  # A2OS2A and the SDT baseline
def test_a2os2a_eight_devices_equal_one_device(attention):
  """On the FSDP mesh, which splits the batch over all 8 devices as the data
  mesh does and shards the kernels too (the data mesh alone, replicated
  kernels: test_train.test_eight_devices_equal_one_device)."""
  from test_train import assert_eight_devices_equal_one

  c = a2os2a_configs.get_config('cifar10-2-256,runlocal')
  c.model.attention = attention
  c.mesh.fsdp_min_size = 512  # runlocal arrays are small: shard them anyway
  assert_eight_devices_equal_one(c, data=2, fsdp=4)


def test_tet_loss_formula():
  logits = jax.random.normal(jax.random.key(4), (3, 4, 5))
  labels = jnp.asarray([0, 3, 1])
  ref = np.mean([losses.cross_entropy(logits[:, t], labels, 0.1).mean() for t in range(4)])
  ref = 0.999 * ref + 0.001 * np.mean((np.asarray(logits) - 1.0) ** 2)
  targets = mixup.smooth_one_hot(labels, 5, 0.1)
  np.testing.assert_allclose(losses.tet_loss(logits, targets, 1.0, 0.001), ref, rtol=1e-6)


@pytest.mark.parametrize('variant', a2os2a_configs.VARIANTS)
def test_every_a2os2a_row_builds_with_sdt_parameters(variant):
  c = a2os2a_configs.get_config(variant)
  s = sdt_configs.get_config(variant)
  assert c.paper_top1 > 0 and c.model.attention == 'a2os2a'
  count = lambda mc: models.count_params(nnx.eval_shape(lambda: models.build_model(mc)))
  assert count(c.model) == count(s.model)


# kind -> (Q neuron, K neuron, V neuron kind or None)
_NEURONS = {
  'ssa': (True, True, 'lif'),
  'sdsa': (True, True, 'lif'),
  'a2os2a': (True, False, 'ternary'),
  'a_i': (False, False, 'lif'),
  'a_relu': (False, False, 'lif'),
  'a_leakyrelu': (False, False, 'lif'),
  'vsa': (False, False, 'lif'),
  'vsa_float_v': (False, False, None),
  'mssa': (True, True, None),
}  # MSViT: Q, P and K neurons, no V


@pytest.mark.parametrize('style', blocks.STYLES)
def test_every_attention_kind_in_every_backbone_style(style):
  """Each kind has its own neurons, runs in each backbone's block style, and
  trains (finite, non-zero gradients)."""
  assert set(_NEURONS) == set(attention.names())
  x = 2.0 * jax.random.normal(jax.random.key(5), (4, 9, 16))  # [B*T, N, C]
  params, forward = {}, {}
  for kind, (q_n, k_n, v_n) in _NEURONS.items():
    attn = blocks.SpikingAttention(
      16,
      2,
      settings=layers.Settings(T=2),
      kind=kind,
      style=style,
      init='trunc_normal',
      rngs=nnx.Rngs(0),
    )
    assert hasattr(attn, 'q_lif') == q_n and hasattr(attn, 'k_lif') == k_n, kind
    assert (attn.v_lif.neuron.kind if hasattr(attn, 'v_lif') else None) == v_n, kind
    assert hasattr(attn, 'shortcut_lif') == (style == 'sdt')
    assert hasattr(attn, 'proj_lif') == (style == 'spikformer')
    graphdef, params[kind], rest = nnx.split(attn, nnx.Param, ...)
    forward[kind] = functools.partial(
      lambda g, r, p: nnx.merge(g, p, r, copy=True)(x), graphdef, rest
    )

  @jax.jit  # every kind in one program: a third of the compile time of one each
  def outputs_and_grads(params):
    out = {}
    for kind, f in forward.items():
      y, vjp = jax.vjp(f, params[kind])
      out[kind] = y, vjp(jnp.ones_like(y))[0]
    return out

  for kind, (y, grads) in outputs_and_grads(params).items():
    assert y.shape == x.shape
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), kind
    assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0, kind


def test_attention_cores_compute_different_functions():
  key = jax.random.split(jax.random.key(6), 3)
  q = (jax.random.uniform(key[0], (2, 6, 4)) > 0.5).astype(jnp.float32)
  k = (jax.random.uniform(key[1], (2, 6, 4)) > 0.5).astype(jnp.float32)
  v = (jax.random.uniform(key[2], (2, 6, 4)) > 0.5).astype(jnp.float32)
  ssa = ssa_kind.spiking_self_attention(q, k, v, scale=0.125, order='auto')
  np.testing.assert_allclose(
    ssa, np.asarray(q) @ np.asarray(k).swapaxes(-1, -2) @ np.asarray(v) * 0.125, rtol=1e-6
  )
  vsa = ablations.vanilla_self_attention(q, k, v)
  a = np.exp(np.asarray(q) @ np.asarray(k).swapaxes(-1, -2) / 2.0)
  np.testing.assert_allclose(vsa, (a / a.sum(-1, keepdims=True)) @ np.asarray(v), rtol=1e-5)
  sdsa = sdsa_kind.spike_driven_self_attention(q, k, v, lambda z: (z >= 0.5).astype(z.dtype))
  np.testing.assert_array_equal(
    sdsa, np.asarray(q) * ((np.asarray(k) * np.asarray(v)).sum(-2, keepdims=True) >= 0.5)
  )
  assert not np.allclose(ssa, vsa) and not np.allclose(ssa, sdsa)


@pytest.mark.slow
def test_a2os2a_trains_from_train_py(tmp_path):
  import json
  import os
  import subprocess
  import sys

  wd = tmp_path / 'a2os2a'
  # One device: the sharded model is test_a2os2a_eight_devices_equal_one_device's.
  p = subprocess.run(
    [
      sys.executable,
      'train.py',
      '--config=configs/a2os2a.py:cifar10-2-256,runlocal',
      f'--workdir={wd}',
      '--config.total_steps=2',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  final = json.loads((wd / 'final_metrics.json').read_text())
  assert final['steps'] == 2 and final['paper_top1'] == 94.91
  saved = json.loads((wd / 'config.json').read_text())['config']
  assert saved['model']['attention'] == 'a2os2a'
