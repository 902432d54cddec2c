"""Tests of spikeformer_jax.layers against hand-written numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spikeformer_jax import layers
from spikeformer_jax import neurons
from spikeformer_jax import norm
from spikeformer_jax import ops
from spikeformer_jax.attention import ssa

# --------------------------------------------------------------------------
# max_pool
# --------------------------------------------------------------------------


def ref_max_pool(x, window, stride, padding):
  """numpy max pool of x[N, H, W, C] with -inf padding.

  Returns (out, first) where first[n, i, j, c] = (row, col) of the first
  maximal valid element of output (i, j)'s window in row-major order.
  Written as two passes per window (max, then first position equal to it).
  """
  n_, h, w, c_ = x.shape
  ho = (h + 2 * padding - window) // stride + 1
  wo = (w + 2 * padding - window) // stride + 1
  out = np.empty((n_, ho, wo, c_), x.dtype)
  first = np.empty((n_, ho, wo, c_, 2), np.int64)
  for n in range(n_):
    for c in range(c_):
      for i in range(ho):
        for j in range(wo):
          cells = [
            (i * stride - padding + di, j * stride - padding + dj)
            for di in range(window)
            for dj in range(window)
          ]
          valid = [(r, q) for r, q in cells if 0 <= r < h and 0 <= q < w]
          m = max(x[n, r, q, c] for r, q in valid)
          out[n, i, j, c] = m
          first[n, i, j, c] = next((r, q) for r, q in valid if x[n, r, q, c] == m)
  return out, first


def ref_max_pool_grad(x, g, window, stride, padding):
  """Routes each output cotangent to the first maximal element of its window."""
  _, first = ref_max_pool(x, window, stride, padding)
  gx = np.zeros(x.shape, np.float64)
  n_, ho, wo, c_ = g.shape
  for n in range(n_):
    for c in range(c_):
      for i in range(ho):
        for j in range(wo):
          r, q = first[n, i, j, c]
          gx[n, r, q, c] += g[n, i, j, c]
  return gx


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _pool_and_grads(xs, gs, window, stride, padding):
  """[(max_pool(x), vjp(g)) for x, g in zip(xs, gs)] in one compiled program."""
  res = []
  for x, g in zip(xs, gs):
    y, vjp = jax.vjp(lambda x: ops.max_pool(x, window, stride, padding), x)
    res.append((y, vjp(g)[0]))
  return res


SPATIAL = [(7, 7), (8, 8), (5, 6), (6, 5)]


def _inputs(rs, h, w, c=3, n=2):
  """Random floats (no ties), sparse and dense binary spike maps (many ties),
  an all-zero map (every window tied) and small integers."""
  return [
    rs.randn(n, h, w, c).astype(np.float32),
    (rs.rand(n, h, w, c) < 0.15).astype(np.float32),
    (rs.rand(n, h, w, c) < 0.6).astype(np.float32),
    np.zeros((n, h, w, c), np.float32),
    rs.randint(0, 3, (n, h, w, c)).astype(np.float32),
  ]


@pytest.mark.parametrize(
  'geometry', [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 2, 0)], ids=lambda g: 'w{}_s{}_p{}'.format(*g)
)
def test_max_pool_forward_and_gradient_routing(geometry):
  window, stride, padding = geometry
  rs = np.random.RandomState(0)
  shapes = SPATIAL if geometry == (3, 2, 1) else SPATIAL[1:3]
  xs, gs = [], []
  for h, w in shapes:
    for x in _inputs(rs, h, w):
      xs.append(x)
      ho = (h + 2 * padding - window) // stride + 1
      wo = (w + 2 * padding - window) // stride + 1
      # Distinct positive cotangents: a misrouted one cannot cancel out.
      gs.append(rs.uniform(1.0, 2.0, (x.shape[0], ho, wo, x.shape[3])).astype(np.float32))
  res = _pool_and_grads(
    [jnp.asarray(x) for x in xs], [jnp.asarray(g) for g in gs], window, stride, padding
  )
  for x, g, (y, gx) in zip(xs, gs, res):
    y_ref, _ = ref_max_pool(x, window, stride, padding)
    np.testing.assert_array_equal(np.asarray(y), y_ref, err_msg=str(x.shape))
    gx_ref = ref_max_pool_grad(x, g, window, stride, padding)
    np.testing.assert_allclose(np.asarray(gx), gx_ref, rtol=1e-6, atol=0, err_msg=str(x.shape))
    # The total cotangent is conserved (every output routes to one input).
    np.testing.assert_allclose(np.asarray(gx).sum(), g.sum(), rtol=1e-5)


def test_max_pool_all_zero_window_goes_to_top_left_valid_element():
  # 3x3/2/1 on a 4x4 zero map: output (0, 0)'s window covers padded rows and
  # columns -1..1, so its top-left valid element is input (0, 0); output (0, 1)
  # covers columns 1..3 -> (0, 1); output (1, 1) -> input (1, 1).
  x = jnp.zeros((1, 4, 4, 1), jnp.float32)
  g = jnp.asarray([[1.0, 2.0], [4.0, 8.0]], jnp.float32).reshape(1, 2, 2, 1)
  ((_, gx),) = _pool_and_grads([x], [g], 3, 2, 1)
  expected = np.zeros((4, 4))
  expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1, 2, 4, 8
  np.testing.assert_array_equal(np.asarray(gx)[0, :, :, 0], expected)
  # Row-major, not column-major: ones at (0, 3) and (1, 2). Output (0, 1)'s
  # window (rows -1..1, cols 1..3) holds both; the top row comes first, so
  # (0, 3) gets its cotangent (column-major order would pick (1, 2)).
  # Output (1, 1) (rows 1..3, cols 1..3) -> (1, 2); outputs (0, 0) and
  # (1, 0) see only zeros -> their top-left valid elements (0, 0) and (1, 0).
  x = np.zeros((1, 4, 4, 1), np.float32)
  x[0, 0, 3, 0] = x[0, 1, 2, 0] = 1.0
  ((_, gx),) = _pool_and_grads([jnp.asarray(x)], [g], 3, 2, 1)
  expected = np.zeros((4, 4))
  expected[0, 0], expected[0, 3], expected[1, 0], expected[1, 2] = 1, 2, 4, 8
  np.testing.assert_array_equal(np.asarray(gx)[0, :, :, 0], expected)


# --------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------


def _bn_ref(x, scale, bias, eps, groups=1):
  """numpy BatchNorm (train): returns (y, mean, unbiased var) per group."""
  x = x.astype(np.float64)
  xg = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
  axes = tuple(range(1, xg.ndim - 1))
  mean = xg.mean(axes, keepdims=True)
  var = ((xg - mean) ** 2).mean(axes, keepdims=True)
  y = (xg - mean) / np.sqrt(var + eps) * scale + bias
  n = np.prod([xg.shape[a] for a in axes])
  c = x.shape[-1]
  return y.reshape(x.shape), mean.reshape(groups, c), (var * n / (n - 1)).reshape(groups, c)


def _bn_with_random_state(c, rs, **kw):
  bn = norm.BatchNorm(c, **kw)
  bn.scale[...] = jnp.asarray(rs.uniform(0.5, 2.0, c), jnp.float32)
  bn.bias[...] = jnp.asarray(rs.randn(c), jnp.float32)
  bn.mean[...] = jnp.asarray(rs.randn(c), jnp.float32)
  bn.var[...] = jnp.asarray(rs.uniform(0.5, 2.0, c), jnp.float32)
  return bn


def test_batchnorm_train_mode_and_running_stats():
  rs = np.random.RandomState(0)
  c = 5
  bn = _bn_with_random_state(c, rs)
  scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
  old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  x = (3.0 + 2.0 * rs.randn(4, 3, 2, c)).astype(np.float32)  # [B*T, H, W, C]
  y = bn(jnp.asarray(x))
  assert y.shape == x.shape and y.dtype == jnp.float32
  y_ref, m, v = _bn_ref(x, scale, bias, 1e-5)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
  # Momentum 0.9 (flax convention) == PyTorch's 0.1; unbiased variance n/(n-1).
  np.testing.assert_allclose(
    np.asarray(bn.mean[...]), 0.9 * old_mean + 0.1 * m[0], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(bn.var[...]), 0.9 * old_var + 0.1 * v[0], rtol=1e-5, atol=1e-6
  )
  assert int(bn.count[...]) == 1
  # A second call: running stats compound, count increments.
  mean1, var1 = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  x2 = rs.randn(4, 3, 2, c).astype(np.float32)
  bn(jnp.asarray(x2))
  _, m2, v2 = _bn_ref(x2, scale, bias, 1e-5)
  np.testing.assert_allclose(
    np.asarray(bn.mean[...]), 0.9 * mean1 + 0.1 * m2[0], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(bn.var[...]), 0.9 * var1 + 0.1 * v2[0], rtol=1e-5, atol=1e-6
  )
  assert int(bn.count[...]) == 2


def test_batchnorm_custom_momentum_epsilon_and_rank3_input():
  rs = np.random.RandomState(1)
  c = 4
  bn = _bn_with_random_state(c, rs, momentum=0.7, epsilon=0.5)
  scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
  old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  x = rs.randn(6, 3, c).astype(np.float32)  # tokens [B*T, N, C]
  y = bn(jnp.asarray(x))
  y_ref, m, v = _bn_ref(x, scale, bias, 0.5)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(bn.mean[...]), 0.7 * old_mean + 0.3 * m[0], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(bn.var[...]), 0.7 * old_var + 0.3 * v[0], rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('how', ['attribute', 'eval'])
def test_batchnorm_eval_uses_running_stats(how):
  rs = np.random.RandomState(2)
  c = 5
  bn = _bn_with_random_state(c, rs)
  if how == 'attribute':
    bn.use_running_average = True
  else:
    bn.eval()
    assert bn.use_running_average
  state = {k: np.asarray(getattr(bn, k)[...]) for k in ('scale', 'bias', 'mean', 'var')}
  x = (1.0 + rs.randn(4, 3, 2, c)).astype(np.float32)
  y = bn(jnp.asarray(x))
  y_ref = (x.astype(np.float64) - state['mean']) / np.sqrt(state['var'] + 1e-5) * state[
    'scale'
  ] + state['bias']
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
  # Eval mode changes nothing.
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), state['mean'])
  np.testing.assert_array_equal(np.asarray(bn.var[...]), state['var'])
  assert int(bn.count[...]) == 0
  # And back to train mode: batch statistics again.
  bn.train()
  y = bn(jnp.asarray(x))
  np.testing.assert_allclose(
    np.asarray(y), _bn_ref(x, state['scale'], state['bias'], 1e-5)[0], rtol=1e-5, atol=1e-5
  )
  assert int(bn.count[...]) == 1


def test_batchnorm_groups():
  rs = np.random.RandomState(3)
  c = 3
  bn = _bn_with_random_state(c, rs, groups=2)
  scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
  old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  x = rs.randn(4, 2, 3, c).astype(np.float32)
  x[2:] = 5.0 + 3.0 * x[2:]  # very different statistics in the second half
  y = np.asarray(bn(jnp.asarray(x)))
  # Each contiguous half of the leading axis is normalised on its own ...
  for half in (slice(0, 2), slice(2, 4)):
    y_half, _, _ = _bn_ref(x[half], scale, bias, 1e-5)
    np.testing.assert_allclose(y[half], y_half, rtol=1e-5, atol=1e-5)
  y_ref, m, v = _bn_ref(x, scale, bias, 1e-5, groups=2)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  # ... which differs from global statistics.
  assert np.abs(y - _bn_ref(x, scale, bias, 1e-5)[0]).max() > 0.1
  # Running stats take the mean of the groups' statistics (each unbiased with
  # its own n = 2*2*3 = 12).
  np.testing.assert_allclose(
    np.asarray(bn.mean[...]), 0.9 * old_mean + 0.1 * m.mean(0), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(bn.var[...]), 0.9 * old_var + 0.1 * v.mean(0), rtol=1e-5, atol=1e-6
  )
  assert int(bn.count[...]) == 1


def test_batchnorm_groups_must_divide_leading_axis():
  bn = norm.BatchNorm(3, groups=3)
  with pytest.raises(ValueError):
    bn(jnp.zeros((4, 2, 3)))
  assert int(bn.count[...]) == 0
  bn.eval()  # eval mode needs no grouping
  assert bn(jnp.zeros((4, 2, 3))).shape == (4, 2, 3)


def test_batchnorm_bfloat16_input_and_nnx_jit():
  rs = np.random.RandomState(4)
  c = 4
  bn = _bn_with_random_state(c, rs)
  scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
  old_mean = np.asarray(bn.mean[...])
  xb = jnp.asarray(rs.randn(4, 3, c), jnp.bfloat16)
  x = np.asarray(xb.astype(jnp.float32))
  y = nnx.jit(lambda m, x: m(x))(bn, xb)  # state updates survive nnx.jit
  assert y.dtype == jnp.bfloat16
  assert bn.mean[...].dtype == jnp.float32
  y_ref, m, _ = _bn_ref(x, scale, bias, 1e-5)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), y_ref, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(
    np.asarray(bn.mean[...]), 0.9 * old_mean + 0.1 * m[0], rtol=1e-5, atol=1e-6
  )
  assert int(bn.count[...]) == 1


# --------------------------------------------------------------------------
# spiking self-attention
# --------------------------------------------------------------------------


@pytest.mark.parametrize('n,d', [(5, 3), (3, 5), (4, 4)])
@pytest.mark.parametrize('scale', [0.125, 0.3])
def test_spiking_self_attention_orders_agree(n, d, scale):
  rs = np.random.RandomState(n * 10 + d)
  q, k, v = ((rs.rand(2, 3, n, d) < 0.5).astype(np.float32) for _ in range(3))
  counts = np.einsum(
    'bhnd,bhmd,bhme->bhne', q.astype(np.int64), k.astype(np.int64), v.astype(np.int64)
  )
  assert counts.max() > 1  # multi-spike sums, so the association is exercised
  ref = counts.astype(np.float32) * np.float32(scale)
  outs = {}
  for order in ('qk_first', 'kv_first', 'auto'):
    y = ssa.spiking_self_attention(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=scale, order=order
    )
    assert y.dtype == jnp.float32 and y.shape == (2, 3, n, d)
    outs[order] = np.asarray(y)
    np.testing.assert_array_equal(outs[order], ref, err_msg=order)
  # bfloat16 spikes: products run in float32, counts stay exact.
  y = ssa.spiking_self_attention(
    jnp.asarray(q, jnp.bfloat16),
    jnp.asarray(k, jnp.bfloat16),
    jnp.asarray(v, jnp.bfloat16),
    scale=scale,
    order='auto',
  )
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), ref)


def test_spiking_self_attention_bad_order():
  x = jnp.zeros((1, 1, 2, 2))
  with pytest.raises(ValueError):
    ssa.spiking_self_attention(x, x, x, scale=1.0, order='vq_first')


# --------------------------------------------------------------------------
# SpikingNeuron
# --------------------------------------------------------------------------


def _ref_lif(x, tau=2.0, v_th=1.0):
  """numpy SpikingJelly LIF (hard reset to 0) on x[B, T, ...]."""
  v = np.zeros_like(x[:, 0])
  out = []
  for t in range(x.shape[1]):
    h = v + (x[:, t] - v) / tau
    s = (h - v_th >= 0).astype(x.dtype)
    v = h * (1 - s)
    out.append(s)
  return np.stack(out, 1)


def _intermediate(state, name):
  (value,) = state[name].get_value()  # sow keeps a tuple, one entry per call
  return np.asarray(value)


def test_spiking_neuron_folds_batch_first_and_records_spikes():
  B, T = 3, 4
  rs = np.random.RandomState(5)
  x = (0.8 + 1.2 * rs.randn(B * T, 3, 5)).astype(np.float32)  # [B*T, N, C]
  sn = layers.SpikingNeuron(neurons.Neuron(), T=T)
  y, state = nnx.capture(sn, nnx.Intermediate)(jnp.asarray(x))
  assert y.shape == x.shape and y.dtype == jnp.float32
  # Row b*T + t of the folded axis is batch b, timestep t.
  y_ref = _ref_lif(x.reshape(B, T, 3, 5)).reshape(x.shape)
  np.testing.assert_array_equal(np.asarray(y), y_ref)
  assert len(state) == 0  # nothing sown by default

  sn.record_spikes = True
  y, state = nnx.capture(sn, nnx.Intermediate)(jnp.asarray(x))
  y = np.asarray(y)
  count, numel = _intermediate(state, 'spike_count'), _intermediate(state, 'numel')
  expected = (y.reshape(B, T, -1) != 0).sum(axis=(0, 2))
  assert count.shape == (T,)
  np.testing.assert_array_equal(count, expected)
  assert len(set(expected.tolist())) > 1  # per-timestep counts really differ
  assert int(numel) == y.size == B * T * 15
  # capture returns them; nothing stays behind in the module.
  assert len(nnx.state(sn, nnx.Intermediate)) == 0


def test_spiking_neuron_ternary_counts_negative_spikes():
  B, T = 2, 4
  rs = np.random.RandomState(6)
  x = (2.0 * rs.randn(B * T, 6)).astype(np.float32)
  sn = layers.SpikingNeuron(neurons.Neuron(kind='ternary'), T=T)
  sn.record_spikes = True
  y, state = nnx.capture(sn, nnx.Intermediate)(jnp.asarray(x))
  y = np.asarray(y)
  assert (y < 0).any() and (y > 0).any()
  np.testing.assert_array_equal(
    _intermediate(state, 'spike_count'), (y.reshape(B, T, -1) != 0).sum(axis=(0, 2))
  )
  assert int(_intermediate(state, 'numel')) == y.size


def test_spiking_neuron_records_under_set_attributes_and_bad_leading_axis():
  model = layers.SpikingNeuron(neurons.Neuron(), T=2)
  model.set_attributes(record_spikes=True)
  assert model.record_spikes
  with pytest.raises(ValueError):
    model(jnp.zeros((3, 4)))  # 3 is not B*T with T = 2
