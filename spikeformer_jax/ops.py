"""Pure operations and initialisers the layers share: PyTorch's and timm's
initialisers, the max-pool with PyTorch's gradient routing, heads, and folding
time into the batch. No modules, no state."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import errors

# --------------------------------------------------------------------------
# Initialisers matching PyTorch / timm.
# --------------------------------------------------------------------------

#: PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)):
#: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
#: timm's trunc_normal_(std=.02) truncates at +-2 (absolute), i.e. never.
trunc_normal_init = nnx.initializers.normal(0.02)


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def initializers(init: str, fan_in: int):
  """(kernel_init, bias_init) by name: 'trunc_normal' (timm std .02, zero
  bias: nn.Linear, SDT's convs) or 'torch_default' (PyTorch's conv / linear)."""
  if init == 'trunc_normal':
    return trunc_normal_init, nnx.initializers.zeros_init()
  if init == 'torch_default':
    return torch_default_kernel_init, torch_default_bias_init(fan_in)
  raise errors.ConfigError(f"init {init!r}: use 'trunc_normal' or 'torch_default'.")


# --------------------------------------------------------------------------
# Pure ops.
# --------------------------------------------------------------------------


def _window_slices(x, window, stride, out_hw):
  """Yields (k, di, dj, strided view of the padded x) in row-major window order."""
  ho, wo = out_hw
  k = 0
  for di in range(window):
    for dj in range(window):
      yield (
        k,
        di,
        dj,
        x[:, di : di + stride * (ho - 1) + 1 : stride, dj : dj + stride * (wo - 1) + 1 : stride, :],
      )
      k += 1


def _pool_geometry(shape, window, stride, padding):
  _, h, w, _ = shape
  return ((h + 2 * padding - window) // stride + 1, (w + 2 * padding - window) // stride + 1)


def _pad_neg_inf(x, padding):
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jnp.pad(x, pad, constant_values=-jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1):
  """2-D max pooling of x[N, H, W, C] with PyTorch's gradient routing.

  Padding acts as -inf. The gradient of each output goes entirely to the
  *first* maximal element of its window in row-major order, as in PyTorch.
  Spike maps are full of ties (an all-zero window), so the routing decides
  which weights get gradient; XLA's own max-pool gradient does not promise it.
  """
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, window, window, 1),
    (1, stride, stride, 1),
    ((0, 0), (padding, padding), (padding, padding), (0, 0)),
  )


def _max_pool_fwd(x, window, stride, padding):
  return max_pool(x, window, stride, padding), x


def _max_pool_bwd(window, stride, padding, x, g):
  out_hw = _pool_geometry(x.shape, window, stride, padding)
  views = list(_window_slices(_pad_neg_inf(x, padding), window, stride, out_hw))
  best, idx = views[0][3], jnp.zeros(g.shape, jnp.int32)
  for k, _, _, view in views[1:]:
    better = view > best  # strict: ties keep the earlier element
    best = jnp.where(better, view, best)
    idx = jnp.where(better, k, idx)
  return (_route_to_inputs(g, idx, x.shape, window, stride, padding),)


def _route_to_inputs(g, idx, shape, window, stride, padding):
  """The input gradient: output (i, j)'s cotangent added at its window's
  element idx = di * window + dj, i.e. at input (s i - p + di, s j - p + dj).

  Computed per input phase (r mod s, c mod s), at the output's resolution:
  input row s m + ph receives from window row d (with s | ph + p - d) of
  output row m + (ph + p - d) / s. Each phase is a sum of shifted, masked
  copies of g, added in increasing k as a scatter would; the s x s phases are
  then interleaved. No gradient buffer of the padded input's size is
  materialised (9 padded scatters, all alive at once, were the largest
  temporaries of the Spikformer train step).
  """
  n, h, w, c = shape
  s, ho, wo = stride, g.shape[1], g.shape[2]
  hs, ws = -(-h // s), -(-w // s)
  taps = [
    [(d, (ph + padding - d) // s) for d in range(window) if (ph + padding - d) % s == 0]
    for ph in range(s)
  ]
  shifts = [e for t in taps for _, e in t] or [0]
  lo = max(0, -min(shifts))
  pad = ((0, 0), (lo, max(0, hs + max(shifts) - ho)), (lo, max(0, ws + max(shifts) - wo)), (0, 0))
  zero = jnp.zeros((), g.dtype)
  masked = {}

  def tap(k):
    if k not in masked:
      masked[k] = jnp.pad(jnp.where(idx == k, g, zero), pad)
    return masked[k]

  rows = []
  for pr in range(s):
    cols = []
    for pc in range(s):
      acc = jnp.zeros((n, hs, ws, c), g.dtype)
      for dr, er in taps[pr]:
        for dc, ec in taps[pc]:
          acc = acc + tap(dr * window + dc)[:, lo + er : lo + er + hs, lo + ec : lo + ec + ws, :]
      cols.append(acc)
    rows.append(jnp.stack(cols, axis=3))  # [n, hs, ws, s, c]
  gx = jnp.stack(rows, axis=2).reshape(n, hs * s, ws * s, c)  # [n, hs, s, ws, s, c]
  return gx[:, :h, :w, :]


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """[BT, N, C] -> [BT, heads, N, C // heads] (channel c = head * d + j)."""
  bt, n, c = x.shape
  return x.reshape(bt, n, heads, c // heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
  bt, h, n, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(bt, n, h * d)


def fold_time(x: jax.Array, T: int, dtype) -> jax.Array:
  """Model input -> [B*T, H, W, C]: a static image [B, H, W, C] is repeated
  over T (direct encoding); event frames [B, T, H, W, C] are taken as they are."""
  if x.ndim == 4:
    x = jnp.broadcast_to(x[:, None], (x.shape[0], T) + x.shape[1:])
  elif x.ndim != 5 or x.shape[1] != T:
    raise ValueError(f'input of shape {x.shape}: expected [B, H, W, C] or [B, T={T}, H, W, C].')
  return x.reshape((x.shape[0] * T,) + x.shape[2:]).astype(dtype)
