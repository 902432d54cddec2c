"""SSA: Spikformer's Spiking Self-Attention (Zhou et al., ICLR 2023, eq. 14).

Q, K, V = LIF(BN(W x)); attn_lif(Q K^T V * scale): no softmax, spike products.

Two options of the paper's DVS models that the released code lacks, read from
Spikformer's `config.model` (off by default, so the official models are
unchanged; other families' configs have neither field):
  * `qk_pool`: the 1-D max-pool after Q and K of the DVS128 Gesture model
    (`qk_max_pool`);
  * `attn_scale_learnable`: the scale s of eq. 15 as a learnable parameter
    `attn_scale` (one per SSA, initialised at the constant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import errors
from spikeformer_jax import neurons
from spikeformer_jax import ops
from spikeformer_jax.attention import base


def spiking_self_attention(q, k, v, *, scale: float, order: str):
  """SSA(Q, K, V) = Q K^T V * scale.

  q, k, v: [..., heads, N, d] spike tensors; no softmax. `order` picks the
  association, 'qk_first' ((Q K^T) V, an N x N map: Spikformer CIFAR and
  CIFAR10-DVS) or 'kv_first' (Q (K^T V), a d x d map: Spikformer ImageNet).
  With integer operands (SSA's binary spikes) both are exact (integer sums),
  so they differ in cost only; with a real operand (A2OS2A's ReLU K) they add
  the same reals in another order: equal up to float rounding, not bitwise.
  'auto' picks the cheaper one. Products run in at least float32 so integer
  counts stay exact under bfloat16 compute.
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
    raise errors.ConfigError(f"attention order {order!r}: use 'qk_first', 'kv_first' or 'auto'.")
  return x * jnp.asarray(scale).astype(x.dtype)  # a float, or the learnable scale


def qk_max_pool(x, kernel: int):
  """The 1-D max-pool after Q and K of the paper's DVS128 Gesture model.

  Appendix C.1: "For DVS128 Gesture, we place a 1D max-pooling layer after Q
  and K to increase the density of the data, which improves the accuracy from
  97.9% to 98.3% in 16 time steps." The paper names neither axis nor size:
  - size: kernel = stride = `kernel` (PyTorch `nn.MaxPool1d(k)`); the
    code built on the released one keeps an unused `qkv_mp = nn.MaxPool1d(4)`
    in its DVS attention (QKFormer dvs128-gesture/model.py, the same group's),
    hence 4 in the paper variant.
  - axis: the channels. Pooling the tokens of Q and K alone does not fit
    SSA: (Q K^T) V would multiply an N/k x N/k map by the N rows of V, Q (K^T
    V) pair N/k keys with N values; pooling the channels shortens only the
    inner dimension of Q K^T (d/k spikes per head).
  x: [..., C] spikes -> [..., C // kernel], the max of each group of `kernel`
  consecutive channels (an OR of spikes: denser). With kernel | d (= C /
  heads) a group never straddles two heads, so pooling before or after the
  head split is the same.
  """
  if kernel <= 1:
    return x
  *lead, c = x.shape
  return x.reshape(*lead, c // kernel, kernel).max(axis=-1)


def attention_scale(attn):
  """The scale s of eq. 15: the learnable `attn_scale` where built (section
  4.2: "We use a learnable parameter as the scaling factor to control the
  QK^T V result"), else the backbone's constant."""
  p = getattr(attn, 'attn_scale', None)
  return attn.scale if p is None else p[...]


def build_paper_options(attn, ctx):
  """`attn.qk_pool` and the learnable `attn.attn_scale`, from Spikformer's
  config.model (see the module docstring); nothing is built when they are off."""
  model = ctx.model if ctx.model is not None else {}
  pool = int(model.get('qk_pool', 0) or 0)
  if pool:
    attn.qk_pool = pool
  if model.get('attn_scale_learnable', False):
    # One scalar per SSA (per block), as the official code's per-module constant:
    # the paper says "a learnable parameter", no more.
    attn.attn_scale = nnx.Param(jnp.asarray(ctx.scale, ctx.settings.param_dtype))


class SSA(base.Kind):
  """The matmul kinds share this shape: Q, K, V through `activate`, then
  attn_lif(`equation`(Q, K, V)); recorded map: Q K^T * scale."""

  name = 'ssa'
  picture = 'Q K^T * scale'

  def build(self, attn, ctx):
    base.build_qkv(attn, ctx)
    attn.attn_lif = ctx.settings.lif(v_threshold=ctx.attn_v_threshold)
    build_paper_options(attn, ctx)

  def neurons(self, attn) -> tuple:
    """What Q, K and V pass through after their BatchNorms."""
    return attn.q_lif, attn.k_lif, attn.v_lif

  def activate(self, attn, q, k, v):
    return tuple(f(a) for f, a in zip(self.neurons(attn), (q, k, v)))

  def equation(self, attn, q, k, v):
    return spiking_self_attention(q, k, v, scale=attention_scale(attn), order=attn.order)

  def attention_map(self, attn, q, k):
    return base.qk_map(q, k) * attention_scale(attn)

  def forward(self, attn, x: jax.Array) -> jax.Array:
    if type(self).activate is SSA.activate:  # neurons right after the BatchNorms: fusable
      q, k, v = base.fire_qkv(attn, x, self.neurons(attn))
    else:
      q, k, v = self.activate(attn, *base.qkv(attn, x))
    k, v = base.erode_kv(attn, k, v)
    pool = getattr(attn, 'qk_pool', 0)  # after the Q and K neurons, on their spikes
    q, k = qk_max_pool(q, pool), qk_max_pool(k, pool)
    q, k, v = base.heads(attn, q, k, v)
    attn.record_map(lambda: self.attention_map(attn, q, k))
    return attn.attn_lif(ops.merge_heads(self.equation(attn, q, k, v)))

  def order(self, attn) -> str:
    return attn.order

  def products(self, attn, *, T, n, c, rate):
    return base.matmul_products(
      self.order(attn),
      T=T,
      n=n,
      c=c,
      h=attn.num_heads,
      fq=rate('q_lif'),
      fk=rate('k_lif'),
      fv=rate('v_lif'),
      qk_pool=getattr(attn, 'qk_pool', 0),
    )


base.register(SSA())
