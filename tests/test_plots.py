"""Figures (valid PNGs of a plausible size) and the attention-map recording:
it leaves every kind's logits unchanged and sows the map the kind computes."""

import json
import os

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from spikeformer_jax.configs import a2os2a as a2os2a_cfgs  # the repo root is on sys.path (conftest)
from spikeformer_jax.configs import msvit as msvit_cfgs
from spikeformer_jax.configs import sdt as sdt_cfgs
from spikeformer_jax.configs import spikformer as spikformer_cfgs
from spikeformer_jax import ops
from spikeformer_jax import blocks, layers, models, neurons, plots

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _png_shape(path):
  """Pixel shape of a PNG file, after checking it is one."""
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  assert os.path.getsize(path) > 5_000
  return matplotlib.image.imread(path).shape


def _randomise(model, seed=0):
  """Weights from numpy in place of the model's initialisers (which compile a
  small program per parameter shape: ~10 s a family on 2 cores); biases
  around 1 so that every layer fires. Eval-mode BN: mean 0, var 1."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    shape, dtype, name = var.get_value().shape, var.get_value().dtype, path[-1]
    if name in ('kernel', 'pos_embed'):
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == 'bias':
      value = 1.0 + 0.5 * rng.standard_normal(shape)
    elif name in ('scale', 'var'):
      value = np.ones(shape)
    else:  # BN mean and count
      value = np.zeros(shape)
    var.set_value(jnp.asarray(value, dtype))
  return model


def _model(cfgs, variant, attention=None):
  c = cfgs.get_config(f'{variant},runlocal')
  if attention:
    c.model.attention = attention
  model = _randomise(nnx.eval_shape(lambda: models.build_model(c.model)))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (2,) + tuple(c.data.shape))
  return model, x


# --------------------------------------------------------------------------
# Firing rates and learning curves.
# --------------------------------------------------------------------------


def test_firing_rate_figure(tmp_path):
  rng = np.random.default_rng(0)
  heights = {}
  for n in (20, 80):
    rates = {
      f'block.{i // 4}.attn.{"qkvp"[i % 4]}_lif': rng.uniform(0, 0.4, 4).tolist() for i in range(n)
    }
    path = str(tmp_path / f'rates{n}.png')
    assert plots.firing_rate_figure(rates, path, title=f'{n} layers') == path
    h, w, c = _png_shape(path)
    assert c in (3, 4) and w > 600
    assert h >= 0.15 * n * plots.DPI  # room for one readable label per layer
    heights[n] = h
  assert heights[80] > 2 * heights[20]
  with pytest.raises(ValueError, match='same number'):
    plots.firing_rate_figure({'a': [0.1, 0.2], 'b': [0.1]}, str(tmp_path / 'bad.png'))


def _write_jsonl(path, rows, tail=''):
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
    f.write(tail)


def test_learning_curves_resumed_run_and_errors(tmp_path):
  train = lambda s, loss: {
    'step': s,
    'time': 1.0,
    'train_loss': loss,
    'train_top1': 1 - loss,
    'train_lr': 1e-3 * s,
    'images_per_s': 100.0,
  }
  test = lambda s, top1: {'step': s, 'test_top1': top1, 'test_loss': 1 - top1, 'test_count': 32}
  rows = [
    train(2, 0.9),
    train(4, 0.8),
    test(4, 0.3),
    train(4, 0.7),
    test(4, 0.35),
    train(6, 0.5),
    test(6, 0.5),
    test(6, 0.55),
  ]
  path = tmp_path / 'run' / 'metrics.jsonl'
  path.parent.mkdir()
  _write_jsonl(path, rows, tail='{"step": 8, "train_lo')  # a live run's partial line
  m = plots.read_metrics(str(path))
  np.testing.assert_array_equal(m['train_loss'][0], [2, 4, 6])
  np.testing.assert_allclose(m['train_loss'][1], [0.9, 0.7, 0.5])  # last of step 4
  np.testing.assert_allclose(m['test_top1'][1], [0.35, 0.55])
  assert 'time' not in m and 'step' not in m
  out = str(tmp_path / 'curves.png')
  assert plots.learning_curves(str(path), out) == out
  assert _png_shape(out)[1] > 600

  _write_jsonl(path, rows[:2])  # no evaluation yet
  assert _png_shape(plots.learning_curves(str(path), out))[0] > 400
  missing = str(tmp_path / 'nope' / 'metrics.jsonl')
  with pytest.raises(FileNotFoundError, match='nope/metrics.jsonl'):
    plots.learning_curves(missing, out)
  _write_jsonl(path, [])
  with pytest.raises(ValueError, match='metrics.jsonl: no metrics'):
    plots.learning_curves(str(path), out)
  _write_jsonl(path, [{'step': 1}], tail='not json\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2'):
    plots.read_metrics(str(path))


# --------------------------------------------------------------------------
# Attention maps.
# --------------------------------------------------------------------------

_fwd = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x))

# (configs, variant, attention, {module path: sown map shape after [B*T=4, heads=2]})
CASES = {
  'ssa': (spikformer_cfgs, 'cifar10-4-384', 'ssa', {'block.0.attn': (64, 64)}),
  'a_i': (spikformer_cfgs, 'cifar10-4-384', 'a_i', {'block.0.attn': (64, 64)}),
  'vsa': (spikformer_cfgs, 'cifar10-4-384', 'vsa', {'block.0.attn': (64, 64)}),
  'sdsa': (sdt_cfgs, 'cifar10-2-512', 'sdsa', {'block.0.attn': (1, 16)}),
  'a2os2a': (a2os2a_cfgs, 'cifar10-2-256', 'a2os2a', {'block.0.attn': (64, 64)}),
  'mssa+ssa': (
    msvit_cfgs,
    'cifar10-4-384',
    None,
    {'stage1.0.tssa': (1024, 1), 'stage2.0.tssa': (256, 1), 'stage3.0.ssa': (64, 64)},
  ),
}


@pytest.mark.parametrize('case', list(CASES))
def test_recording_attention_keeps_logits(case):
  cfgs, variant, attention, shapes = CASES[case]
  model, x = _model(cfgs, variant, attention)
  logits, inter = _fwd(model, x)
  assert len(inter) == 0  # off by default: nothing sown
  model.set_attributes(record_attention=True)
  recorded, inter = _fwd(model, x)
  model.set_attributes(record_attention=False)
  np.testing.assert_array_equal(np.asarray(recorded), np.asarray(logits))
  sown = {'.'.join(map(str, p[:-1])): v.get_value() for p, v in nnx.to_flat_state(inter)}
  assert {k: v[0].shape[2:] for k, v in sown.items()} == shapes
  assert all(len(v) == 1 and v[0].shape[:2] == (4, 2) for v in sown.values())
  assert [n for n, _ in plots.attention_modules(model)] == list(shapes)  # network order
  if attention == 'vsa':
    np.testing.assert_allclose(sown['block.0.attn'][0].sum(-1), 1.0, rtol=1e-5)


def _attention(kind, style, order='qk_first'):
  settings = layers.Settings(T=2, neuron=neurons.Neuron())
  attn = nnx.eval_shape(
    lambda: blocks.SpikingAttention(
      16,
      2,
      settings=settings,
      kind=kind,
      style=style,
      scale=0.125,
      order=order,
      init='trunc_normal',
      rngs=nnx.Rngs(0),
    )
  )
  _randomise(attn, seed=3).eval()
  attn.record_attention = True
  return attn


def test_ssa_map_is_spike_qk_times_scale():
  """Recorded even where the forward never forms Q K^T (order kv_first)."""
  attn = _attention('ssa', 'spikformer', order='kv_first')
  x = jnp.asarray(np.random.default_rng(0).random((4, 6, 16)) < 0.4, jnp.float32)

  @nnx.jit
  def run(attn, x):
    _, inter = nnx.capture(attn, nnx.Intermediate)(x)
    q = attn.q_lif(attn.q_bn(attn.q_linear(x)))
    k = attn.k_lif(attn.k_bn(attn.k_linear(x)))
    return inter['attention_map'].get_value()[0], q, k

  amap, q, k = map(np.asarray, run(attn, x))
  qh, kh = (np.asarray(ops.split_heads(jnp.asarray(t), 2)) for t in (q, k))
  assert qh.any() and kh.any() and set(np.unique(qh)) <= {0.0, 1.0}
  ref = (qh @ kh.transpose(0, 1, 3, 2)) * 0.125  # spike counts: exact
  assert amap.shape == (4, 2, 6, 6) and len(np.unique(ref)) > 2
  np.testing.assert_array_equal(amap, ref)


def test_sdsa_map_is_the_talking_heads_gate():
  attn = _attention('sdsa', 'sdt')
  u = jnp.asarray(2 * np.random.default_rng(1).standard_normal((4, 6, 16)), jnp.float32)

  @nnx.jit
  def run(attn, u):
    _, inter = nnx.capture(attn, nnx.Intermediate)(u)
    x = attn.shortcut_lif(u)
    k = ops.split_heads(attn.k_lif(attn.k_bn(attn.k_linear(x))), 2)
    v = ops.split_heads(attn.v_lif(attn.v_bn(attn.v_linear(x))), 2)
    kv = (k * v).sum(axis=-2, keepdims=True)  # [4, 2, 1, 8]
    return inter['attention_map'].get_value()[0], attn.talking_heads_lif(kv.reshape(4, -1))

  amap, gate = map(np.asarray, run(attn, u))
  assert amap.shape == (4, 2, 1, 8) and 0 < amap.mean() < 1
  np.testing.assert_array_equal(amap.reshape(4, -1), gate)


def test_attention_maps_figure(tmp_path):
  model, x = _model(spikformer_cfgs, 'cifar10-4-384')
  path = str(tmp_path / 'ssa.png')
  assert plots.attention_maps(model, x, path, heads=(0, 1), example=1) == path
  h, w, _ = _png_shape(path)
  assert h > 2 * 1.5 * plots.DPI and w > 3 * 1.5 * plots.DPI  # 2 timesteps x (input + 2 heads)
  assert not model.block[0].attn.record_attention  # restored
  with pytest.raises(IndexError, match='1 attention modules'):
    plots.attention_maps(model, x, path, block=1)
  model.train()
  with pytest.raises(ValueError, match='eval'):
    plots.attention_maps(model, x, path)

  # Event frames [B, T, H, W, 2] and a per-channel gate (sdsa, 1 x d).
  model, x = _model(sdt_cfgs, 'cifar10dvs-2-256')
  assert x.shape[1:] == (2, 32, 32, 2)
  path = str(tmp_path / 'sdsa.png')
  h, w, _ = _png_shape(plots.attention_maps(model, x, path, timesteps=(1,)))
  assert h < w  # one timestep row, input + one head
