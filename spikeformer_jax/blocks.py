"""The attention sublayer of a transformer block: an attention kind (see
spikeformer_jax/attention) inside the block's style and output projection."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from spikeformer_jax import attention
from spikeformer_jax import layers

STYLES = ('spikformer', 'sdt')


class SpikingAttention(nnx.Module):
  """Self-attention of a spiking transformer block on tokens [B*T, N, C].

  `kind` (a name of attention.names()) makes Q, K, V and combines them; its
  submodules are built on this module under the official names (`q_linear`,
  `attn_lif`, `talking_heads_lif`, ...). `style` is what the backbone wraps
  around it:
    * spikformer: input spikes (or spike sums); output proj_lif(proj_bn(proj(y)));
    * sdt:        input membrane u; y from shortcut_lif(u); output
                  proj_bn(proj(y)) + u (the membrane shortcut).
  `model` is config.model (kinds read their own fields there, e.g. A2OS2A's
  `ternary`); `options` carries a family's per-block extras for a kind (MSViT's
  `mssa_kernels`, `mssa_p_sum`). `proj_lif_batch_as_time` reproduces MSViT's /
  QKFormer's SSA, whose proj_lif runs over batch and time as one sequence.

  With `record_attention` set (`model.set_attributes(record_attention=True)`,
  then `nnx.capture(model, nnx.Intermediate)`) each call sows
  `attention_map`, per head, [B*T, heads, ...]: what the kind's `picture`
  says (Q K^T * scale for SSA, the talking_heads_lif channel mask [1, d] for
  SDSA, the token mask [N, 1] for MSSA, ...). Recording adds outputs only; the
  computation and its result are unchanged.
  """

  def __init__(self, dim: int, num_heads: int, *, s: layers.Settings, kind: str = 'ssa',
               style: str = 'spikformer', scale: float = 0.125, order: str = 'qk_first',
               qkv_bias: bool = False, attn_v_threshold: float = 0.5, init: str,
               proj: bool = True, erode_hw: tuple | None = None, dead_modules: bool = False,
               proj_lif_batch_as_time: bool = False,
               model: ml_collections.ConfigDict | None = None, options: dict | None = None,
               rngs: nnx.Rngs):
    impl = attention.get(kind)
    if style not in STYLES:
      raise ValueError(f'attention style {style!r}; valid: {STYLES}.')
    if dim % num_heads:
      raise ValueError(f'embed dim {dim} is not divisible by num_heads {num_heads}.')
    if style == 'sdt':
      self.shortcut_lif = s.lif()
    self.kind, self.style, self.proj = kind, style, proj
    self.num_heads, self.scale, self.order = num_heads, scale, order
    self.erode_hw = erode_hw
    self.record_attention = False
    impl.build(self, attention.Context(
        dim=dim, num_heads=num_heads, s=s, init=init, qkv_bias=qkv_bias, scale=scale,
        order=order, attn_v_threshold=attn_v_threshold, rngs=rngs, model=model,
        options=dict(options or {})))
    if style == 'sdt' and dead_modules:
      # SDT's Conv1d(h, h, 1), built but never called; part of the backbone's
      # state dict whatever the attention, so SDT checkpoints load everywhere.
      self.talking_heads = nnx.Linear(num_heads, num_heads, use_bias=False,
                                      param_dtype=s.param_dtype, rngs=rngs)
    if proj:
      self.proj_linear = s.linear(dim, dim, bias=True, init=init, rngs=rngs, spikes_in=True)
      self.proj_bn = s.bn(dim)
      if style == 'spikformer':
        self.proj_lif = layers.SpikingNeuron(s.neuron, s.T,
                                             batch_as_time=proj_lif_batch_as_time,
                                             groups=s.bn_groups)

  def __call__(self, x: jax.Array) -> jax.Array:
    identity = x
    if self.style == 'sdt':
      x = self.shortcut_lif(x)
    y = attention.get(self.kind).forward(self, x)
    return self._project(y.astype(x.dtype), identity)

  def record_map(self, make):
    """Sows `make()` as this call's attention map when recording (make is
    only called then: recording adds outputs, never work)."""
    if self.record_attention:
      self.sow(nnx.Intermediate, 'attention_map', make())

  def gate(self, neuron: layers.SpikingNeuron, a: jax.Array) -> jax.Array:
    """`neuron` on a gate [BT, heads, n, m] (it is elementwise): sdsa's
    talking_heads_lif, mssa's attn_lif; recorded as the attention map."""
    s = neuron(a.reshape(a.shape[0], -1)).reshape(a.shape)
    self.record_map(lambda: s)
    return s

  def _project(self, y: jax.Array, identity: jax.Array) -> jax.Array:
    if not self.proj:
      return y + identity if self.style == 'sdt' else y
    y = self.proj_bn(self.proj_linear(y))
    if self.style == 'sdt':
      return y + identity
    return self.proj_lif(y)
