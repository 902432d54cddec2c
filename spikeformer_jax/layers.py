"""The neuron module and the settings every layer of a network shares.

Layout convention: stateless layers (Linear, Conv, BatchNorm, pooling) see
time folded into the batch, `[B*T, ...]` with the batch first (so a batch
sharded over devices needs no communication); only `SpikingNeuron` unfolds to
`[B, T, ...]` and runs the pure neuron of `neurons.py` over time. `Settings`
makes the network's neurons, BatchNorms and conv / linear layers (spike
inputs kept as int8 for the backward pass: synapses.py).

Module attribute names follow the official PyTorch code (`q_bn`, `attn_lif`,
`fc1_linear`, ...) so that weight conversion and per-layer firing rates map
one to one onto the official state dicts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import errors, kernels, neurons, synapses
from spikeformer_jax.norm import BatchNorm
from spikeformer_jax.ops import initializers

Dtype = Any


def batch_as_time_multistep(
  neuron: neurons.Neuron, x: jax.Array, T: int, groups: int = 1
) -> jax.Array:
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
  neuron = dataclasses.replace(
    neuron, loop='scan' if neuron.loop == 'python' else neuron.loop, unroll=neuron.unroll or T
  )
  s = neurons.multistep(neuron, xs.reshape(groups, T * (b // groups), -1))
  return s.reshape(groups, T, b // groups, -1).transpose(0, 2, 1, 3).reshape(x.shape)


def check_spike_sums(settings: Settings, depth: int):
  """A spike-add residual stream reaches 2 + 2 * depth (a {0,1,2} stem output
  plus two spikes per block); `compact_spikes` keeps it as int8."""
  if settings.compact_spikes and 2 + 2 * depth > 127:
    raise errors.ConfigError(
      f'{depth} blocks make residual spike sums up to {2 + 2 * depth}, '
      'beyond the int8 that model.compact_spikes saves them in; set '
      'model.compact_spikes=False.'
    )


def count_dtype():
  """dtype of recorded counts: int64 under 64-bit JAX (exact, as the fidelity
  check needs); else float32, since int32 overflows at ImageNet scale (~1e9
  units per step)."""
  return jnp.int64 if jax.config.read('jax_enable_x64') else jnp.float32


class SpikingNeuron(nnx.Module):
  """A multi-step neuron on a time-folded tensor [B*T, ...].

  With `record_spikes` set (`model.set_attributes(record_spikes=True)`, then
  `logits, inter = nnx.capture(model, nnx.Intermediate)(x)`) it sows, per call,
  the number of non-zero spikes per timestep (`spike_count`, shape [T]) and the
  number of spike values over all timesteps (`numel`) as `nnx.Intermediate`s:
  firing rates without touching model code. `record_spikes='per_example'`
  sows each example's spike count (`spikes_per_example`, [B]) and the units
  per example instead, so that padded examples can be left out.

  `recorder`, when set (analysis.py sets it on its own copy of a model), is
  called with each output and T: the analysis' explicit observer.
  """

  def __init__(
    self,
    neuron: neurons.Neuron,
    T: int,
    *,
    batch_as_time: bool = False,
    groups: int = 1,
    kernels: str = 'xla',
  ):
    self.neuron = neuron
    self.T = T
    self.batch_as_time, self.groups = batch_as_time, groups
    self.kernels = kernels  # kernels.KERNELS: how the neuron compiles, not what it computes
    self.record_spikes = False
    self.recorder: Any = None  # analysis.py's tap, called as recorder(spikes, T)

  def fused(self, shape: tuple) -> bool:
    """Whether this neuron runs as a Pallas kernel on input `shape` [B*T, ...]
    (model.kernels; kernels.py says where a kernel does not apply)."""
    if self.batch_as_time or kernels.resolve(self.kernels) != 'pallas':
      return False
    bt = (shape[0] // self.T, self.T) + tuple(shape[1:])
    return not (kernels.unsupported(self.neuron) or kernels.unsupported_shape(bt))

  def __call__(self, x: jax.Array) -> jax.Array:
    T = self.T
    if x.shape[0] % T:
      raise ValueError(f'leading axis {x.shape[0]} is not batch*T with T={T}.')
    if self.batch_as_time:
      s = batch_as_time_multistep(self.neuron, x, T, self.groups)
    else:
      xb = x.reshape((x.shape[0] // T, T) + x.shape[1:])
      run = kernels.multistep if self.fused(x.shape) else neurons.multistep
      s = run(self.neuron, xb)
    return self.observe(s, x.shape)

  def observe(self, s: jax.Array, shape: tuple) -> jax.Array:
    """Records spikes s (per the record_spikes / recorder settings) and
    returns them as `shape`, the input's."""
    T = self.T
    if self.record_spikes == 'per_example':  # training's evaluations: padding masked out
      per_ex = s.reshape(shape[0] // T, -1)  # [B, T * units] in either layout
      self.sow(
        nnx.Intermediate, 'spikes_per_example', jnp.sum(per_ex != 0, axis=1, dtype=jnp.float32)
      )
      self.sow(nnx.Intermediate, 'units_per_example', jnp.float32(per_ex.shape[1]))
    elif self.record_spikes:
      counts = spike_counts(s.reshape(shape), T)
      self.sow(nnx.Intermediate, 'spike_count', counts['spike_count'])
      self.sow(nnx.Intermediate, 'numel', counts['numel'])
    s = s.reshape(shape)
    if self.recorder is not None:
      self.recorder(s, T)
    return s


def bn_fire(bn: BatchNorm, lif: SpikingNeuron, x: jax.Array) -> jax.Array:
  """lif(bn(x)): with the Pallas kernels on (model.kernels) and BatchNorm in
  train mode with one group, one kernel normalises and fires (and two give
  the backward, BatchNorm's included): the same spikes and statistics, the
  gradients to float rounding (kernels.norm_fire). Else the two modules."""
  if bn.use_running_average or kernels.unsupported_norm(bn.groups) or not lif.fused(x.shape):
    return lif(bn(x))
  norm = kernels.Norm(bn.epsilon, jnp.dtype(bn.dtype or x.dtype))
  s, mean, var = kernels.norm_fire(lif.neuron, norm, x, bn.scale[...], bn.bias[...], lif.T)
  bn.update_statistics(mean, var, x.size // x.shape[-1])
  return lif.observe(s, x.shape)


def spike_counts(s: jax.Array, T: int) -> dict[str, jax.Array]:
  """Of spikes s [B*T, ...]: the non-zero values per timestep (`spike_count`,
  [T]) and the number of values over all timesteps (`numel`), in count_dtype()."""
  dt = count_dtype()
  per_t = s.reshape(s.shape[0] // T, T, -1)  # [B, T, units] in either layout
  return {
    'spike_count': jnp.sum(per_t != 0, axis=(0, 2), dtype=dt),
    'numel': jnp.asarray(s.size, dt),
  }


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every layer of one network shares: T, neuron, dtypes, BN scope."""

  T: int
  neuron: neurons.Neuron = neurons.Neuron()
  dtype: Dtype = jnp.float32  # compute dtype of conv / linear
  param_dtype: Dtype = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  compact_spikes: bool = True  # save spike inputs of conv / linear as int8 (exact)
  weight_grad: str = 'auto'  # synapses.WEIGHT_GRADS
  bn_recompute: bool = False  # BatchNorm backward from its input alone (norm.BatchNorm)
  kernels: str = 'auto'  # kernels.KERNELS: Pallas neuron / BatchNorm+neuron kernels

  def lif(self, **overrides) -> SpikingNeuron:
    return self.spiking(dataclasses.replace(self.neuron, **overrides))

  def spiking(self, neuron: neurons.Neuron, **options) -> SpikingNeuron:
    """A SpikingNeuron of `neuron` with this network's T and kernels."""
    return SpikingNeuron(neuron, self.T, kernels=self.kernels, **options)

  def bn(self, c: int) -> BatchNorm:
    return BatchNorm(
      c,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      groups=self.bn_groups,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      recompute=self.bn_recompute,
    )

  def linear(
    self, din: int, dout: int, *, bias: bool, init: str, rngs: nnx.Rngs, spikes_in: bool = False
  ) -> nnx.Linear:
    """A token-wise linear map. init: 'trunc_normal' (timm, nn.Linear) or
    'torch_default' (a kernel-1 Conv1d/Conv2d of the official code).
    spikes_in: the caller promises an input of small integers (spikes, spike
    sums in [-128, 127]), so the backward pass may keep it as int8
    (`compact_spikes`); opt in, as int8 would corrupt any other input."""
    kinit, binit = initializers(init, din)
    return nnx.Linear(
      din,
      dout,
      use_bias=bias,
      kernel_init=kinit,
      bias_init=binit,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      rngs=rngs,
      dot_general=synapses.SpikeDot(self.compact_spikes and spikes_in, self.weight_grad),
    )

  def conv(
    self,
    cin: int,
    cout: int,
    *,
    kernel: int | tuple = 3,
    stride: int = 1,
    bias: bool = False,
    init: str = 'torch_default',
    rngs: nnx.Rngs,
    spikes_in: bool = False,
  ) -> nnx.Conv:
    """A convolution with symmetric padding, 2-D (`kernel` an int) or of the
    rank of a `kernel` tuple; init 'torch_default' (PyTorch's) or
    'trunc_normal' (std .02, bias 0: SDT's _init_weights). spikes_in: as for
    `linear` (never a stem's first conv, which sees images or event counts)."""
    ks = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    kinit, binit = initializers(init, cin * math.prod(ks))
    return nnx.Conv(
      cin,
      cout,
      ks,
      strides=stride,
      padding=tuple((k // 2, k // 2) for k in ks),
      use_bias=bias,
      kernel_init=kinit,
      bias_init=binit,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      rngs=rngs,
      conv_general_dilated=synapses.SpikeConv(self.compact_spikes and spikes_in, self.weight_grad),
    )
