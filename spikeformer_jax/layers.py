"""Flax NNX building blocks shared by the model families.

Layout convention: stateless layers (Linear, Conv, BatchNorm, pooling) see
time folded into the batch, `[B*T, ...]` with the batch first (so a batch
sharded over devices needs no communication); only `SpikingNeuron` unfolds to
`[B, T, ...]` and runs the pure neuron of `neurons.py` over time.

Module attribute names follow the official PyTorch code (`q_bn`, `attn_lif`,
`fc1_linear`, ...) so that weight conversion and per-layer firing rates map
one to one onto the official state dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import neurons, synapses

Dtype = Any

# --------------------------------------------------------------------------
# Initialisers matching PyTorch / timm.
# --------------------------------------------------------------------------

#: PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)):
#: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nnx.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform')
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
  raise ValueError(f"init {init!r}: use 'trunc_normal' or 'torch_default'.")


# --------------------------------------------------------------------------
# Pure ops.
# --------------------------------------------------------------------------


def _window_slices(x, window, stride, out_hw):
  """Yields (k, di, dj, strided view of the padded x) in row-major window order."""
  ho, wo = out_hw
  k = 0
  for di in range(window):
    for dj in range(window):
      yield k, di, dj, x[:, di:di + stride * (ho - 1) + 1:stride,
                         dj:dj + stride * (wo - 1) + 1:stride, :]
      k += 1


def _pool_geometry(shape, window, stride, padding):
  _, h, w, _ = shape
  return ((h + 2 * padding - window) // stride + 1,
          (w + 2 * padding - window) // stride + 1)


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
      x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


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
  taps = [[(d, (ph + padding - d) // s) for d in range(window) if (ph + padding - d) % s == 0]
          for ph in range(s)]
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
          acc = acc + tap(dr * window + dc)[:, lo + er:lo + er + hs, lo + ec:lo + ec + ws, :]
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


# --------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------


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


def batch_as_time_multistep(neuron: neurons.Neuron, x: jax.Array, T: int,
                            groups: int = 1) -> jax.Array:
  """A quirk of MSViT's and QKFormer's released SSA: `proj_lif` is handed the
  [T*B, C, N] tensor, so SpikingJelly runs its membrane over T*B "timesteps"
  in time-major order (t0 b0, t0 b1, ..., t1 b0, ...), carrying it from one
  sample to the next. x: our [B*T, ...] (batch-major). `groups` splits the
  batch into independent sequences, as separate GPUs of a DDP run have."""
  b = x.shape[0] // T
  if b % groups:
    raise ValueError(f'batch {b} is not divisible into {groups} neuron groups.')
  xs = x.reshape(groups, b // groups, T, -1).transpose(0, 2, 1, 3)
  # A T*B-step sequence: never unrolled whole (compile time), T steps per
  # scan iteration unless the config asks for another unroll.
  neuron = dataclasses.replace(neuron, loop='scan' if neuron.loop == 'python' else neuron.loop,
                               unroll=neuron.unroll or T)
  s = neurons.multistep(neuron, xs.reshape(groups, T * (b // groups), -1))
  return s.reshape(groups, T, b // groups, -1).transpose(0, 2, 1, 3).reshape(x.shape)


def check_spike_sums(s: Settings, depth: int):
  """A spike-add residual stream reaches 2 + 2 * depth (a {0,1,2} stem output
  plus two spikes per block); `compact_spikes` keeps it as int8."""
  if s.compact_spikes and 2 + 2 * depth > 127:
    raise ValueError(f'{depth} blocks make residual spike sums up to {2 + 2 * depth}, '
                     'beyond the int8 that model.compact_spikes saves them in; set '
                     'model.compact_spikes=False.')


def count_dtype():
  """dtype of recorded counts: int64 under 64-bit JAX (exact, as the fidelity
  check needs); else float32, since int32 overflows at ImageNet scale (~1e9
  units per step)."""
  return jnp.int64 if jax.config.jax_enable_x64 else jnp.float32


class SpikingNeuron(nnx.Module):
  """A multi-step neuron on a time-folded tensor [B*T, ...].

  With `record_spikes` set (`model.set_attributes(record_spikes=True)`, then
  `logits, inter = nnx.capture(model, nnx.Intermediate)(x)`) it sows, per call,
  the number of non-zero spikes per timestep (`spike_count`, shape [T]) and the
  number of spike values over all timesteps (`numel`) as `nnx.Intermediate`s:
  firing rates without touching model code.
  """

  def __init__(self, neuron: neurons.Neuron, T: int, *, batch_as_time: bool = False,
               groups: int = 1):
    self.neuron = neuron
    self.T = T
    self.batch_as_time, self.groups = batch_as_time, groups
    self.record_spikes = False

  def __call__(self, x: jax.Array) -> jax.Array:
    T = self.T
    if x.shape[0] % T:
      raise ValueError(f'leading axis {x.shape[0]} is not batch*T with T={T}.')
    if self.batch_as_time:
      s = batch_as_time_multistep(self.neuron, x, T, self.groups)
    else:
      xb = x.reshape((x.shape[0] // T, T) + x.shape[1:])
      s = neurons.multistep(self.neuron, xb)
    if self.record_spikes:
      dt = count_dtype()
      per_t = s.reshape(x.shape[0] // T, T, -1)  # [B, T, units] in either layout
      self.sow(nnx.Intermediate, 'spike_count', jnp.sum(per_t != 0, axis=(0, 2), dtype=dt))
      self.sow(nnx.Intermediate, 'numel', jnp.asarray(s.size, dt))
    return s.reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every layer of one network shares: T, neuron, dtypes, BN scope."""
  T: int
  neuron: neurons.Neuron = neurons.Neuron()
  dtype: Dtype = jnp.float32         # compute dtype of conv / linear
  param_dtype: Dtype = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  compact_spikes: bool = False       # save spike inputs of conv / linear as int8
  weight_grad: str = 'auto'     # synapses.WEIGHT_GRADS

  def lif(self, **overrides) -> SpikingNeuron:
    return SpikingNeuron(dataclasses.replace(self.neuron, **overrides), self.T)

  def bn(self, c: int) -> BatchNorm:
    return BatchNorm(c, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                     groups=self.bn_groups, dtype=self.dtype,
                     param_dtype=self.param_dtype)

  def linear(self, din: int, dout: int, *, bias: bool, init: str, rngs: nnx.Rngs,
             spikes_in: bool = False) -> nnx.Linear:
    """A token-wise linear map. init: 'trunc_normal' (timm, nn.Linear) or
    'torch_default' (a kernel-1 Conv1d/Conv2d of the official code).
    spikes_in: the caller promises an input of small integers (spikes, spike
    sums in [-128, 127]), so the backward pass may keep it as int8
    (`compact_spikes`); opt in, as int8 would corrupt any other input."""
    kinit, binit = initializers(init, din)
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=kinit, bias_init=binit,
                      dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs,
                      dot_general=synapses.SpikeDot(self.compact_spikes and spikes_in,
                                                    self.weight_grad))

  def conv(self, cin: int, cout: int, *, kernel: int | tuple = 3, stride: int = 1,
           bias: bool = False, init: str = 'torch_default', rngs: nnx.Rngs,
           spikes_in: bool = False) -> nnx.Conv:
    """A convolution with symmetric padding, 2-D (`kernel` an int) or of the
    rank of a `kernel` tuple; init 'torch_default' (PyTorch's) or
    'trunc_normal' (std .02, bias 0: SDT's _init_weights). spikes_in: as for
    `linear` (never a stem's first conv, which sees images or event counts)."""
    ks = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    kinit, binit = initializers(init, cin * math.prod(ks))
    return nnx.Conv(cin, cout, ks, strides=stride,
                    padding=tuple((k // 2, k // 2) for k in ks), use_bias=bias,
                    kernel_init=kinit, bias_init=binit,
                    dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs,
                    conv_general_dilated=synapses.SpikeConv(
                        self.compact_spikes and spikes_in, self.weight_grad))


# Rematerialisation of each block's forward in the backward pass (model.remat).
REMAT_POLICIES = {
    '': None,                 # save what autodiff saves
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    'dots': jax.checkpoint_policies.dots_saveable,     # keep matmul / conv outputs
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def method_call(name: str, *static):
  """fn(module, x) = module.name(*static, x), the static arguments closed over
  (remat would trace a default argument)."""
  return lambda m, y: getattr(m, name)(*static, y)


def apply_block(block, x: jax.Array, remat: str = '', fn=None) -> jax.Array:
  """fn(block, x) (default block(x)), its activations recomputed in the
  backward pass under policy `remat` (REMAT_POLICIES; '' saves them as usual).
  Same values and gradients: only memory and time change."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={remat!r}; valid: {", ".join(map(repr, REMAT_POLICIES))}.')
  fn = fn or (lambda m, y: m(y))
  if not remat:
    return fn(block, x)
  return nnx.remat(fn, policy=REMAT_POLICIES[remat])(block, x)


SPS_STAGES = ('', '1', '2', '3')  # official suffixes: proj_conv, proj_conv1, ...


def add_sps_stages(module: nnx.Module, in_channels: int, dim: int, pooling: str, *,
                   s: Settings, init: str, rngs: nnx.Rngs):
  """The four conv-BN-LIF stages (widths D/8, D/4, D/2, D) that Spikformer's
  SPS and SDT's MS_SPS share, under their official names; checks `pooling`."""
  if len(pooling) != 4 or set(pooling) - {'0', '1'}:
    raise ValueError(f"pooling={pooling!r}: four '0'/'1' characters, one per stage.")
  if dim % 8:
    raise ValueError(f'embed_dim={dim} must be divisible by 8 (SPS widths D/8..D).')
  widths = (in_channels, dim // 8, dim // 4, dim // 2, dim)
  for i, sfx in enumerate(SPS_STAGES):
    setattr(module, f'proj_conv{sfx}', s.conv(widths[i], widths[i + 1], init=init, rngs=rngs,
                                              spikes_in=i > 0))
    setattr(module, f'proj_bn{sfx}', s.bn(widths[i + 1]))
    setattr(module, f'proj_lif{sfx}', s.lif())


def fold_time(x: jax.Array, T: int, dtype) -> jax.Array:
  """Model input -> [B*T, H, W, C]: a static image [B, H, W, C] is repeated
  over T (direct encoding); event frames [B, T, H, W, C] are taken as they are."""
  if x.ndim == 4:
    x = jnp.broadcast_to(x[:, None], (x.shape[0], T) + x.shape[1:])
  elif x.ndim != 5 or x.shape[1] != T:
    raise ValueError(f'input of shape {x.shape}: expected [B, H, W, C] or '
                     f'[B, T={T}, H, W, C].')
  return x.reshape((x.shape[0] * T,) + x.shape[2:]).astype(dtype)


def mean_token_head(head, x: jax.Array, batch: int, T: int, per_timestep: bool,
                    logits_dtype) -> jax.Array:
  """Spikformer's and MSViT's head: tokens [B*T, N, C] -> mean over tokens,
  then over T, then `head` (Linear). per_timestep (for the TET loss) returns
  head of every timestep's features, [B, T, classes]; the head is linear, so
  their mean over T equals the ordinary logits."""
  x = x.mean(axis=1).reshape(batch, T, -1)
  if per_timestep:
    return head(x).astype(logits_dtype)
  return head(x.mean(axis=1)).astype(logits_dtype)


class SpikingMLP(nnx.Module):
  """fc1_lif(fc1_bn(fc1_linear(x))) -> fc2_lif(fc2_bn(fc2_linear(.))), tokens [B*T, N, C].

  `names` are the official prefixes of the two layers (MSViT's CIFAR files
  call them mlp1, mlp2)."""

  def __init__(self, dim: int, hidden: int, *, s: Settings, init: str, rngs: nnx.Rngs,
               names: tuple = ('fc1', 'fc2')):
    for name, (din, dout) in zip(names, ((dim, hidden), (hidden, dim))):
      setattr(self, f'{name}_linear', s.linear(din, dout, bias=True, init=init, rngs=rngs,
                                               spikes_in=True))
      setattr(self, f'{name}_bn', s.bn(dout))
      setattr(self, f'{name}_lif', s.lif())
    self.names = tuple(names)

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self.names:
      x = getattr(self, f'{name}_lif')(getattr(self, f'{name}_bn')(getattr(self, f'{name}_linear')(x)))
    return x
