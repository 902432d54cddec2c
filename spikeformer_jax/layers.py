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


def spiking_self_attention(q, k, v, *, scale: float, order: str):
  """Spikformer's Spiking Self-Attention: SSA(Q, K, V) = Q K^T V * scale.

  q, k, v: [..., heads, N, d] spike tensors; no softmax. `order` picks the
  association, 'qk_first' ((Q K^T) V, an N x N map: Spikformer CIFAR and
  CIFAR10-DVS) or 'kv_first' (Q (K^T V), a d x d map: Spikformer ImageNet).
  Both are exact for binary spikes (integer sums), so they differ in cost
  only; 'auto' picks the cheaper one. Products run in at least float32 so
  integer counts stay exact under bfloat16 compute.
  """
  dt = neurons.membrane_dtype(q.dtype)
  q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
  n, d = q.shape[-2], q.shape[-1]
  if order == 'auto':
    order = 'kv_first' if n > d else 'qk_first'
  kt = jnp.swapaxes(k, -1, -2)
  if order == 'qk_first':
    x = (q @ kt) @ v
  elif order == 'kv_first':
    x = q @ (kt @ v)
  else:
    raise ValueError(f"attention order {order!r}: use 'qk_first', 'kv_first' or 'auto'.")
  return x * scale


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


def spike_driven_self_attention(q, k, v, kv_neuron, erode=None):
  """SDT's SDSA: Q * SN(sum over tokens of K * V) (Hadamard, no matmul, no scale).

  q, k, v: [..., heads, N, d] spikes; kv_neuron maps the [..., heads, 1, d]
  token sum to spikes (talking_heads_lif, threshold 0.5). `erode`, SDT's DVS
  option, max-pools K * V before the sum and the output.
  """
  kv = k * v
  if erode is not None:
    kv = erode(kv)
  y = q * kv_neuron(jnp.sum(kv, axis=-2, keepdims=True))
  return y if erode is None else erode(y)


def a2os2a_self_attention(q, k, v, *, order: str):
  """A2OS2A (Guo et al., CVPR 2025, eq. 28 before its neuron): Q K^T V.

  Q binary, K >= 0 (ReLU), V ternary: no softmax, no scale; both products are
  additions (and subtractions for V = -1). Exact in either association.
  """
  return spiking_self_attention(q, k, v, scale=1.0, order=order)


def multi_scale_spiking_attention(q, p, k, attn_neuron, *, p_sum: bool = True):
  """MSViT's Multi-Scale Spiking Attention (MSSA, Token_MS_Attention):
  K * SN(sum_d Q + sum_d P), a token mask on K, no matmul and no scale.

  q, p, k: [..., heads, N, d] spikes; q from a kernel-1 and p from a kernel-3
  token conv (the "multi-scale" pair; either may be None: QKFormer's token
  attention is q alone). Each head's channel sum is an integer in [0, d] and
  q + p lands exactly on the neuron threshold often; it is computed in at
  least float32 so that stays exact under bfloat16. p_sum=False is the
  CIFAR-100 file's per-channel variant: attn = SN(sum_d Q + P) per channel.
  """
  dt = neurons.membrane_dtype(k.dtype)
  terms = [jnp.sum(q.astype(dt), axis=-1, keepdims=True)] if q is not None else []
  if p is not None:
    p = p.astype(dt)
    terms.append(jnp.sum(p, axis=-1, keepdims=True) if p_sum else p)
  if not terms:
    raise ValueError('MSSA needs at least one of the Q and P branches.')
  attn = attn_neuron(functools.reduce(jnp.add, terms))
  return attn.astype(k.dtype) * k


def vanilla_attention_map(q, k):
  """VSA's N x N map Softmax(Q K^T / sqrt(d)), q, k: [..., heads, N, d]."""
  d = q.shape[-1]
  return jax.nn.softmax((q @ jnp.swapaxes(k, -1, -2)) / jnp.sqrt(jnp.asarray(d, q.dtype)),
                        axis=-1)


def vanilla_self_attention(q, k, v):
  """VSA (Spikformer eqs. 12-13): Softmax(Q K^T / sqrt(d)) V, float Q and K."""
  return vanilla_attention_map(q, k) @ v


# Spikformer Table 1's non-spiking ablations: Q and K are float (the BN output
# with this activation instead of a neuron); V stays spiking, except in
# 'vsa_float_v'. The official code of the ablations was not released; spikformer
# issue #9 confirms they drop the Q/K neurons and keep the rest of the block.
FLOAT_QK = {
    'a_i': lambda x: x,
    'a_relu': jax.nn.relu,
    'a_leakyrelu': jax.nn.leaky_relu,  # slope 0.01, PyTorch's default
    'vsa': lambda x: x,
    'vsa_float_v': lambda x: x,
}
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


ATTENTION_KINDS = ('ssa', 'sdsa', 'a2os2a', 'mssa') + tuple(FLOAT_QK)
ATTENTION_STYLES = ('spikformer', 'sdt')


def _erode(x: jax.Array, spatial: tuple | None) -> jax.Array:
  """SDT's DVS `Erode`: MaxPool3d((1,3,3), 1, (0,1,1)) on the last two axes of
  the official 5-D tensor. spatial=(H, W): pool tokens [BT, N, C] over the
  image grid; None: pool [BT, h, N, d] over (token index, head channel), as the
  official code does for k*v and q*kv."""
  if spatial is not None:
    bt, n, c = x.shape
    y = max_pool(x.reshape(bt, spatial[0], spatial[1], c), 3, 1, 1)
    return y.reshape(bt, n, c)
  return max_pool(x.reshape((-1,) + x.shape[-2:] + (1,)), 3, 1, 1).reshape(x.shape)


class SpikingAttention(nnx.Module):
  """Self-attention of a spiking transformer block on tokens [B*T, N, C].

  `kind` picks how Q, K, V are made and combined:
    * ssa:    Q, K, V = LIF(BN(W x)); attn_lif(Q K^T V * scale)   (Spikformer)
    * sdsa:   Q, K, V = LIF(BN(W x)); Q * talking_heads_lif(sum_N K * V) (SDT)
    * a2os2a: Q = LIF(BN(W x)), K = ReLU(BN(W x)), V = ternary(BN(W x));
              attn_lif(Q K^T V)                                      (A2OS2A)
    * a_i, a_relu, a_leakyrelu: float f(Q), f(K) (identity / ReLU / LeakyReLU
              of BN(W x)), spike V; attn_lif(f(Q) f(K)^T V * scale)
    * vsa, vsa_float_v: attn_lif(Softmax(Q K^T / sqrt(d)) V), float Q, K and
              spike V (vsa) or float V (vsa_float_v)   (Spikformer Table 1)
    * mssa:   Q, P, K = LIF(BN(conv x)) with token-conv kernels mssa_kernels
              (Q 1, P 3; 0 drops a branch); K * attn_lif(sum_d Q + sum_d P),
              no V                                            (MSViT, QKFormer)
  `proj_lif_batch_as_time` reproduces MSViT's / QKFormer's SSA, whose proj_lif
  runs over batch and time as one sequence (see batch_as_time_multistep).
  `style` is what the backbone wraps around it:
    * spikformer: input spikes (or spike sums); output proj_lif(proj_bn(proj(y)));
    * sdt:        input membrane u; y from shortcut_lif(u); output
                  proj_bn(proj(y)) + u (the membrane shortcut).
  Names follow the official code of each kind (`attn_lif`, `talking_heads_lif`).

  With `record_attention` set (`model.set_attributes(record_attention=True)`,
  then `nnx.capture(model, nnx.Intermediate)`) each call sows `attention_map`,
  per head, from the Q and K that enter the attention (after neurons, float
  activations and erosion), [B*T, heads, ...]:
    * ssa, a_i, a_relu, a_leakyrelu: Q K^T * scale, [.., N, N] (also when
      `order` never forms it);
    * a2os2a: Q K^T, [.., N, N];  vsa, vsa_float_v: the softmax, [.., N, N];
    * sdsa:   the talking_heads_lif spikes, the channel mask that every
              token's Q is multiplied by, [.., 1, d];
    * mssa:   the attn_lif spikes, the token mask on K, [.., N, 1] (or
              [.., N, d] with mssa_p_sum=False).
  Recording adds outputs only; the computation and its result are unchanged.
  """

  def __init__(self, dim: int, num_heads: int, *, s: Settings, kind: str = 'ssa',
               style: str = 'spikformer', scale: float = 0.125, order: str = 'qk_first',
               qkv_bias: bool = False, attn_v_threshold: float = 0.5, init: str,
               ternary: neurons.Neuron | None = None, proj: bool = True,
               erode_hw: tuple | None = None, dead_modules: bool = False,
               mssa_kernels: tuple = (1, 3), mssa_p_sum: bool = True,
               proj_lif_batch_as_time: bool = False, rngs: nnx.Rngs):
    if kind not in ATTENTION_KINDS:
      raise ValueError(f'attention kind {kind!r}; valid: {ATTENTION_KINDS}.')
    if style not in ATTENTION_STYLES:
      raise ValueError(f'attention style {style!r}; valid: {ATTENTION_STYLES}.')
    if dim % num_heads:
      raise ValueError(f'embed dim {dim} is not divisible by num_heads {num_heads}.')
    lin = functools.partial(s.linear, dim, dim, init=init, rngs=rngs, spikes_in=True)
    if style == 'sdt':
      self.shortcut_lif = s.lif()
    float_qk = kind in FLOAT_QK
    if kind == 'mssa':  # Q and P (token convs of two widths) and K; no V
      if not any(mssa_kernels):
        raise ValueError(f'mssa_kernels={mssa_kernels}: at least one of Q, P must be built.')
      for name, kernel in zip('qp', mssa_kernels):
        if kernel:
          self._add_token_conv(name, kernel, dim, s=s, bias=qkv_bias, init=init, rngs=rngs)
          setattr(self, f'{name}_bn', s.bn(dim))
          setattr(self, f'{name}_lif', s.lif())
      self.k_linear, self.k_bn, self.k_lif = lin(bias=qkv_bias), s.bn(dim), s.lif()
    else:
      self.q_linear, self.q_bn = lin(bias=qkv_bias), s.bn(dim)
      if not float_qk:
        self.q_lif = s.lif()
      self.k_linear, self.k_bn = lin(bias=qkv_bias), s.bn(dim)
      if kind in ('ssa', 'sdsa'):  # A2OS2A's K is ReLU(BN(.)); the ablations' are float
        self.k_lif = s.lif()
      self.v_linear, self.v_bn = lin(bias=qkv_bias), s.bn(dim)
      if kind == 'a2os2a':
        if ternary is None:
          raise ValueError("attention 'a2os2a' needs its ternary neuron (model.ternary).")
        self.v_lif = SpikingNeuron(ternary, s.T)
      elif kind != 'vsa_float_v':
        self.v_lif = s.lif()
    if style == 'sdt' and dead_modules:
      # SDT's Conv1d(h, h, 1), built but never called; part of the backbone's
      # state dict whatever the attention, so SDT checkpoints load everywhere.
      self.talking_heads = nnx.Linear(num_heads, num_heads, use_bias=False,
                                      param_dtype=s.param_dtype, rngs=rngs)
    if kind == 'sdsa':
      self.talking_heads_lif = s.lif(v_threshold=attn_v_threshold)
    else:
      self.attn_lif = s.lif(v_threshold=attn_v_threshold)
    if proj:
      self.proj_linear, self.proj_bn = lin(bias=True), s.bn(dim)
      if style == 'spikformer':
        self.proj_lif = SpikingNeuron(s.neuron, s.T, batch_as_time=proj_lif_batch_as_time,
                                      groups=s.bn_groups)
    self.kind, self.style, self.proj = kind, style, proj
    self.num_heads, self.scale, self.order = num_heads, scale, order
    self.erode_hw = erode_hw
    self.mssa_kernels, self.mssa_p_sum = tuple(mssa_kernels), mssa_p_sum
    self.record_attention = False

  def _add_token_conv(self, name, kernel, dim, *, s, bias, init, rngs):
    """A Conv1d over the flattened token index: kernel 1 is a token-wise
    Linear (`{name}_linear`), a wider kernel (MSViT's P, padding k // 2, rows
    wrap into each other as in the official code) an nnx.Conv (`{name}_conv`)."""
    if kernel == 1:
      setattr(self, f'{name}_linear', s.linear(dim, dim, bias=bias, init=init, rngs=rngs,
                                               spikes_in=True))
      return
    setattr(self, f'{name}_conv', s.conv(dim, dim, kernel=(kernel,), bias=bias,
                                         init='torch_default', rngs=rngs, spikes_in=True))

  def _branch(self, name, x):
    """LIF(BN(token conv x)) of branch `name`, or None if it was not built."""
    conv = getattr(self, f'{name}_linear', None) or getattr(self, f'{name}_conv', None)
    if conv is None:
      return None
    return getattr(self, f'{name}_lif')(getattr(self, f'{name}_bn')(conv(x)))

  def __call__(self, x: jax.Array) -> jax.Array:
    identity = x
    if self.style == 'sdt':
      x = self.shortcut_lif(x)
    h, erode, kind = self.num_heads, self.erode_hw is not None, self.kind
    if kind == 'mssa':
      q, p, k = (self._branch(n, x) for n in 'qpk')
      heads = lambda t: None if t is None else split_heads(t, h)
      y = merge_heads(multi_scale_spiking_attention(
          heads(q), heads(p), heads(k), functools.partial(self._gate, self.attn_lif),
          p_sum=self.mssa_p_sum))
      return self._project(y.astype(x.dtype), identity)
    q, k = self.q_bn(self.q_linear(x)), self.k_bn(self.k_linear(x))
    v = self.v_bn(self.v_linear(x))
    if kind in FLOAT_QK:
      q, k = FLOAT_QK[kind](q), FLOAT_QK[kind](k)
    else:
      q = self.q_lif(q)
      k = jax.nn.relu(k) if kind == 'a2os2a' else self.k_lif(k)
    if kind != 'vsa_float_v':
      v = self.v_lif(v)
    if erode:
      k, v = _erode(k, self.erode_hw), _erode(v, self.erode_hw)
    q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)
    if self.record_attention and kind != 'sdsa':  # sdsa records in _gate
      self.sow(nnx.Intermediate, 'attention_map', self._attention_map(q, k))
    if kind in ('ssa', 'a_i', 'a_relu', 'a_leakyrelu'):
      y = self.attn_lif(merge_heads(
          spiking_self_attention(q, k, v, scale=self.scale, order=self.order)))
    elif kind in ('vsa', 'vsa_float_v'):
      y = self.attn_lif(merge_heads(vanilla_self_attention(q, k, v)))
    elif kind == 'sdsa':
      y = merge_heads(spike_driven_self_attention(
          q, k, v, functools.partial(self._gate, self.talking_heads_lif),
          erode=functools.partial(_erode, spatial=None) if erode else None))
    else:
      y = self.attn_lif(merge_heads(a2os2a_self_attention(q, k, v, order=self.order)))
    return self._project(y.astype(x.dtype), identity)

  def _gate(self, neuron: SpikingNeuron, a: jax.Array) -> jax.Array:
    """`neuron` on a gate [BT, heads, n, m] (it is elementwise): sdsa's
    talking_heads_lif, mssa's attn_lif; sows its spikes when recording."""
    s = neuron(a.reshape(a.shape[0], -1)).reshape(a.shape)
    if self.record_attention:
      self.sow(nnx.Intermediate, 'attention_map', s)
    return s

  def _attention_map(self, q: jax.Array, k: jax.Array) -> jax.Array:
    """The N x N map of `kind` from per-head q, k (recording only)."""
    if self.kind in ('vsa', 'vsa_float_v'):
      return vanilla_attention_map(q, k)
    dt = neurons.membrane_dtype(q.dtype)  # as spiking_self_attention: exact counts
    qk = q.astype(dt) @ jnp.swapaxes(k.astype(dt), -1, -2)
    return qk if self.kind == 'a2os2a' else qk * self.scale

  def _project(self, y: jax.Array, identity: jax.Array) -> jax.Array:
    if not self.proj:
      return y + identity if self.style == 'sdt' else y
    y = self.proj_bn(self.proj_linear(y))
    if self.style == 'sdt':
      return y + identity
    return self.proj_lif(y)


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
