"""A2OS2A (Guo et al., CVPR 2025): binary Q, ReLU K, ternary V; SN(Q K^T V).

No softmax and no scale; both products are additions (and subtractions for
V = -1), exact in either association. The ternary V neuron (paper eqs. 25-27)
is built from this kind's own config field, `config.model.ternary`.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from spikeformer_jax import layers
from spikeformer_jax import neurons
from spikeformer_jax.attention import base
from spikeformer_jax.attention import ssa


def ternary_config(**overrides) -> ml_collections.ConfigDict:
  """`config.model.ternary`: the ternary V neuron.

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


def make_ternary(lif: neurons.Neuron, t: ml_collections.ConfigDict) -> neurons.Neuron:
  """The network's LIF turned ternary with `config.model.ternary`."""
  return dataclasses.replace(lif, kind='ternary', v_threshold=t.v_threshold,
                             v_reset=t.v_reset, charge_form=t.charge_form, beta=t.beta,
                             ternary_grad=t.grad)


def a2os2a_self_attention(q, k, v, *, order: str):
  """Paper eq. 28 before its neuron: Q K^T V (Q binary, K >= 0, V ternary)."""
  return ssa.spiking_self_attention(q, k, v, scale=1.0, order=order)


class A2OS2A(ssa.SSA):
  name = 'a2os2a'
  picture = 'Q K^T'
  config = {'ternary': ternary_config}

  def build(self, attn, ctx):
    t = self.own_config(ctx, 'ternary')
    base.build_qkv(attn, ctx, k_lif=False,
                   v_lif=layers.SpikingNeuron(make_ternary(ctx.s.neuron, t), ctx.s.T))
    attn.attn_lif = ctx.s.lif(v_threshold=ctx.attn_v_threshold)

  def activate(self, attn, q, k, v):
    return attn.q_lif(q), jax.nn.relu(k), attn.v_lif(v)

  def equation(self, attn, q, k, v):
    return a2os2a_self_attention(q, k, v, order=attn.order)

  def attention_map(self, attn, q, k):
    return base.qk_map(q, k)


base.register(A2OS2A())
