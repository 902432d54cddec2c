"""The lean synapse backward (spikeformer_jax/synapses.py): int8 spike
residuals are exact, the GEMM weight gradients equal autodiff's, and the
models hand int8 only inputs that are small integers."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT  # noqa: F401
from spikeformer_jax import analysis, losses, models, synapses

DN2 = ('NHWC', 'HWIO', 'NHWC')


def _spikes(key, shape, rate=0.3):
  return (jax.random.uniform(key, shape) < rate).astype(jnp.float32)


def _grads(f, *args):
  return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1)))(*args)


def _assert_close(got, want, rtol=1e-5):
  for g, w in zip(got, want):
    scale = float(jnp.max(jnp.abs(w))) or 1.0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=rtol * scale)


def test_dense_backward_equals_autodiff_and_compact_is_bit_identical():
  x = _spikes(jax.random.key(0), (6, 5, 16)) * 3  # spike sums: integers
  w = jax.random.normal(jax.random.key(1), (16, 24))
  ref = _grads(lambda x, w: x @ w, x, w)
  for weight_grad in ('xla', 'gemm'):
    plain = _grads(lambda x, w, wg=weight_grad: synapses.dense(x, w, False, wg), x, w)
    packed = _grads(lambda x, w, wg=weight_grad: synapses.dense(x, w, True, wg), x, w)
    for a, b in zip(plain, packed):
      np.testing.assert_array_equal(a, b)
    _assert_close(plain, ref)
  np.testing.assert_array_equal(synapses.dense(x, w, True, 'gemm'), x @ w)


@pytest.mark.parametrize(
  'kernel,stride,padding',
  [
    ((3, 3), (1, 1), ((1, 1), (1, 1))),
    ((3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 1), (2, 2), ((0, 0), (0, 0))),
    ((3, 3), (1, 1), ((0, 0), (0, 0))),
  ],
)
def test_conv_backward_equals_autodiff_and_compact_is_bit_identical(kernel, stride, padding):
  x = _spikes(jax.random.key(0), (4, 9, 9, 5))
  w = jax.random.normal(jax.random.key(1), kernel + (5, 7))
  plain = lambda x, w: jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=DN2)
  ref = _grads(plain, x, w)
  for weight_grad in ('xla', 'gemm'):
    f = lambda c, wg=weight_grad: lambda x, w: synapses.conv(x, w, stride, padding, c, wg)
    a, b = _grads(f(False), x, w), _grads(f(True), x, w)
    for u, v in zip(a, b):
      np.testing.assert_array_equal(u, v)
    if weight_grad == 'xla':  # the same ops as autodiff's
      for u, v in zip(a, ref):
        np.testing.assert_array_equal(u, v)
    _assert_close(a, ref)


def test_compact_residual_is_int8():
  """What the backward pass keeps of a spike input: int8, not float32."""
  x = _spikes(jax.random.key(0), (8, 16))
  w = jax.random.normal(jax.random.key(1), (16, 4))
  for compact, want in ((True, jnp.int8), (False, jnp.float32)):
    _, vjp = jax.vjp(lambda x, w, c=compact: synapses.dense(x, w, c, 'gemm'), x, w)
    kept = [r.dtype for r in jax.tree.leaves(vjp) if r.shape == x.shape]
    assert kept == [want], kept
  xc = _spikes(jax.random.key(2), (2, 6, 6, 3))
  wc = jax.random.normal(jax.random.key(3), (3, 3, 3, 4))
  _, vjp = jax.vjp(lambda x, w: synapses.conv(x, w, (1, 1), ((1, 1), (1, 1)), True), xc, wc)
  assert [r.dtype for r in jax.tree.leaves(vjp) if r.shape == xc.shape] == [jnp.int8]


def test_nnx_layers_route_through_the_ops_and_fall_back_otherwise():
  rngs = nnx.Rngs(0)
  x = _spikes(jax.random.key(0), (2, 8, 8, 4))
  conv = nnx.Conv(
    4,
    6,
    (3, 3),
    padding=((1, 1), (1, 1)),
    rngs=rngs,
    conv_general_dilated=synapses.SpikeConv(True, 'gemm'),
  )
  ref = nnx.Conv(4, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
  ref.kernel[...] = conv.kernel[...]
  np.testing.assert_array_equal(conv(x), ref(x))
  # Grouped / dilated / 'SAME' convs are not handled here: the lax op runs.
  for kw in (dict(feature_group_count=2), dict(kernel_dilation=2), dict(padding='SAME')):
    kw.setdefault('padding', ((1, 1), (1, 1)))
    a = nnx.Conv(
      4, 6, (3, 3), rngs=nnx.Rngs(1), **kw, conv_general_dilated=synapses.SpikeConv(True, 'gemm')
    )
    b = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(1), **kw)
    np.testing.assert_array_equal(a(x), b(x))
  lin = nnx.Linear(4, 3, rngs=nnx.Rngs(2), dot_general=synapses.SpikeDot(True, 'gemm'))
  np.testing.assert_array_equal(lin(x), nnx.Linear(4, 3, rngs=nnx.Rngs(2))(x))
  with pytest.raises(ValueError, match="model.weight_grad='fast'; valid: auto, xla, gemm"):
    synapses.resolve('fast')


CASES = [
  ('spikformer', 'cifar10-4-384,runlocal', {}),
  ('spikformer', 'cifar10dvs-2-256,runlocal', {}),
  ('spikformer', 'cifar10-4-384,runlocal', {'attention': 'vsa_float_v'}),
  ('sdt', 'cifar10-2-256,runlocal', {}),
  ('msvit', 'cifar10-4-384,runlocal', {}),
  ('a2os2a', 'cifar10-2-256,runlocal', {}),
]


def _case(family, arg, over):
  c = importlib.import_module(f'configs.{family}').get_config(arg)
  for k, v in over.items():
    c.model[k] = v
  shape = tuple(c.data.shape)
  x = np.abs(np.random.default_rng(0).normal(0, 1, (4, *shape))).astype(np.float32)
  if len(shape) == 4:
    x = np.round(x * 3)  # event counts
  return c, jnp.asarray(x), jnp.arange(4) % c.model.num_classes


def _loss_and_grads(cfg, x, y):
  """(loss, gradients) as a function of the parameters, and the parameters."""
  model = models.build_model(cfg, seed=0)
  for _, m in nnx.iter_modules(model):  # fire throughout, so every path carries gradient
    if isinstance(m, (nnx.Linear, nnx.Conv)):
      m.kernel[...] = m.kernel[...] * 4
  model.train()
  graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def loss(p):
    m = nnx.merge(graph, p, stats, copy=True)
    return losses.cross_entropy(m(x), y).mean()

  return jax.value_and_grad(loss), params


@pytest.mark.slow
@pytest.mark.parametrize('family,arg,over', [c for c in CASES if not c[2]])
def test_models_lean_synapses_equal_autodiff(family, arg, over):
  """Loss and gradients: compact on / off bit-identical; GEMM weight
  gradients equal autodiff's at float32 tolerance."""
  c, x, y = _case(family, arg, over)
  fns, params = {}, {}
  for compact, weight_grad in ((False, 'xla'), (False, 'gemm'), (True, 'gemm')):
    c.model.compact_spikes, c.model.weight_grad = compact, weight_grad
    fns[compact, weight_grad], params[compact, weight_grad] = _loss_and_grads(c.model, x, y)
  # The three in one program: compiled in about half the time of one each.
  results = jax.device_get(jax.jit(lambda ps: {k: f(ps[k]) for k, f in fns.items()})(params))
  for a, b in zip(jax.tree.leaves(results[True, 'gemm']), jax.tree.leaves(results[False, 'gemm'])):
    np.testing.assert_array_equal(a, b)
  ref = results[False, 'xla']
  assert float(results[True, 'gemm'][0]) == float(ref[0])  # the forward is unchanged
  for a, b in zip(jax.tree.leaves(results[True, 'gemm'][1]), jax.tree.leaves(ref[1])):
    scale = float(np.max(np.abs(b))) or 1.0
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize('family,arg,over', CASES)
def test_compact_layers_only_see_small_integers(family, arg, over):
  """Every conv / linear that saves its input as int8 receives binary,
  ternary or non-negative integer inputs (spikes, spike sums), and every one
  but the stem's first conv (images, event counts) and the head does."""
  c, x, _ = _case(family, arg, over)
  model = models.build_model(c.model, seed=0)
  compact = {}
  for path, m in nnx.iter_modules(model):
    op = (
      getattr(m, 'dot_general', None)
      if isinstance(m, nnx.Linear)
      else getattr(m, 'conv_general_dilated', None)
      if isinstance(m, nnx.Conv)
      else None
    )
    if op is not None:
      compact['.'.join(map(str, path))] = getattr(op, 'compact', False)
  got = analysis.collect(model, [x], T=c.model.T)
  flags = got['flags']
  first = got['order'][0]
  plain = {n for n in got['order'] if n in compact and not compact[n]}
  assert plain == {first, 'head'}, plain  # all others opt in: their inputs are spikes
  called = [n for n in got['order'] if n in compact and compact[n]]
  assert len(called) >= 4
  for name in called:
    assert any(flags.get((name, f), False) for f in ('in_binary', 'in_ternary', 'in_integer')), name


def test_too_deep_residual_sums_are_refused():
  c = importlib.import_module('configs.spikformer').get_config('cifar10-4-384,runlocal')
  c.model.depth = 63
  with pytest.raises(ValueError, match='model.compact_spikes=False'):
    models.build_model(c.model)
