"""What every model family shares: the neuron and layer settings from
`config.model`, and `Family`, the protocol by which a family is found by name.

A family module (spikformer.py, sdt.py, msvit.py) ends with
`FAMILY = Family(...)`; models/__init__.py registers them. Nothing outside a
family's module compares family names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from spikeformer_jax import attention
from spikeformer_jax import errors
from spikeformer_jax import kernels as kernels_lib
from spikeformer_jax import layers
from spikeformer_jax import neurons

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: everything the rest of the code asks of one."""

  name: str
  model: Callable[..., nnx.Module]  # model(config.model, settings=Settings, rngs=...)
  model_config: Callable[..., ml_collections.ConfigDict]  # its config.model defaults
  check: Callable[[ml_collections.ConfigDict], None]  # one-line errors, before building
  downsampling: Callable[[ml_collections.ConfigDict], int]  # image size / token grid
  describe: Callable[[ml_collections.ConfigDict], str]  # 'spikformer cifar 4-384'
  runlocal: Callable[[ml_collections.ConfigDict], None]  # shrink config.model in place
  from_fixture: Callable[[dict], ml_collections.ConfigDict] | None = None  # fidelity
  # Its config.model fields added after runs were saved without them, as
  # attention.Kind.added: field -> (the value those runs behave as, what matters).
  added: dict = dataclasses.field(default_factory=dict)


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def neuron_config(**overrides) -> ml_collections.ConfigDict:
  """`config.model.neuron`: the network's neurons, the fields of `neurons.Neuron`
  (SpikingJelly's LIF semantics and defaults)."""
  cfg = ml_collections.ConfigDict(dict(
      # 'lif' (every official model); 'if': SpikingJelly's IFNode, no leak (H = V + X;
      # Spikformer Table 6's IF rows); 'relu' / 'gelu': no spikes, every network
      # neuron that float activation (the ANN baselines; compact_spikes off; A2OS2A's
      # ternary V keeps spiking)
      kind='lif',
      tau=2.0,                # membrane time constant: H = V + (X - V) / tau
      decay_input=True,       # SpikingJelly's decay_input: the input is divided by tau
      v_threshold=1.0,        # fires where H >= v_threshold
      v_reset=0.0,            # membrane after a spike (hard reset)
      soft_reset=False,       # True: subtract the threshold instead of resetting
      detach_reset=True,      # no gradient through the reset (every official model)
      surrogate='sigmoid',    # surrogate gradient: sigmoid, atan, triangle, straight_through
      alpha=0.0,              # surrogate sharpness; 0: its default (sigmoid 4, atan 2, triangle 1)
      # 'spikingjelly' (H = V + (X - V) / tau) or 'paper': A2OS2A's eqs. 1-3,
      # U = H + X with the leak beta where no spike fires (H = Vreset S + beta U (1 - S))
      charge_form='spikingjelly',
      beta=0.5,               # leak of charge_form 'paper' (ours: the paper gives no value)
      # how the timestep loop compiles: 'scan' (lax.scan), 'python' (unrolled at
      # trace time) or 'vjp' (one custom VJP saving only the pre-spike membrane);
      # identical spikes, gradients equal up to float rounding
      loop='scan',
      unroll=0,               # steps per scan iteration (scan, vjp's backward); 0: all T
      recompute=False,        # keep only the input for the backward and rerun the loop
                              # there (jax.checkpoint): identical results, less memory
      # 'float32' (membranes in at least float32: exact) or 'compute' (the compute
      # dtype, bfloat16 under bfloat16, as SpikingJelly under AMP: inexact, rounding
      # can move spikes near the threshold; less memory traffic)
      membrane='float32'))
  cfg.update(overrides)
  return cfg
# fmt: on


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def shared_fields() -> dict:
  """`config.model` fields of every family, with their one default: how the
  same function is compiled (dtype, remat, int8 spike residuals, weight
  gradients), the neuron, and the attention kinds' own fields (any kind runs
  on any backbone by config)."""
  return dict(
      # 'float32', 'bfloat16' (parameters, BatchNorm statistics and membranes stay
      # float32) or 'float64' (needs JAX_ENABLE_X64)
      dtype='float32',
      # blocks.REMAT_POLICIES ('', full, dots, dots_no_batch): each block's
      # activations recomputed in the backward pass under that jax.checkpoint
      # policy (identical results)
      remat='',
      remat_stem='',  # the same for each stage of the patch stem / patch embedding
      # conv / linear spike inputs saved as int8 for the weight gradient (bit-identical)
      compact_spikes=layers.Settings.compact_spikes,
      # auto (gemm on CPU, xla on GPU / TPU, for the devices compiled for) | xla
      # (autodiff's own) | gemm (plain GEMMs, im2col-style for convs); synapses.py
      weight_grad=layers.Settings.weight_grad,
      # BatchNorm backward from its input alone: statistics and normalisation
      # recomputed there (jax.checkpoint; identical results, less memory)
      bn_recompute=layers.Settings.bn_recompute,
      # auto (pallas when compiling for TPU, xla elsewhere) | xla (the pure-JAX
      # neuron and BatchNorm) | pallas (fused kernels: each neuron, and each
      # BatchNorm with the neuron it feeds; interpret mode on CPU); kernels.py
      kernels=layers.Settings.kernels,
      neuron=neuron_config(), **attention.config_fields())
# fmt: on


NETWORK_NEURONS = ('lif', 'if', 'relu', 'gelu')  # an attention kind's own neurons: its fields
# Kinds that do not spike: every network neuron becomes that float activation
# (the papers' ANN baselines, e.g. Spikformer's Transformer-8-512 rows).
NON_SPIKING = tuple(neurons.ACTIVATIONS)


def spiking(cfg: ml_collections.ConfigDict) -> bool:
  """Whether `config.model`'s network neurons spike (not an ANN baseline)."""
  return cfg.neuron.get('kind', 'lif') not in NON_SPIKING


def make_neuron(cfg: ml_collections.ConfigDict) -> neurons.Neuron:
  kind = cfg.get('kind', 'lif')  # .get: configs saved before the field existed
  if kind not in NETWORK_NEURONS:
    raise errors.ConfigError(
      f'Neuron.kind={kind!r} is not valid for the network\'s neurons; '
      f'choose one of {NETWORK_NEURONS} (relu, gelu: no neuron, a float '
      'activation); a neuron of an attention kind\'s own (a ternary one) '
      'is set in that kind\'s fields.'
    )
  if kind == 'if' and cfg.get('charge_form', 'spikingjelly') != 'spikingjelly':
    raise errors.ConfigError(
      "Neuron.charge_form='paper' is a leaky charge; IF neurons (kind='if') "
      "have no leak: keep charge_form='spikingjelly'."
    )
  return neurons.Neuron(
    kind=kind,
    charge_form=cfg.get('charge_form', 'spikingjelly'),
    beta=cfg.get('beta', 0.5),
    tau=cfg.tau,
    decay_input=cfg.decay_input,
    v_threshold=cfg.v_threshold,
    v_reset=None if cfg.soft_reset else cfg.v_reset,
    detach_reset=cfg.detach_reset,
    surrogate=cfg.surrogate,
    alpha=cfg.alpha or None,
    loop=cfg.loop,
    unroll=cfg.unroll,
    recompute=cfg.get('recompute', False),
    membrane=cfg.get('membrane', 'float32'),
  )


def settings(cfg: ml_collections.ConfigDict, *, bn_groups: int = 1) -> layers.Settings:
  """Layer settings from `config.model`: T, neuron, dtypes and BN groups."""
  if cfg.dtype not in DTYPES:
    raise errors.ConfigError(f'model.dtype={cfg.dtype!r}; valid: {sorted(DTYPES)}.')
  dtype = DTYPES[cfg.dtype]
  if dtype == jnp.float64 and not jax.config.read('jax_enable_x64'):
    raise errors.ConfigError(
      "model.dtype='float64' needs 64-bit JAX: set "
      "JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', True)."
    )
  # Parameters stay float32 under bfloat16 compute; float64 runs all in float64.
  param_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return layers.Settings(
    T=cfg.T,
    neuron=make_neuron(cfg.neuron),
    dtype=dtype,
    param_dtype=param_dtype,
    bn_groups=bn_groups,
    # int8 residuals hold spikes only: off for float activations
    compact_spikes=bool(cfg.get('compact_spikes', layers.Settings.compact_spikes)) and spiking(cfg),
    weight_grad=cfg.get('weight_grad', layers.Settings.weight_grad),
    bn_recompute=bool(cfg.get('bn_recompute', layers.Settings.bn_recompute)),
    kernels=check_kernels(cfg.get('kernels', layers.Settings.kernels)),
  )


def check_kernels(kernels: str) -> str:
  if kernels not in kernels_lib.KERNELS:
    raise errors.ConfigError(f'model.kernels={kernels!r}; valid: {", ".join(kernels_lib.KERNELS)}.')
  return kernels


def check_heads(m: ml_collections.ConfigDict):
  """One width for all blocks (Spikformer, SDT): heads divide it; the patch
  stem's widths D/8..D need a multiple of 8."""
  if m.num_heads < 1:
    raise errors.ConfigError(f'model.num_heads={m.num_heads} must be >= 1.')
  if m.embed_dim < 8:
    raise errors.ConfigError(
      f'model.embed_dim={m.embed_dim} must be a positive multiple of 8 (the '
      'patch stem widths are D/8, D/4, D/2, D).'
    )
  if m.embed_dim % m.num_heads:
    valid = ', '.join(str(h) for h in range(1, m.embed_dim + 1) if m.embed_dim % h == 0)
    raise errors.ConfigError(
      f'model.embed_dim={m.embed_dim} is not divisible by '
      f'model.num_heads={m.num_heads}; valid heads: {valid}.'
    )
  if m.depth < 1:
    raise errors.ConfigError(f'model.depth={m.depth} must be >= 1.')
  if m.embed_dim % 8:
    raise errors.ConfigError(
      f'model.embed_dim={m.embed_dim} must be a multiple of 8 (the patch '
      'stem widths are D/8, D/4, D/2, D).'
    )


def check_pooling(pooling: str):
  if pooling and (len(pooling) != 4 or set(pooling) - {'0', '1'}):
    raise errors.ConfigError(
      f"model.pooling={pooling!r}: four '0'/'1' characters, one per stage "
      "of the patch stem (1: max-pooled), or '' for the flavour's."
    )


def flat_runlocal(m: ml_collections.ConfigDict):
  """Spikformer / SDT in seconds on CPU: one block of width 32, 2 heads, T=2
  (T=1 stays 1: the ANN baselines)."""
  m.depth, m.embed_dim, m.num_heads, m.T = 1, 32, 2, min(m.T, 2)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (like PyTorch's `parameters()`)."""
  return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
