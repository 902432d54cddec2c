"""BatchNorm with PyTorch's exact semantics (two-pass statistics, unbiased
running variance, momentum as PyTorch's), per device group or over the whole
sharded batch."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import neurons

Dtype = Any


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
  """

  def __init__(self, num_features: int, *, momentum: float = 0.9,
               epsilon: float = 1e-5, groups: int = 1, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32):
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
    self.use_running_average = False

  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = self.dtype or x.dtype
    stat_dtype = self.mean[...].dtype
    xs = x.astype(jnp.promote_types(x.dtype, stat_dtype))
    scale, bias = self.scale[...].astype(xs.dtype), self.bias[...].astype(xs.dtype)
    if self.use_running_average:
      mean, var = self.mean[...].astype(xs.dtype), self.var[...].astype(xs.dtype)
      return ((xs - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(out_dtype)

    g = self.groups
    if x.shape[0] % g:
      raise ValueError(
          f'BatchNorm with {g} groups (per-device statistics) needs a batch*time '
          f'axis divisible by {g}, got {x.shape[0]}; make the batch size a '
          'multiple of the number of data-parallel devices.')
    xg = xs.reshape((g, x.shape[0] // g) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = xg.mean(axes, keepdims=True)
    var = jnp.square(xg - mean).mean(axes, keepdims=True)  # two-pass, biased
    y = (xg - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias

    n = math.prod(xg.shape[1:-1])
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    c = self.num_features
    self.mean[...] = (m * self.mean[...] +
                       (1 - m) * mean.reshape(g, c).mean(0).astype(stat_dtype))
    self.var[...] = (m * self.var[...] +
                      (1 - m) * unbiased.reshape(g, c).mean(0).astype(stat_dtype))
    self.count[...] = self.count[...] + 1
    return y.reshape(x.shape).astype(out_dtype)
