"""Fused Pallas kernels for the spiking hot path (`model.kernels`).

XLA fuses elementwise work, but the fusions of a spiking step stop where it
hurts: it keeps float32 membranes and cotangents per timestep in HBM, and it
runs BatchNorm's statistics, its backward and the neuron's reverse-time loop
as separate passes. These kernels keep a neuron's membrane on chip across
all T timesteps:

  * `multistep(n, x)`: the multi-step neuron. The forward runs the T steps of
    `neurons.step` in one kernel and writes only the spikes; the backward
    (`jax.custom_vjp`) keeps only the input x, recomputes the membranes on
    chip and runs the reverse-time loop in one kernel, each step the VJP of
    the same `neurons.step` that the pure-JAX scan differentiates. So spikes
    and gradients equal the default `loop='scan'` bit for bit.
  * `norm_fire(bn, n, x, T)`: BatchNorm (train mode) fused with the neuron it
    feeds. The statistics are XLA's reductions (the same operations as
    `norm.BatchNorm`); one kernel normalises and fires. The backward takes
    two kernels: one emits BatchNorm's two reductions (sum of the cotangent,
    and of cotangent * normalised input), one writes the input's cotangent,
    each recomputing the neuron from x; no float32 intermediate reaches HBM.
    Forward values are bit-identical; the reductions' summation order
    differs from autodiff's, so gradients agree to float rounding.

`model.kernels`: 'xla' (the pure-JAX path), 'pallas' (these kernels, where
they apply) or 'auto' (pallas when compiling for TPU, xla elsewhere until
GPUs are measured). Where a kernel does not apply it says why
(`unsupported`) and the layer takes the pure-JAX path: a non-spiking
activation, MSViT's batch-as-time neuron, a neuron whose unit count is not a
multiple of 128, per-device BatchNorm groups. On CPU the kernels run in
Pallas' interpret mode (the same kernel body, for the exactness tests); on
TPU they compile with Mosaic; GPUs lower them with Triton.

Layout: x [B, T, M] (batch first, as the folded layers give it) is viewed as
[B, T, M / 128, 128], so every block's two minor dimensions are (rows, 128
lanes) whatever T; a block holds all T timesteps of `rows` x 128 units of
`bb` examples.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from spikeformer_jax import errors
from spikeformer_jax import neurons
from spikeformer_jax import sharding
from spikeformer_jax import synapses
from spikeformer_jax.norm import batch_statistics

KERNELS = ('xla', 'pallas', 'auto')
LANES = 128
# Elements of one input block (all T steps): ~1 MiB of float32 per buffer
# keeps the double-buffered operands and the on-chip membranes well inside
# VMEM (16 MiB scoped by default on v5e) at any T.
_BLOCK_ELEMENTS = 1 << 18

_MESH: contextvars.ContextVar = contextvars.ContextVar('kernels_mesh', default=None)


@contextlib.contextmanager
def compiling_for(platform: str | None, mesh=None):
  """Resolves 'auto' (this module's and synapses') for `platform` while
  tracing, and maps the kernels over the batch shards of `mesh` (a kernel is
  a custom call that XLA's partitioner cannot split: without the mesh a
  sharded batch would be gathered onto every device)."""
  token = _MESH.set(mesh)
  try:
    with synapses.compiling_for(platform):
      yield
  finally:
    _MESH.reset(token)


def resolve(kernels: str) -> str:
  """'auto' -> 'pallas' when compiling for TPU, 'xla' elsewhere."""
  if kernels not in KERNELS:
    raise errors.ConfigError(f'model.kernels={kernels!r}; valid: {", ".join(KERNELS)}.')
  if kernels == 'auto':
    return 'pallas' if _platform() == 'tpu' else 'xla'
  return kernels


def unsupported(n: neurons.Neuron) -> str | None:
  """Why the kernels cannot run neuron `n`, or None when they can."""
  if n.kind in neurons.ACTIVATIONS:
    return f'{n.kind} is a float activation, not a neuron'
  if math.frexp(n.tau)[0] != 0.5 and n.kind != 'if' and n.charge_form != 'paper':
    # neurons._divisor keeps an IEEE division behind an optimisation barrier,
    # which a kernel cannot express; powers of two (2.0) divide exactly.
    return f'tau={n.tau} is not a power of two'
  return None


# --------------------------------------------------------------------------
# Blocking and the call (interpret mode on CPU, compiled elsewhere).
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """Blocks of a [B, T, K, S, C] operand: (bb, T, kb, sb, C), the two minor
  dimensions (S, C) as XLA lays them out (tiles of 8 or more x 128), so the
  view is free. Grid (k blocks, s blocks, b blocks), the batch innermost."""

  shape: tuple
  bb: int
  kb: int
  sb: int

  @property
  def grid(self):
    B, _, K, S, _ = self.shape
    return (pl.cdiv(K, self.kb), pl.cdiv(S, self.sb), pl.cdiv(B, self.bb))

  def data(self):
    T, C = self.shape[1], self.shape[4]
    return pl.BlockSpec((self.bb, T, self.kb, self.sb, C), lambda k, s, b: (b, 0, k, s, 0))


def _padded(n: int, m: int) -> int:
  return -(-n // m) * m


def _divisor(n: int, limit: int, multiple: int = 1) -> int | None:
  """The largest divisor of n that is at most `limit` and a multiple of
  `multiple` (n itself when it fits), or None."""
  if n <= limit:
    return n
  best = None
  for d in range(multiple, limit + 1, multiple):
    if n % d == 0:
      best = d
  return best


def _blocks(shape: tuple) -> _Blocks | None:
  """Blocks that tile `shape` exactly (no ragged edge, so the fused
  reductions need no masks), or None when no exact tiling fits VMEM."""
  if _platform() == 'gpu':  # one power-of-two row of units per program
    return _Blocks(shape, 1, 1, 1)
  B, T, K, S, C = shape
  slab = T * _padded(S, 8) * _padded(C, LANES)  # one (example, k) in VMEM, all T steps
  if slab <= _BLOCK_ELEMENTS:
    kb = _divisor(K, max(1, _BLOCK_ELEMENTS // slab)) or 1
    bb = (_divisor(B, max(1, _BLOCK_ELEMENTS // (slab * kb))) or 1) if kb == K else 1
    return _Blocks(shape, bb, kb, S)
  # Split S in multiples of 32 (the int8 / bf16 / f32 sublane tilings divide it).
  sb = _divisor(S, _BLOCK_ELEMENTS // (T * _padded(C, LANES)), 32)
  return _Blocks(shape, 1, 1, sb) if sb else None


def _tiling(shape: tuple) -> _Blocks:
  blocks = _blocks(shape)
  if blocks is None:  # unsupported_shape() said so before any kernel was traced
    raise ValueError(f'no kernel block tiles {shape}')
  return blocks


def _view_shape(shape: tuple) -> tuple:
  """[B, T, ..., S, C] as [B, T, K, S, C]. On TPU a bitcast: the minor two
  stay, as XLA tiles them. On GPU, where Triton wants power-of-two blocks,
  [B, T, M / L, 1, L] with L the largest power of two <= 1024 dividing M."""
  B, T, *rest = shape
  if _platform() == 'gpu':
    m = math.prod(rest)
    lanes = math.gcd(m, 1024) if m else 1
    return (B, T, m // lanes, 1, lanes)
  rest = [1] * (2 - len(rest)) + rest
  return (B, T, math.prod(rest[:-2]), rest[-2], rest[-1])


def _view(x: jax.Array) -> jax.Array:
  return x.reshape(_view_shape(x.shape))


def _call(kernel, blocks: _Blocks, in_specs, out_specs, out_shape, *args, reduce=False):
  """pallas_call on the platform being compiled for: Pallas' interpreter on
  CPU (XLA's ops: the exactness tests), the compiled kernel elsewhere.
  `reduce`: the outputs accumulate over the batch blocks (the innermost grid
  axis, then sequential)."""

  def run(interpret, *a):
    params: dict[str, Any] = {}
    if not interpret and _platform() == 'tpu':
      from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

      sem: tuple[Literal['parallel', 'arbitrary'], ...] = (
        'parallel',
        'parallel',
        'arbitrary' if reduce else 'parallel',
      )
      params = {'compiler_params': pltpu.CompilerParams(dimension_semantics=sem)}
    elif not interpret and _platform() == 'gpu':
      from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

      params = {'compiler_params': pltriton.CompilerParams()}
    return pl.pallas_call(
      kernel,
      grid=blocks.grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=interpret,
      **params,
    )(*a)

  return jax.lax.platform_dependent(
    *args, cpu=functools.partial(run, True), default=functools.partial(run, False)
  )


def _platform() -> str:
  return synapses.target_platform()


def _per_shard(fn, batch_args: int, batch_out: tuple[bool, ...]):
  """fn over the batch shards of the target mesh, when one is set: its first
  `batch_args` arguments are split on their leading (batch) axis, the rest
  (per-channel rows) replicated; outputs are split (batch_out) or stacked
  along a new leading axis, one per shard, for the caller to reduce. (A
  kernel is a custom call that XLA's partitioner cannot split: unmapped, a
  sharded batch would be gathered onto every device.)"""

  def stacked(*a):
    return tuple(o if b else o[None] for o, b in zip(fn(*a), batch_out))

  mesh = _MESH.get()
  if mesh is None or mesh.size == 1:
    return stacked
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  def call(*a):
    in_specs = tuple(sharding.BATCH if i < batch_args else P() for i in range(len(a)))
    out_specs = (sharding.BATCH,) * len(batch_out)
    return jax.shard_map(
      stacked, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )(*a)

  return call


# --------------------------------------------------------------------------
# The neuron, step by step (shared by every kernel).
# --------------------------------------------------------------------------


def _membrane(n: neurons.Neuron, dtype):
  return neurons.membrane_dtype(dtype) if n.membrane == 'float32' else dtype


def _fire_all(n, T, load):
  """The forward: yields (t, spike) for t = 0..T-1 and returns the membranes
  before each step (what the backward recomputes)."""
  vs, spikes = [], []
  v = None
  for t in range(T):
    x = load(t)
    v = jnp.full(x.shape, n.v_init, x.dtype) if v is None else v
    vs.append(v)
    v, s, _ = neurons.step(n, v, x)
    spikes.append(s)
  return vs, spikes


def _reverse(n, T, vs, load, load_g):
  """The reverse-time loop: each step the VJP of `neurons.step` (spike and
  carried membrane) at the recomputed membrane, as autodiff of the forward
  scan forms it. Returns the inputs' cotangents, [T] of them."""
  g_v, g_xs = None, [None] * T
  for t in reversed(range(T)):
    x = load(t)
    g_v = jnp.zeros_like(x) if g_v is None else g_v
    _, vjp = jax.vjp(lambda v, x_: neurons.step(n, v, x_)[:2], vs[t], x)
    g_v, g_xs[t] = vjp((g_v, load_g(t)))
  return g_xs


# --------------------------------------------------------------------------
# The multi-step neuron.
# --------------------------------------------------------------------------


def _neuron_fwd_kernel(n, T, x_ref, s_ref):
  mdt = _membrane(n, x_ref.dtype)
  _, spikes = _fire_all(n, T, lambda t: x_ref[:, t].astype(mdt))
  for t, s in enumerate(spikes):
    s_ref[:, t] = s.astype(s_ref.dtype)


def _neuron_bwd_kernel(n, T, x_ref, g_ref, gx_ref):
  mdt = _membrane(n, x_ref.dtype)

  def load(t):
    return x_ref[:, t].astype(mdt)

  vs, _ = _fire_all(n, T, load)
  for t, g_x in enumerate(_reverse(n, T, vs, load, lambda t: g_ref[:, t].astype(mdt))):
    gx_ref[:, t] = g_x.astype(gx_ref.dtype)


def _elementwise(kernel_body, n, x, *operands):
  """A kernel over x [B, T, ...] (and operands of x's shape) to x's shape."""
  T = x.shape[1]

  def shard(*arrays):
    blocks = _tiling(arrays[0].shape)
    out = jax.ShapeDtypeStruct(arrays[0].shape, x.dtype)
    spec = blocks.data()
    kernel = functools.partial(kernel_body, n, T)
    return (_call(kernel, blocks, [spec] * len(arrays), spec, out, *arrays),)

  views = [_view(a) for a in (x, *operands)]
  (out,) = _per_shard(shard, len(views), (True,))(*views)
  return out.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _neuron(n, x):
  return _elementwise(_neuron_fwd_kernel, n, x)


def _neuron_fwd(n, x):
  return _elementwise(_neuron_fwd_kernel, n, x), x  # the input is the only residual


def _neuron_bwd(n, x, g):
  return (_elementwise(_neuron_bwd_kernel, n, x, g.astype(x.dtype)),)


_neuron.defvjp(_neuron_fwd, _neuron_bwd)


def _shard_shape(shape: tuple) -> tuple:
  mesh = _MESH.get()
  shards = 1 if mesh is None else sharding.data_size(mesh)
  B, T, K, S, C = shape
  return (B // shards if B % shards == 0 else B, T, K, S, C)


def unsupported_shape(shape: tuple) -> str | None:
  """Why no kernel block tiles x [B, T, ...] exactly, or None."""
  view = _shard_shape(_view_shape(shape))
  if _platform() == 'gpu' and view[-1] < LANES:
    return f'{math.prod(shape[2:])} units have no power-of-two block of {LANES} or more'
  if _blocks(view) is None:
    return f'no block of whole rows of {shape[-1]} channels tiles {shape[-2]} rows in VMEM'
  return None


def multistep(n: neurons.Neuron, x: jax.Array) -> jax.Array:
  """`neurons.multistep(n, x)` (x [B, T, ...]) as one kernel each way.

  Raises ConfigError naming the reason where the kernel cannot run it
  (`unsupported`, `unsupported_shape`); callers check those to fall back."""
  why = unsupported(n) or unsupported_shape(x.shape)
  if why:
    raise errors.ConfigError(f'the Pallas neuron kernel cannot run this neuron: {why}.')
  return _neuron(_plain(n), x)


def _plain(n: neurons.Neuron) -> neurons.Neuron:
  """The fields that only say how the XLA loop compiles do not matter here."""
  return dataclasses.replace(n, loop='scan', unroll=0, recompute=False)


# --------------------------------------------------------------------------
# BatchNorm fused with the neuron it feeds.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Norm:
  """What the fused kernels need of a train-mode BatchNorm (static)."""

  epsilon: float
  out_dtype: jnp.dtype  # the BatchNorm's output (the neuron's input) dtype


def _normalized(x, rows, dtype):
  """norm.BatchNorm's normalisation, term for term (bit-identical):
  (x - mean) * rsqrt(var + eps) * scale + bias, rows [mean, inv, scale, bias]."""
  return (x.astype(dtype) - rows[0]) * rows[1] * rows[2] + rows[3]


def _neuron_inputs(n, norm, x_ref, rows):
  """load(t): the neuron's input at step t, the BatchNorm output as the
  unfused pair hands it over (cast to the output dtype, then the membrane's)."""
  mdt = _membrane(n, norm.out_dtype)
  return lambda t: _normalized(x_ref[:, t], rows, rows.dtype).astype(norm.out_dtype).astype(mdt)


def _norm_fire_fwd_kernel(n, T, norm, x_ref, rows_ref, s_ref):
  _, spikes = _fire_all(n, T, _neuron_inputs(n, norm, x_ref, rows_ref[...]))
  for t, s in enumerate(spikes):
    s_ref[:, t] = s.astype(s_ref.dtype)


def _bn_cotangents(n, T, norm, x_ref, g_ref, rows):
  """Per timestep: (cotangent of the BatchNorm output, normalised input),
  float32 (the statistics' dtype), recomputing the neuron from x."""
  mdt = _membrane(n, norm.out_dtype)
  dtype = rows.dtype
  load = _neuron_inputs(n, norm, x_ref, rows)
  vs, _ = _fire_all(n, T, load)
  g_ys = _reverse(n, T, vs, load, lambda t: g_ref[:, t].astype(mdt))
  for t in range(T):
    x_hat = (x_ref[:, t].astype(dtype) - rows[0]) * rows[1]
    yield g_ys[t].astype(norm.out_dtype).astype(dtype), x_hat


def _sum_to_rows(a):  # [bb, kb, sb, C] -> [1, C]
  return jnp.sum(a.reshape(-1, a.shape[-1]), axis=0, keepdims=True)


def _norm_fire_sums_kernel(n, T, norm, x_ref, g_ref, rows_ref, sums_ref):
  """The two BatchNorm reductions of the backward, accumulated over the
  batch blocks: sum of g_y, sum of g_y * x_hat, per channel."""
  rows = rows_ref[...]
  per_t = [
    (_sum_to_rows(g_y), _sum_to_rows(g_y * x_hat))
    for g_y, x_hat in _bn_cotangents(n, T, norm, x_ref, g_ref, rows)
  ]
  g_sum = functools.reduce(jnp.add, [a for a, _ in per_t])
  g_xhat = functools.reduce(jnp.add, [b for _, b in per_t])

  @pl.when(pl.program_id(2) == 0)
  def _():
    sums_ref[...] = jnp.zeros_like(sums_ref)

  sums_ref[0, 0] += jnp.concatenate([g_sum, g_xhat], axis=0)


def _norm_fire_dx_kernel(n, T, norm, x_ref, g_ref, rows_ref, gx_ref):
  """dL/dx = scale * inv * (g_y - mean(g_y) - x_hat * mean(g_y * x_hat))."""
  rows = rows_ref[...]  # [mean, inv, scale, bias, mean(g_y), mean(g_y x_hat)]
  for t, (g_y, x_hat) in enumerate(_bn_cotangents(n, T, norm, x_ref, g_ref, rows)):
    g_x = rows[2] * rows[1] * (g_y - rows[4] - x_hat * rows[5])
    gx_ref[:, t] = g_x.astype(gx_ref.dtype)


def _norm_call(kernel_body, n, norm, x, rows, *operands, out_dtype=None, sums=False):
  """A BatchNorm+neuron kernel over x [B, T, ..., C] (and operands of its
  shape) with per-channel `rows`: to x's shape (in out_dtype, default x's),
  or (sums) to the [2, C] reductions over the whole batch."""
  T = x.shape[1]

  def shard(*arrays):
    *data, rows_ = arrays
    shape = data[0].shape
    blocks = _tiling(shape)
    kernel = functools.partial(kernel_body, n, T, norm)
    in_specs = [blocks.data()] * len(data) + [pl.BlockSpec(rows_.shape, lambda k, s, b: (0, 0))]
    if sums:
      nk, ns, _ = blocks.grid
      out = jax.ShapeDtypeStruct((nk, ns, 2, shape[-1]), rows_.dtype)
      spec = pl.BlockSpec((1, 1, 2, shape[-1]), lambda k, s, b: (k, s, 0, 0))
      return (_call(kernel, blocks, in_specs, spec, out, *data, rows_, reduce=True),)
    out = jax.ShapeDtypeStruct(shape, out_dtype or x.dtype)
    return (_call(kernel, blocks, in_specs, blocks.data(), out, *data, rows_),)

  views = [_view(a) for a in (x, *operands)]
  (out,) = _per_shard(shard, len(views), (not sums,))(*views, rows)
  if sums:  # [shards, nk, ns, 2, C] -> [2, C]
    return out.sum(axis=(0, 1, 2))
  return out.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _norm_fire(n, norm, x, scale, bias):
  return _norm_fire_impl(n, norm, x, scale, bias)[0]


def _rows(mean, var, scale, bias, epsilon, dtype):
  inv = jax.lax.rsqrt(var + epsilon)
  return jnp.stack([mean, inv, scale.astype(dtype), bias.astype(dtype)])


def _norm_fire_impl(n, norm, x, scale, bias):
  dtype = jnp.promote_types(x.dtype, scale.dtype)
  xg = x.astype(dtype).reshape((1, x.shape[0] * x.shape[1]) + x.shape[2:])
  mean, var = (a.reshape(-1) for a in batch_statistics(xg))  # norm.BatchNorm's own
  rows = _rows(mean, var, scale, bias, norm.epsilon, dtype)
  s = _norm_call(_norm_fire_fwd_kernel, n, norm, x, rows, out_dtype=norm.out_dtype)
  return (s, mean, var), rows


def _norm_fire_fwd(n, norm, x, scale, bias):
  out, rows = _norm_fire_impl(n, norm, x, scale, bias)
  return out, (x, rows, scale, bias)


def _norm_fire_bwd(n, norm, res, g):
  x, rows, scale, bias = res
  g_s = g[0].astype(norm.out_dtype)  # the statistics' outputs feed running averages only
  sums = _norm_call(_norm_fire_sums_kernel, n, norm, x, rows, g_s, sums=True)
  count = x.size // x.shape[-1]
  means = sums / count
  rows6 = jnp.concatenate([rows, means], axis=0)
  g_x = _norm_call(_norm_fire_dx_kernel, n, norm, x, rows6, g_s)
  return g_x, sums[1].astype(scale.dtype), sums[0].astype(bias.dtype)


_norm_fire.defvjp(_norm_fire_fwd, _norm_fire_bwd)


def unsupported_norm(groups: int) -> str | None:
  """Why BatchNorm (with `groups` statistics groups) cannot fuse with its
  neuron, or None when it can."""
  if groups != 1:
    return f'BatchNorm with {groups} groups (per-device statistics)'
  if _platform() == 'gpu':
    return 'the fused BatchNorm kernel is written for TPU (Triton: power-of-two channel blocks)'
  return None


def norm_fire(n: neurons.Neuron, norm: Norm, x, scale, bias, T: int):
  """Train-mode BatchNorm of x [B*T, ..., C] (one group: statistics over the
  whole batch), then neuron n over T: (spikes [B*T, ..., C], batch mean,
  biased batch variance), the statistics for the running averages (no
  gradient flows through them)."""
  xb = x.reshape((x.shape[0] // T, T) + x.shape[1:])
  s, mean, var = _norm_fire(_plain(n), norm, xb, scale, bias)
  return s.reshape(x.shape), jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
