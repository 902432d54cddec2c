"""Spikformer Table 1's non-spiking ablations of SSA.

Q and K are float: the BN output through an activation instead of a neuron
(a_i: identity, a_relu, a_leakyrelu), combined as SSA; or VSA, the vanilla
Softmax(Q K^T / sqrt(d)) V (eqs. 12-13). V stays spiking, except in
vsa_float_v. The official code of the ablations was not released; spikformer
issue #9 confirms they drop the Q/K neurons and keep the rest of the block.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from spikeformer_jax.attention import base
from spikeformer_jax.attention import ssa


def vanilla_attention_map(q, k):
  """VSA's N x N map Softmax(Q K^T / sqrt(d)), q, k: [..., heads, N, d]."""
  d = q.shape[-1]
  return jax.nn.softmax((q @ jnp.swapaxes(k, -1, -2)) / jnp.sqrt(jnp.asarray(d, q.dtype)), axis=-1)


def vanilla_self_attention(q, k, v):
  """VSA: Softmax(Q K^T / sqrt(d)) V, float Q and K."""
  return vanilla_attention_map(q, k) @ v


class FloatQK(ssa.SSA):
  """SSA with float f(Q), f(K)."""

  def __init__(self, name: str, f: Callable, picture: str):
    self.name, self.f, self.picture = name, f, picture

  def build(self, attn, ctx):
    base.build_qkv(attn, ctx, q_lif=False, k_lif=False)
    attn.attn_lif = ctx.settings.lif(v_threshold=ctx.attn_v_threshold)

  def activate(self, attn, q, k, v):
    return self.f(q), self.f(k), attn.v_lif(v)


class VSA(FloatQK):
  """Softmax attention of float Q and K; spike V, or float V (float_v)."""

  def __init__(self, name: str, float_v: bool):
    super().__init__(name, lambda x: x, 'Softmax(Q K^T / sqrt(d))')
    self.float_v = float_v

  def build(self, attn, ctx):
    base.build_qkv(attn, ctx, q_lif=False, k_lif=False, v_lif=not self.float_v)
    attn.attn_lif = ctx.settings.lif(v_threshold=ctx.attn_v_threshold)

  def activate(self, attn, q, k, v):
    return q, k, (v if self.float_v else attn.v_lif(v))

  def equation(self, attn, q, k, v):
    return vanilla_self_attention(q, k, v)

  def attention_map(self, attn, q, k):
    return vanilla_attention_map(q, k)

  def order(self, attn) -> str:
    return 'qk_first'  # the softmax map is formed whatever the order


base.register(FloatQK('a_i', lambda x: x, 'Q K^T * scale (float Q, K)'))
base.register(FloatQK('a_relu', jax.nn.relu, 'ReLU(Q) ReLU(K)^T * scale'))
base.register(
  FloatQK(
    'a_leakyrelu',
    jax.nn.leaky_relu,  # slope 0.01, PyTorch's default
    'LReLU(Q) LReLU(K)^T * scale',
  )
)
base.register(VSA('vsa', float_v=False))
base.register(VSA('vsa_float_v', float_v=True))
