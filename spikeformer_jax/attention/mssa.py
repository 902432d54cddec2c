"""MSSA: MSViT's Multi-Scale Spiking Attention (Token_MS_Attention), and with
mssa_kernels (1, 0) QKFormer's token attention.

Q, P, K = LIF(BN(token conv x)), Q from a kernel-1 and P from a kernel-3 conv
over the token index (the multi-scale pair; 0 drops a branch);
K * attn_lif(sum_d Q + sum_d P): a token mask on K, no V, no matmul, no scale.
A family passes per-stage `mssa_kernels` and `mssa_p_sum` as block options.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spikeformer_jax import errors
from spikeformer_jax import layers
from spikeformer_jax import neurons
from spikeformer_jax import ops
from spikeformer_jax.attention import base


def multi_scale_spiking_attention(q, p, k, attn_neuron, *, p_sum: bool = True):
  """K * SN(sum_d Q + sum_d P), q, p, k: [..., heads, N, d] spikes (q or p may
  be None). Each head's channel sum is an integer in [0, d] and q + p lands
  exactly on the neuron threshold often; it is computed in at least float32
  so that stays exact under bfloat16. p_sum=False is the CIFAR-100 file's
  per-channel variant: attn = SN(sum_d Q + P) per channel.
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


class MSSA(base.Kind):
  name = 'mssa'
  picture = 'attn_lif: token mask on K'

  def build(self, attn, ctx):
    kernels = tuple(ctx.options.get('mssa_kernels', (1, 3)))
    if not any(kernels):
      raise errors.ConfigError(f'mssa_kernels={kernels}: at least one of Q, P must be built.')
    for name, kernel in zip('qp', kernels):
      if kernel:
        self._token_conv(attn, ctx, name, kernel)
        setattr(attn, f'{name}_bn', ctx.settings.bn(ctx.dim))
        setattr(attn, f'{name}_lif', ctx.settings.lif())
    attn.k_linear, attn.k_bn = ctx.linear(), ctx.settings.bn(ctx.dim)
    attn.k_lif = ctx.settings.lif()
    attn.attn_lif = ctx.settings.lif(v_threshold=ctx.attn_v_threshold)
    attn.mssa_p_sum = bool(ctx.options.get('mssa_p_sum', True))

  @staticmethod
  def _token_conv(attn, ctx, name, kernel):
    """A Conv1d over the flattened token index: kernel 1 is a token-wise
    Linear (`{name}_linear`), a wider kernel (MSViT's P, padding k // 2, rows
    wrap into each other as in the official code) an nnx.Conv (`{name}_conv`)."""
    if kernel == 1:
      setattr(attn, f'{name}_linear', ctx.linear())
    else:
      setattr(
        attn,
        f'{name}_conv',
        ctx.settings.conv(
          ctx.dim,
          ctx.dim,
          kernel=(kernel,),
          bias=ctx.qkv_bias,
          init='torch_default',
          rngs=ctx.rngs,
          spikes_in=True,
        ),
      )

  @staticmethod
  def _branch(attn, name, x):
    """LIF(BN(token conv x)) of branch `name`, or None if it was not built."""
    conv = getattr(attn, f'{name}_linear', None) or getattr(attn, f'{name}_conv', None)
    if conv is None:
      return None
    return layers.bn_fire(getattr(attn, f'{name}_bn'), getattr(attn, f'{name}_lif'), conv(x))

  def forward(self, attn, x: jax.Array) -> jax.Array:
    q, p, k = base.heads(attn, *(self._branch(attn, n, x) for n in 'qpk'))
    return ops.merge_heads(
      multi_scale_spiking_attention(
        q, p, k, functools.partial(attn.gate, attn.attn_lif), p_sum=attn.mssa_p_sum
      )
    )

  def products(self, attn, *, T, n, c, rate):
    return [
      (f'sum_d {b.upper()}', T * n * c, rate(f'{b}_lif'))
      for b in 'qp'
      if rate(f'{b}_lif') is not None
    ]

  def map_axes(self, rows, cols):
    return 'token', 'channel' if cols > 1 else '', False  # [N, 1], or [N, d] (p_sum off)


base.register(MSSA())
