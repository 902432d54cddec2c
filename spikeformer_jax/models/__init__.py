"""Model families, built by name from `config.model`."""

from __future__ import annotations

import dataclasses

import ml_collections
import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import layers, neurons

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


def neuron_config(**overrides) -> ml_collections.ConfigDict:
  """`config.model.neuron`: the fields of `neurons.Neuron` (SpikingJelly defaults).

  alpha 0 takes the surrogate's own default (sigmoid 4, atan 2, triangle 1).
  """
  cfg = ml_collections.ConfigDict(dict(
      tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, soft_reset=False,
      detach_reset=True, surrogate='sigmoid', alpha=0.0, loop='scan', unroll=0))
  cfg.update(overrides)
  return cfg


def ternary_config(**overrides) -> ml_collections.ConfigDict:
  """`config.model.ternary`: A2OS2A's ternary V neuron (paper eqs. 25-27).

  Defaults share the network's SpikingJelly LIF convention (tau and surrogate
  from `model.neuron`, Vth 1, Vreset 0); charge_form='paper' is the paper's
  literal U = H + X with leak `beta`; grad='clamp' is the straight-through
  gradient of clamp(U / Vth, -1, 1).
  """
  cfg = ml_collections.ConfigDict(dict(
      v_threshold=1.0, v_reset=0.0, charge_form='spikingjelly', beta=0.5,
      grad='surrogate'))
  cfg.update(overrides)
  return cfg


def make_ternary(model_cfg: ml_collections.ConfigDict) -> neurons.Neuron:
  """The network's LIF (`model.neuron`) turned ternary with `model.ternary`."""
  t = model_cfg.ternary
  return dataclasses.replace(
      make_neuron(model_cfg.neuron), kind='ternary', v_threshold=t.v_threshold,
      v_reset=t.v_reset, charge_form=t.charge_form, beta=t.beta, ternary_grad=t.grad)


def make_neuron(cfg: ml_collections.ConfigDict) -> neurons.Neuron:
  return neurons.Neuron(
      kind='lif', tau=cfg.tau, decay_input=cfg.decay_input,
      v_threshold=cfg.v_threshold, v_reset=None if cfg.soft_reset else cfg.v_reset,
      detach_reset=cfg.detach_reset, surrogate=cfg.surrogate, alpha=cfg.alpha or None,
      loop=cfg.loop, unroll=cfg.unroll)


def settings(cfg: ml_collections.ConfigDict, *, bn_groups: int = 1) -> layers.Settings:
  """Layer settings from `config.model`: T, neuron, dtypes and BN groups."""
  if cfg.dtype not in DTYPES:
    raise ValueError(f'model.dtype={cfg.dtype!r}; valid: {sorted(DTYPES)}.')
  dtype = DTYPES[cfg.dtype]
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("model.dtype='float64' needs 64-bit JAX: set "
                     "JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', True).")
  # Parameters stay float32 under bfloat16 compute; float64 runs all in float64.
  param_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return layers.Settings(T=cfg.T, neuron=make_neuron(cfg.neuron), dtype=dtype,
                         param_dtype=param_dtype, bn_groups=bn_groups,
                         compact_spikes=bool(cfg.get('compact_spikes', True)),
                         weight_grad=cfg.get('weight_grad', 'auto'))


def build_model(cfg: ml_collections.ConfigDict, *, seed: int = 0,
                bn_groups: int = 1) -> nnx.Module:
  """Builds the model named by `cfg.name` (`config.model`)."""
  from spikeformer_jax.models import msvit, sdt, spikformer  # pylint: disable=import-outside-toplevel
  registry = {'spikformer': spikformer.Spikformer, 'sdt': sdt.SDT, 'msvit': msvit.MSViT}
  if cfg.name not in registry:
    raise ValueError(f'model.name={cfg.name!r}; valid: {sorted(registry)}.')
  kinds = cfg.get('attention')  # one kind, or one per stage (MSViT)
  kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds or ())
  ternary = make_ternary(cfg) if 'a2os2a' in kinds else None
  return registry[cfg.name](cfg, s=settings(cfg, bn_groups=bn_groups), ternary=ternary,
                            rngs=nnx.Rngs(seed))


FAMILIES = ('msvit', 'sdt', 'spikformer')


def downsampling(cfg: ml_collections.ConfigDict) -> int:
  """The factor by which the patch stem (and MSViT's stage embeddings) shrink
  the image: every pooling halves it, so the image size must be a multiple."""
  from spikeformer_jax.models import msvit, spikformer  # pylint: disable=import-outside-toplevel
  if cfg.name == 'msvit':
    stem = msvit.STEMS[cfg.stem or msvit.GRAPHS[cfg.graph]['stem']]
    return 2 ** (sum(stem['pools']) + len(cfg.dims) - 1)
  pooling = cfg.get('pooling') or spikformer.FLAVOURS[cfg.flavour]['pooling']
  return 2 ** pooling.count('1')


def describe(cfg: ml_collections.ConfigDict) -> str:
  """'spikformer cifar 4-384' style: family, flavour / graph / attention, depth-width."""
  if cfg.name == 'msvit':
    return f'msvit {cfg.graph} {sum(cfg.depths)}-{cfg.dims[-1]} (stages {tuple(cfg.dims)})'
  return f'{cfg.name} {cfg.get("flavour") or cfg.get("attention", "")} {cfg.depth}-{cfg.embed_dim}'


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (like PyTorch's `parameters()`)."""
  return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
