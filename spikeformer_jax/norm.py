"""BatchNorm with PyTorch's exact semantics (two-pass statistics, unbiased
running variance, momentum as PyTorch's), per device group or over the whole
sharded batch."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import errors
from spikeformer_jax import neurons

Dtype = Any


def batch_statistics(xg):
  """Mean and biased two-pass variance of xg [groups, ..., C] per group and
  channel (keepdims)."""
  axes = tuple(range(1, xg.ndim - 1))
  mean = xg.mean(axes, keepdims=True)
  var = jnp.square(xg - mean).mean(axes, keepdims=True)  # two-pass, biased
  return mean, var


def _normalize_train(x, scale, bias, *, groups: int, epsilon: float, dtype):
  """Train-mode normalisation over all but the last axis, per group of the
  leading axis: (y, mean, biased two-pass variance), y of x's shape."""
  xg = x.astype(dtype).reshape((groups, x.shape[0] // groups) + x.shape[1:])
  mean, var = batch_statistics(xg)
  y = (xg - mean) * jax.lax.rsqrt(var + epsilon) * scale.astype(dtype) + bias.astype(dtype)
  return y.reshape(x.shape), mean, var


class BatchNorm(nnx.Module):
  """BatchNorm over every axis but the last, with PyTorch's exact semantics.

  * train mode normalises with the batch mean and the biased (two-pass)
    variance; the running variance is updated with the unbiased estimate
    n/(n-1), as `torch.nn.BatchNorm*d` does (flax's BatchNorm does not);
  * `momentum` follows the flax convention (0.9 == PyTorch's 0.1);
  * `groups > 1` computes statistics separately for `groups` contiguous
    slices of the leading (batch) axis: with the batch sharded over devices and
    groups == number of data shards this is per-device BN, as under PyTorch
    DDP without SyncBN ("ghost batch"). The running statistics then take the
    mean of the groups' statistics. With groups == 1 (default) statistics are
    global over the whole sharded batch (XLA inserts the all-reduce).
  * statistics and normalisation run in at least float32; the output takes
    `dtype` (the compute dtype) or the input's dtype.
  * `recompute`: the backward pass keeps only the input (in its own dtype,
    bfloat16 under a bfloat16 network) and recomputes the statistics and the
    normalisation from it, instead of keeping float32 intermediates
    (`jax.checkpoint`; the same operations, so the same values).
  """

  def __init__(
    self,
    num_features: int,
    *,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    groups: int = 1,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    recompute: bool = False,
  ):
    stat_dtype = neurons.membrane_dtype(param_dtype)
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), stat_dtype))
    self.var = nnx.BatchStat(jnp.ones((num_features,), stat_dtype))
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))  # num_batches_tracked
    self.num_features = num_features
    self.momentum = momentum
    self.epsilon = epsilon
    self.groups = groups
    self.dtype = dtype
    self.recompute = recompute
    self.use_running_average = False

  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = self.dtype or x.dtype
    stat_dtype = self.mean[...].dtype
    dtype = jnp.promote_types(x.dtype, stat_dtype)
    if self.use_running_average:
      xs = x.astype(dtype)
      scale, bias = self.scale[...].astype(dtype), self.bias[...].astype(dtype)
      mean, var = self.mean[...].astype(dtype), self.var[...].astype(dtype)
      return ((xs - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(out_dtype)

    g = self.groups
    if x.shape[0] % g:
      raise errors.ConfigError(
        f'BatchNorm with {g} groups (per-device statistics) needs a batch*time '
        f'axis divisible by {g}, got {x.shape[0]}; make the batch size a '
        'multiple of the number of data-parallel devices.'
      )
    normalize: Callable[..., Any] = functools.partial(
      _normalize_train, groups=g, epsilon=self.epsilon, dtype=dtype
    )
    if self.recompute:
      normalize = jax.checkpoint(normalize)  # keeps only x (its own dtype)
    y, mean, var = normalize(x, self.scale[...], self.bias[...])
    self.update_statistics(mean, var, x.size // (g * x.shape[-1]))
    return y.astype(out_dtype)

  def update_statistics(self, mean: jax.Array, var: jax.Array, n: int):
    """Running averages from one batch's per-group mean and biased variance
    over n values each (PyTorch's unbiased running variance)."""
    g = self.groups
    stat_dtype = self.mean[...].dtype
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    c = self.num_features
    self.mean[...] = m * self.mean[...] + (1 - m) * mean.reshape(g, c).mean(0).astype(stat_dtype)
    self.var[...] = m * self.var[...] + (1 - m) * unbiased.reshape(g, c).mean(0).astype(stat_dtype)
    self.count[...] = self.count[...] + 1
