"""The fused Pallas kernels (model.kernels): exact against the pure-JAX path
(interpret mode on CPU), on every neuron option and family, sharded, and
compiled for TPU (Mosaic, libtpu) and GPU (Triton, jax.export) targets."""

import contextlib
import dataclasses
import importlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from spikeformer_jax import errors, experiment, kernels, layers, models, neurons
from spikeformer_jax.norm import BatchNorm
from test_train import _tiny, assert_eight_devices_equal_one, assert_no_gather_on_eight_devices

# Every neuron option of the pure-JAX path (kinds, charge forms, resets,
# surrogates, thresholds, membranes).
NEURONS = {
  'lif': neurons.Neuron(),
  'if': neurons.Neuron(kind='if'),
  'ternary': neurons.Neuron(kind='ternary'),
  'ternary_clamp_paper': neurons.Neuron(kind='ternary', charge_form='paper', ternary_grad='clamp'),
  'paper_lif': neurons.Neuron(charge_form='paper', beta=0.25),
  'soft_reset_atan': neurons.Neuron(v_reset=None, surrogate='atan'),
  'no_detach_triangle': neurons.Neuron(detach_reset=False, surrogate='triangle'),
  'straight_through_vth': neurons.Neuron(surrogate='straight_through', v_threshold=0.5),
  'reset_decay_off': neurons.Neuron(v_reset=-0.25, decay_input=False, tau=4.0, alpha=3.0),
  'recompute_python_loop': neurons.Neuron(loop='python', recompute=True),
}


def _vjp(f, x, g):
  s, pull = jax.vjp(jax.jit(f), x)
  return np.asarray(s), np.asarray(pull(g)[0])


def _neuron_pair(n, dtype, shape=(3, 4, 2, 128), loop='scan'):
  """(spikes, input cotangent) of the pure-JAX path (`loop`, default the
  default scan) and of the kernel."""
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype) * 2
  g = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
  ref = _vjp(lambda a: neurons.multistep(dataclasses.replace(n, loop=loop), a), x, g)
  return ref, _vjp(lambda a: kernels.multistep(n, a), x, g)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# One small case of each kernel in the quick tier; every option in the full one.
_QUICK = ('lif', 'ternary_clamp_paper', 'no_detach_triangle')


@pytest.mark.parametrize(
  'name', [n if n in _QUICK else pytest.param(n, marks=pytest.mark.slow) for n in sorted(NEURONS)]
)
def test_neuron_kernel_is_bit_exact_in_float64(name, x64):
  (s, g), (ks, kg) = _neuron_pair(NEURONS[name], jnp.float64)
  assert s.tobytes() == ks.tobytes()
  assert g.tobytes() == kg.tobytes()


@pytest.mark.parametrize('name', ['lif', 'ternary', 'soft_reset_atan'])
def test_neuron_kernel_float32_spikes_exact_gradients_to_an_ulp(name):
  """Spikes are bit-exact. Gradients: XLA:CPU's LLVM contracts a*b + c into
  an FMA depending on the shape of the fused loop, so two XLA programs of the
  same expression can differ by an ulp; test_float32_bit_exact_without_fma
  removes that and asserts bit equality."""
  (s, g), (ks, kg) = _neuron_pair(NEURONS[name], jnp.float32)
  assert s.tobytes() == ks.tobytes()
  np.testing.assert_allclose(kg, g, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(g).max())


# A nonzero reset value: the kernel and the scan then differ in float32 by
# up to an ulp of the gradient, as the scan and the unrolled loop (both
# pure JAX) do between themselves; float64 is bit-exact there too.
_ULP_APART = {'reset_decay_off'}


@pytest.mark.slow
def test_float32_bit_exact_without_fma():
  """Every neuron option, float32 and bfloat16 (float32 membranes and the
  'compute' ones), bit for bit against the default scan, in a process whose
  XLA:CPU does not contract multiply-adds (--xla_backend_optimization_level=0)."""
  code = textwrap.dedent(
    """
    import jax.numpy as jnp, numpy as np, test_kernels as t
    cases = [(k, n, d) for k, n in sorted(t.NEURONS.items()) for d in (jnp.float32, jnp.bfloat16)]
    cases.append(('membrane=compute', t.neurons.Neuron(membrane='compute'), jnp.bfloat16))
    bad = []
    for name, n, dtype in cases:
      (s, g), (ks, kg) = t._neuron_pair(n, dtype)
      if s.tobytes() != ks.tobytes():
        bad.append((name, dtype.__name__, 'spikes'))
      elif name in t._ULP_APART:
        g, kg = g.astype(np.float32), kg.astype(np.float32)
        if np.abs(g - kg).max() > np.finfo(np.float32).eps * np.abs(g).max():
          bad.append((name, dtype.__name__, 'gradient beyond an ulp'))
      elif g.tobytes() != kg.tobytes():
        bad.append((name, dtype.__name__, 'gradient'))
    print('BAD', bad)
    """
  )
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_backend_optimization_level=0',
    JAX_NUM_CPU_DEVICES='1',
    PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / 'tests')]),
  )
  p = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'BAD []' in p.stdout, p.stdout[-2000:]


def _bn_then_neuron(n, x, scale, bias, T):
  bn = BatchNorm(x.shape[-1], param_dtype=scale.dtype, dtype=x.dtype)
  bn.scale[...], bn.bias[...] = scale, bias
  y = bn(x)
  s = neurons.multistep(n, y.reshape((-1, T) + y.shape[1:])).reshape(x.shape)
  return s, bn.mean[...], bn.var[...]


def _fused(n, x, scale, bias, T):
  bn = BatchNorm(x.shape[-1], param_dtype=scale.dtype, dtype=x.dtype)
  norm = kernels.Norm(bn.epsilon, x.dtype)
  s, mean, var = kernels.norm_fire(n, norm, x, scale, bias, T)
  bn.update_statistics(mean, var, x.size // x.shape[-1])
  return s, bn.mean[...], bn.var[...]


@pytest.mark.parametrize(
  'name', ['lif', pytest.param('ternary_clamp_paper', marks=pytest.mark.slow), 'no_detach_triangle']
)
def test_norm_fire_equals_batchnorm_then_neuron(name, x64):
  """Forward (spikes, running statistics) bit for bit; gradients of x, scale
  and bias to 1e-12 relative in float64 (the fused reductions sum in another
  order than autodiff's)."""
  n, T = NEURONS[name], 4
  x = jax.random.normal(jax.random.key(0), (3 * T, 5, 8, 48), jnp.float64) * 2 + 0.3
  scale = jax.random.uniform(jax.random.key(2), (48,), jnp.float64) + 0.5
  bias = jax.random.normal(jax.random.key(3), (48,), jnp.float64) * 0.1
  g = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
  outs = []
  for f in (_bn_then_neuron, _fused):
    (s, mean, var), pull = jax.vjp(lambda a, b, c, f=f: f(n, a, b, c, T), x, scale, bias)
    grads = pull((g, jnp.zeros_like(mean), jnp.zeros_like(var)))
    outs.append((s, mean, var, grads))
  (s, mean, var, grads), (ks, kmean, kvar, kgrads) = outs
  for a, b in ((s, ks), (mean, kmean), (var, kvar)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  for a, b in zip(grads, kgrads):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max()


def _model_grads(family, variant, kernels_choice):
  module = importlib.import_module(f'spikeformer_jax.configs.{family}')
  cfg = module.get_config(variant + ',runlocal')
  cfg.model.dtype = 'float64'
  cfg.model.kernels = kernels_choice
  model = models.build_model(cfg.model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.uniform(jax.random.key(0), (4,) + experiment.input_shape(cfg), jnp.float64)

  def loss(p):
    m = nnx.merge(graphdef, p, rest, copy=True)
    y = m(x)
    return jnp.sum(y * jnp.arange(y.shape[-1])), (y, nnx.state(m, nnx.BatchStat))

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return y, grads, stats


FAMILIES = [  # whole networks in interpret mode: the full tier
  pytest.param('spikformer', 'cifar10-4-384', marks=pytest.mark.slow),
  pytest.param('sdt', 'cifar10-2-512', marks=pytest.mark.slow),
  pytest.param('msvit', 'cifar10-4-384', marks=pytest.mark.slow),
  pytest.param('a2os2a', 'cifar10-2-256', marks=pytest.mark.slow),
]


@pytest.mark.parametrize('family,variant', FAMILIES)
def test_family_with_kernels_equals_xla(family, variant, x64):
  """A whole network, float64: logits and BatchNorm statistics bit for bit,
  gradients to 1e-12 of the largest (the fused BatchNorm reductions)."""
  y, grads, stats = _model_grads(family, variant, 'xla')
  ky, kgrads, kstats = _model_grads(family, variant, 'pallas')
  assert np.asarray(y).tobytes() == np.asarray(ky).tobytes()
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(kstats)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  top = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(kgrads)):
    assert float(jnp.abs(a - b).max()) <= 1e-12 * top


def test_eight_devices_equal_one_with_kernels():
  assert_eight_devices_equal_one(_tiny(**{'model.kernels': 'pallas'}))


def test_kernels_map_over_the_batch_shards():
  """Eight devices: each kernel runs on its own shard (shard_map), so the
  compiled step all-reduces gradients and statistics but gathers nothing."""
  assert_no_gather_on_eight_devices(_tiny(**{'model.kernels': 'pallas'}))


def test_auto_is_pallas_on_tpu_only_and_bad_names_are_clear():
  assert kernels.resolve('auto') == 'xla'  # this machine: CPU
  with kernels.compiling_for('tpu'):
    assert kernels.resolve('auto') == 'pallas'
  with kernels.compiling_for('gpu'):
    assert kernels.resolve('auto') == 'xla'
  assert kernels.resolve('pallas') == 'pallas'
  with pytest.raises(errors.ConfigError, match="model.kernels='cuda'; valid: xla, pallas, auto"):
    kernels.resolve('cuda')
  config = _tiny(**{'model.kernels': 'fused'})
  with pytest.raises(errors.ConfigError, match="model.kernels='fused'"):
    models.build_model(config.model)


def test_where_a_kernel_does_not_apply_the_layer_says_why_and_keeps_the_xla_path():
  assert 'not a power of two' in kernels.unsupported(neurons.Neuron(tau=3.0))
  assert kernels.unsupported(neurons.Neuron(kind='if', tau=3.0)) is None  # no division
  assert 'float activation' in kernels.unsupported(neurons.Neuron(kind='relu'))
  with pytest.raises(errors.ConfigError, match='tau=3.0 is not a power of two'):
    kernels.multistep(neurons.Neuron(tau=3.0), jnp.zeros((2, 4, 8, 128)))
  assert 'groups' in kernels.unsupported_norm(2)
  lif = layers.SpikingNeuron(neurons.Neuron(tau=3.0), 4, kernels='pallas')
  assert not lif.fused((8, 8, 128))
  x = jax.random.normal(jax.random.key(0), (8, 8, 128))
  np.testing.assert_array_equal(lif(x), layers.SpikingNeuron(neurons.Neuron(tau=3.0), 4)(x))
  assert layers.SpikingNeuron(neurons.Neuron(), 4, kernels='pallas').fused((8, 8, 128))


def test_kernels_change_no_parameter_path():
  """A run can switch kernels on resume: the same state either way."""
  paths = {}
  for choice in ('xla', 'pallas'):
    config = _tiny(**{'model.kernels': choice})
    model = nnx.eval_shape(lambda c=config: models.build_model(c.model))
    paths[choice] = jax.tree.structure(nnx.state(model))
  assert paths['xla'] == paths['pallas']


def _tpu_devices():
  from spikeformer_jax import aot

  try:
    return aot.tpu_devices(aot.parse_topology('v5e:2x2'))
  except aot.PlanError as e:
    pytest.skip(f'no TPU compiler here: {e}')


def test_kernels_compile_for_tpu_with_mosaic():
  """The neuron and the fused BatchNorm kernels lower with Mosaic and compile
  for a v5e 2x2 slice (libtpu, no TPU), sharded over its four chips; the
  compiled program counts the kernels' bytes as their operands and results."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = _tpu_devices()
  mesh = Mesh(np.array(devices).reshape(4, 1), ('data', 'fsdp'))
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  T, n = 4, neurons.Neuron()

  def step(x, scale, bias):
    with kernels.compiling_for('tpu', mesh):

      def f(x, scale, bias):
        s, _, _ = kernels.norm_fire(n, kernels.Norm(1e-5, x.dtype), x, scale, bias, T)
        s = kernels.multistep(n, s.reshape((-1, T) + s.shape[1:]))
        return jnp.sum(s.astype(jnp.float32))

      return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

  x = jax.ShapeDtypeStruct((64 * T, 64, 384), jnp.bfloat16, sharding=batch)
  c = jax.ShapeDtypeStruct((384,), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = jax.jit(step).trace(x, c, c).lower(lowering_platforms=('tpu',)).compile()
  hlo = compiled.as_text()
  assert hlo.count('tpu_custom_call') >= 4  # norm_fire fwd, sums, dx; neuron fwd, bwd
  assert 'all-gather' not in hlo
  per_chip = 16 * T * 64 * 384 * 2  # one bfloat16 activation on one chip
  assert compiled.cost_analysis()['bytes accessed'] < 20 * per_chip


def test_neuron_kernel_lowers_for_gpu_with_triton():
  """jax.export for CUDA lowers the neuron kernel with Pallas' Triton backend
  (no GPU needed), at a T that is not a power of two; the fused BatchNorm
  stays on the XLA path there."""
  from jax import export

  n = neurons.Neuron()

  def f(x, g):
    with kernels.compiling_for('gpu'):
      s, pull = jax.vjp(lambda a: kernels.multistep(n, a), x)
      return s, pull(g)[0]

  x = jax.ShapeDtypeStruct((8, 10, 64, 384), jnp.bfloat16)
  triton = '__gpu$xla.gpu.triton'
  target = contextlib.nullcontext()
  if hasattr(jax.sharding, 'AbstractDevice'):  # jax >= 0.12 asks which GPU it lowers for
    h100 = jax.sharding.AbstractDevice('NVIDIA H100 80GB HBM3', None, 'gpu')
    mesh = jax.sharding.AbstractMesh((1,), ('x',), abstract_device=h100)
    target = jax.sharding.use_abstract_mesh(mesh)
  with target:
    exported = export.export(
      jax.jit(f),
      platforms=['cuda'],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)],
    )(x, x)
  assert exported.mlir_module().count('xla.gpu.triton') == 2  # forward, backward
  with kernels.compiling_for('gpu'):
    assert 'TPU' in kernels.unsupported_norm(1)


@pytest.mark.slow
def test_fidelity_replays_recordings_with_the_kernels(shared_dir, tmp_path):
  """`fidelity --kernels=pallas`: a one-step recording and a training
  trajectory of the official code, replayed with the fused kernels
  (interpret mode), match at their usual tolerances. (The full set of
  recordings: the closing note of issue 30.)"""
  from conftest import run_fidelity

  files = [
    shared_dir / 'fixtures' / 'spikformer_cifar.npz',
    shared_dir / 'fixtures' / 'trajectory' / 'traj_spikformer_cifar.npz',
  ]
  reports, proc = run_fidelity(files, tmp_path / 'r.json', 900, '--kernels=pallas')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert all(r['ok'] for r in reports.values()), reports
  assert '2/2 fixture files match' in proc.stdout
