"""Linear and convolution ops with a lean, fast backward pass (pure JAX).

Autodiff of `x @ W` saves the input x for the weight gradient dW = x^T dy. In a
spiking network x is a spike map ({0, 1}, ternary {-1, 0, 1}, or the small
integer sums of the spike-add residual stream) held in the compute dtype: 4
bytes per element in float32 for one bit of information. With `compact=True`
these ops save x as int8 instead and restore it exactly in the backward pass
(SpikingJelly issue #163, SJ memopt's spike compression). The caller asserts
that x holds integers in [-128, 127]; the models pass `compact` only to layers
fed by neurons or spike sums, never to the stem's first conv (images, event
counts) or the head.

`weight_grad` picks how the weight gradient is formed:
  * 'gemm': as 2-D GEMMs that XLA:CPU runs at its GEMM rate. dense: dW =
    (dy^T x)^T on 2-D views, which reads both operands as stored (autodiff's
    form makes XLA:CPU write dy transposed from inside the BatchNorm-backward
    fusion, 3-5x slower than the GEMM itself); conv: one GEMM per kernel
    offset, the shifted view of the padded input contracted with dy (in
    order, one view alive at a time), 2-3x faster than XLA:CPU's
    weight-gradient convolution for the SPS stems. Under a batch-sharded mesh
    each offset's GEMM is all-reduced on its own (kh*kw small all-reduces);
    'auto' uses it on CPU only;
  * 'xla': autodiff's own (cuDNN's / XLA's on GPU and TPU);
  * 'auto': 'gemm' on CPU, 'xla' elsewhere.
With compact=False and weight_grad resolving to 'xla' the layers run plain
lax ops under autodiff. Values equal autodiff's up to float summation order;
compact on / off are bit-identical (tested).

`SpikeDot` and `SpikeConv` plug into `nnx.Linear(dot_general=...)` and
`nnx.Conv(conv_general_dilated=...)`; they fall back to the lax op for any
call outside the shapes handled here.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp

from spikeformer_jax import errors

WEIGHT_GRADS = ('auto', 'xla', 'gemm')


def _check_dtypes(x: jax.Array, w: jax.Array):
  if x.dtype != w.dtype:  # the backward restores x in w's dtype
    raise ValueError(
      f'synapses: input {x.dtype} and kernel {w.dtype} must share a dtype '
      '(the layers cast both to the compute dtype first).'
    )


def _save(x: jax.Array, compact: bool) -> jax.Array:
  """The residual kept for the backward pass: x itself or x as int8."""
  if compact and jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.int8)
  return x


def _restore(saved: jax.Array, dtype) -> jax.Array:
  return saved.astype(dtype)


# --------------------------------------------------------------------------
# Dense: y = x @ w over the last axis of x.
# --------------------------------------------------------------------------


def _dense_fwd_value(x, w, precision):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
  'synapses_platform', default=None
)


@contextlib.contextmanager
def compiling_for(platform: str | None):
  """Resolves 'auto' for `platform` ('cpu', 'gpu', 'tpu') while tracing, not
  for the default backend: a step compiled ahead of time for a TPU topology
  on a CPU machine gets the TPU's choice. The train and eval steps trace under
  their mesh's platform."""
  token = _PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def target_platform() -> str:
  """The platform being compiled for: `compiling_for`'s, else the default backend."""
  return _PLATFORM.get() or jax.default_backend()


def resolve(weight_grad: str) -> str:
  """'auto' -> 'gemm' on CPU, 'xla' on GPU / TPU; checks the name."""
  if weight_grad not in WEIGHT_GRADS:
    raise errors.ConfigError(
      f'model.weight_grad={weight_grad!r}; valid: {", ".join(WEIGHT_GRADS)}.'
    )
  if weight_grad == 'auto':
    return 'gemm' if target_platform() == 'cpu' else 'xla'
  return weight_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense(
  x: jax.Array, w: jax.Array, compact: bool = False, weight_grad: str = 'auto', precision=None
) -> jax.Array:
  """x[..., C] @ w[C, D]; see the module docstring for the backward pass."""
  return _dense_fwd_value(x, w, precision)


def _dense_fwd(x, w, compact, weight_grad, precision):
  _check_dtypes(x, w)
  return _dense_fwd_value(x, w, precision), (_save(x, compact), w)


def _dense_bwd(compact, weight_grad, precision, res, g):
  del compact
  saved, w = res
  x = _restore(saved, w.dtype)
  if resolve(weight_grad) == 'xla':
    _, vjp = jax.vjp(lambda x_, w_: _dense_fwd_value(x_, w_, precision), x, w)
    return vjp(g)
  gx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  return gx, _weight_gemm(x, g, precision).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@dataclasses.dataclass(frozen=True)
class SpikeDot:
  """`nnx.Linear(dot_general=SpikeDot(compact))`: routes the layer's
  contraction through `dense` (hashable, so it is static under jit)."""

  compact: bool = False
  weight_grad: str = 'auto'

  def __call__(
    self, x, w, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
  ):
    standard = (
      dimension_numbers == (((x.ndim - 1,), (0,)), ((), ()))
      and w.ndim == 2
      and preferred_element_type is None
      and out_sharding is None
      and x.dtype == w.dtype
    )
    if not standard or (not self.compact and resolve(self.weight_grad) == 'xla'):
      return jax.lax.dot_general(
        x,
        w,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
      )
    return dense(x, w, self.compact, self.weight_grad, precision)


# --------------------------------------------------------------------------
# Convolution, channels last (N, *spatial, C) with an (*kernel, Cin, Cout) kernel.
# --------------------------------------------------------------------------


def _dimension_numbers(nd: int):
  sp = 'HWD'[:nd]
  return ('N' + sp + 'C', sp + 'IO', 'N' + sp + 'C')


def _conv_value(x, w, strides, padding, precision):
  return jax.lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=_dimension_numbers(x.ndim - 2), precision=precision
  )


def _shifted_weight_grad(x, g, kernel_shape, strides, padding, precision):
  """dW of a 2-D conv as kh*kw GEMMs, one per kernel offset (i, j): the
  strided view of the padded x at that offset contracted with dy over
  (N, H, W). An optimization barrier after each GEMM orders them, so one view
  is alive at a time (the im2col matrix of all would be kh*kw times the
  input). Not a lax.scan: XLA:CPU's simulated devices can stall on the
  all-reduce a batch-sharded GEMM needs inside a loop."""
  kh, kw = kernel_shape
  (ph0, ph1), (pw0, pw1) = padding
  sh, sw = strides
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  gws = []
  for i in range(kh):
    for j in range(kw):
      view = xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
      gws.append(_weight_gemm(view, g, precision))
      xp, g, _ = jax.lax.optimization_barrier((xp, g, gws[-1]))
  return jnp.stack(gws).reshape(kh, kw, x.shape[-1], g.shape[-1])


def _weight_gemm(x: jax.Array, g: jax.Array, precision) -> jax.Array:
  """x^T g over every axis but the last, as (g^T x)^T on 2-D views: XLA:CPU
  then reads both operands as stored, with no transposed copy of either."""
  g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
  return jax.lax.dot_general(g2, x2, (((0,), (0,)), ((), ())), precision=precision).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv(
  x: jax.Array,
  w: jax.Array,
  strides: tuple,
  padding: tuple,
  compact: bool = False,
  weight_grad: str = 'auto',
  precision=None,
) -> jax.Array:
  """Channels-last convolution (no dilation, no groups), explicit padding
  ((lo, hi) per spatial axis); see the module docstring for the backward pass."""
  return _conv_value(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, compact, weight_grad, precision):
  _check_dtypes(x, w)
  return _conv_value(x, w, strides, padding, precision), (_save(x, compact), w)


def _use_gemm(weight_grad: str, nd: int) -> bool:
  return resolve(weight_grad) == 'gemm' and nd == 2


def _conv_bwd(strides, padding, compact, weight_grad, precision, res, g):
  del compact
  saved, w = res
  x = _restore(saved, w.dtype)
  f = lambda x_, w_: _conv_value(x_, w_, strides, padding, precision)
  if _use_gemm(weight_grad, x.ndim - 2):
    _, vjp_x = jax.vjp(lambda x_: f(x_, w), x)
    (gx,) = vjp_x(g)
    gw = _shifted_weight_grad(x, g, w.shape[:2], strides, padding, precision)
  else:
    _, vjp = jax.vjp(f, x, w)
    gx, gw = vjp(g)
  return gx, gw.astype(w.dtype)


conv.defvjp(_conv_fwd, _conv_bwd)


@dataclasses.dataclass(frozen=True)
class SpikeConv:
  """`nnx.Conv(conv_general_dilated=SpikeConv(compact, weight_grad))`: routes
  the layer's convolution through `conv` (hashable, static under jit)."""

  compact: bool = False
  weight_grad: str = 'auto'

  def __call__(
    self,
    x,
    w,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    **kwargs,
  ):
    nd = x.ndim - 2
    plain = lambda: jax.lax.conv_general_dilated(
      x,
      w,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
      **kwargs,
    )
    ones = (1,) * nd
    handled = (
      not isinstance(padding, str)
      and feature_group_count == 1
      and tuple(lhs_dilation or ones) == ones
      and tuple(rhs_dilation or ones) == ones
      and preferred_element_type is None
      and out_sharding is None
      and not kwargs
      and x.dtype == w.dtype
      and _canonical(dimension_numbers, nd) == _dimension_numbers(nd)
    )
    if not handled or (not self.compact and not _use_gemm(self.weight_grad, nd)):
      return plain()
    return conv(
      x,
      w,
      tuple(window_strides),
      tuple(tuple(p) for p in padding),
      self.compact,
      self.weight_grad,
      precision,
    )


def _canonical(dimension_numbers, nd: int):
  """dimension_numbers as the channels-last strings, if they are those."""
  if dimension_numbers is None:
    return None
  if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
    want = jax.lax.conv_dimension_numbers((1,) * (nd + 2), (1,) * (nd + 2), _dimension_numbers(nd))
    return _dimension_numbers(nd) if dimension_numbers == want else None
  return tuple(dimension_numbers)
