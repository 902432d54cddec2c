"""SSA: Spikformer's Spiking Self-Attention (Zhou et al., ICLR 2023, eq. 14).

Q, K, V = LIF(BN(W x)); attn_lif(Q K^T V * scale): no softmax, spike products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spikeformer_jax import neurons
from spikeformer_jax import ops
from spikeformer_jax.attention import base


def spiking_self_attention(q, k, v, *, scale: float, order: str):
  """SSA(Q, K, V) = Q K^T V * scale.

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


class SSA(base.Kind):
  """The matmul kinds share this shape: Q, K, V through `activate`, then
  attn_lif(`equation`(Q, K, V)); recorded map: Q K^T * scale."""
  name = 'ssa'
  picture = 'Q K^T * scale'

  def build(self, attn, ctx):
    base.build_qkv(attn, ctx)
    attn.attn_lif = ctx.s.lif(v_threshold=ctx.attn_v_threshold)

  def activate(self, attn, q, k, v):
    return attn.q_lif(q), attn.k_lif(k), attn.v_lif(v)

  def equation(self, attn, q, k, v):
    return spiking_self_attention(q, k, v, scale=attn.scale, order=attn.order)

  def attention_map(self, attn, q, k):
    return base.qk_map(q, k) * attn.scale

  def forward(self, attn, x: jax.Array) -> jax.Array:
    q, k, v = self.activate(attn, *base.qkv(attn, x))
    k, v = base.erode_kv(attn, k, v)
    q, k, v = base.heads(attn, q, k, v)
    attn.record_map(lambda: self.attention_map(attn, q, k))
    return attn.attn_lif(ops.merge_heads(self.equation(attn, q, k, v)))

  def order(self, attn) -> str:
    return attn.order

  def products(self, attn, *, T, n, c, rate):
    return base.matmul_products(self.order(attn), T=T, n=n, c=c, h=attn.num_heads,
                                fq=rate('q_lif'), fk=rate('k_lif'), fv=rate('v_lif'))


base.register(SSA())
