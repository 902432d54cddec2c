"""SDSA: the Spike-driven Transformer's Spike-Driven Self-Attention.

Q * SN(sum over tokens of K * V): Hadamard products and a column sum, no
matmul and no scale; SN is `talking_heads_lif` (threshold 0.5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spikeformer_jax import ops
from spikeformer_jax.attention import base


def spike_driven_self_attention(q, k, v, kv_neuron, erode=None):
  """Q * SN(sum_N K * V), q, k, v: [..., heads, N, d] spikes; kv_neuron maps
  the [..., heads, 1, d] token sum to spikes. `erode`, SDT's DVS option,
  max-pools K * V before the sum and the output."""
  kv = k * v
  if erode is not None:
    kv = erode(kv)
  y = q * kv_neuron(jnp.sum(kv, axis=-2, keepdims=True))
  return y if erode is None else erode(y)


class SDSA(base.Kind):
  name = 'sdsa'
  picture = 'talking_heads_lif: channel mask on Q'

  def build(self, attn, ctx):
    base.build_qkv(attn, ctx)
    attn.talking_heads_lif = ctx.settings.lif(v_threshold=ctx.attn_v_threshold)

  def forward(self, attn, x: jax.Array) -> jax.Array:
    q, k, v = base.fire_qkv(attn, x, (attn.q_lif, attn.k_lif, attn.v_lif))
    k, v = base.erode_kv(attn, k, v)
    q, k, v = base.heads(attn, q, k, v)
    erode = functools.partial(base.erode, spatial=None) if attn.erode_hw is not None else None
    return ops.merge_heads(
      spike_driven_self_attention(
        q, k, v, functools.partial(attn.gate, attn.talking_heads_lif), erode=erode
      )
    )

  def products(self, attn, *, T, n, c, rate):
    return [('k*v token sum', T * n * c, rate('k_lif'), rate('v_lif'))]

  def map_axes(self, rows, cols):
    return '', 'channel', False  # [1, d]: the channel mask every token's Q is multiplied by


base.register(SDSA())
