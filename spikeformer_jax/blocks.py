"""What the families' blocks are made of: the attention sublayer (an attention
kind, see spikeformer_jax/attention, inside the block's style and output
projection), the spiking MLP, the SPS patch-stem stages, the token-mean head,
and the rematerialisation of a block's forward (model.remat)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from spikeformer_jax import attention
from spikeformer_jax import errors
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
  computation and its result are unchanged. `recorder`, when set (analysis.py
  sets it on its own copy of a model), is called with each call's input.
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    settings: layers.Settings,
    kind: str = 'ssa',
    style: str = 'spikformer',
    scale: float = 0.125,
    order: str = 'qk_first',
    qkv_bias: bool = False,
    attn_v_threshold: float = 0.5,
    init: str,
    proj: bool = True,
    erode_hw: tuple | None = None,
    dead_modules: bool = False,
    proj_lif_batch_as_time: bool = False,
    model: ml_collections.ConfigDict | None = None,
    options: dict | None = None,
    rngs: nnx.Rngs,
  ):
    impl = attention.get(kind)
    if style not in STYLES:
      raise ValueError(f'attention style {style!r}; valid: {STYLES}.')
    if style == 'sdt':
      self.shortcut_lif = settings.lif()
    self.kind, self.style, self.proj = kind, style, proj
    self.num_heads, self.scale, self.order = num_heads, scale, order
    self.erode_hw = erode_hw
    self.record_attention = False
    self.recorder: Any = None  # analysis.py's tap, called as recorder(x)
    impl.build(
      self,
      attention.Context(
        dim=dim,
        num_heads=num_heads,
        settings=settings,
        init=init,
        qkv_bias=qkv_bias,
        scale=scale,
        order=order,
        attn_v_threshold=attn_v_threshold,
        rngs=rngs,
        model=model,
        options=dict(options or {}),
      ),
    )
    if style == 'sdt' and dead_modules:
      # SDT's Conv1d(h, h, 1), built but never called; part of the backbone's
      # state dict whatever the attention, so SDT checkpoints load everywhere.
      self.talking_heads = nnx.Linear(
        num_heads, num_heads, use_bias=False, param_dtype=settings.param_dtype, rngs=rngs
      )
    if proj:
      self.proj_linear = settings.linear(dim, dim, bias=True, init=init, rngs=rngs, spikes_in=True)
      self.proj_bn = settings.bn(dim)
      if style == 'spikformer':
        self.proj_lif = settings.spiking(
          settings.neuron, batch_as_time=proj_lif_batch_as_time, groups=settings.bn_groups
        )

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.recorder is not None:
      self.recorder(x)
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
    if self.style == 'sdt':
      return self.proj_bn(self.proj_linear(y)) + identity
    return layers.bn_fire(self.proj_bn, self.proj_lif, self.proj_linear(y))


# Rematerialisation of each block's forward in the backward pass (model.remat).
REMAT_POLICIES = {
  '': None,  # save what autodiff saves
  'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
  'dots': jax.checkpoint_policies.dots_saveable,  # keep matmul / conv outputs
  'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def method_call(name: str, *static):
  """fn(module, x) = module.name(*static, x), the static arguments closed over
  (remat would trace a default argument)."""
  return lambda m, y: getattr(m, name)(*static, y)


def check_remat(remat: str, field: str = 'model.remat'):
  if remat not in REMAT_POLICIES:
    raise errors.ConfigError(f'{field}={remat!r}; valid: {", ".join(map(repr, REMAT_POLICIES))}.')


def apply_block(block, x: jax.Array | tuple[jax.Array, ...], remat: str = '', fn=None) -> jax.Array:
  """fn(block, x) (default block(x)), its activations recomputed in the
  backward pass under policy `remat` (REMAT_POLICIES; '' saves them as usual).
  Same values and gradients: only memory and time change."""
  check_remat(remat)
  fn = fn or (lambda m, y: m(y))
  if not remat:
    return fn(block, x)
  return nnx.remat(fn, policy=REMAT_POLICIES[remat])(block, x)


SPS_STAGES = ('', '1', '2', '3')  # official suffixes: proj_conv, proj_conv1, ...


def add_sps_stages(
  module: nnx.Module,
  in_channels: int,
  dim: int,
  pooling: str,
  *,
  settings: layers.Settings,
  init: str,
  rngs: nnx.Rngs,
):
  """The four conv-BN-LIF stages (widths D/8, D/4, D/2, D) that Spikformer's
  SPS and SDT's MS_SPS share, under their official names; checks `pooling`."""
  if len(pooling) != 4 or set(pooling) - {'0', '1'}:
    raise errors.ConfigError(f"pooling={pooling!r}: four '0'/'1' characters, one per stage.")
  if dim % 8:
    raise errors.ConfigError(f'embed_dim={dim} must be divisible by 8 (SPS widths D/8..D).')
  widths = (in_channels, dim // 8, dim // 4, dim // 2, dim)
  for i, sfx in enumerate(SPS_STAGES):
    setattr(
      module,
      f'proj_conv{sfx}',
      settings.conv(widths[i], widths[i + 1], init=init, rngs=rngs, spikes_in=i > 0),
    )
    setattr(module, f'proj_bn{sfx}', settings.bn(widths[i + 1]))
    setattr(module, f'proj_lif{sfx}', settings.lif())


def mean_token_head(
  head, x: jax.Array, batch: int, T: int, per_timestep: bool, logits_dtype
) -> jax.Array:
  """Spikformer's and MSViT's head: tokens [B*T, N, C] -> mean over tokens,
  then over T, then `head` (Linear). per_timestep (for the TET loss) returns
  head of every timestep's features, [B, T, classes]; the head is linear, so
  their mean over T equals the ordinary logits."""
  x = x.mean(axis=1).reshape(batch, T, -1)
  if per_timestep:
    return head(x).astype(logits_dtype)
  return head(x.mean(axis=1)).astype(logits_dtype)


class SpikingMLP(nnx.Module):
  """fc1_lif(fc1_bn(fc1_linear(x))) -> fc2_lif(fc2_bn(fc2_linear(.))), tokens [B*T, N, C].

  `names` are the official prefixes of the two layers (MSViT's CIFAR files
  call them mlp1, mlp2)."""

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    settings: layers.Settings,
    init: str,
    rngs: nnx.Rngs,
    names: tuple = ('fc1', 'fc2'),
  ):
    for name, (din, dout) in zip(names, ((dim, hidden), (hidden, dim))):
      setattr(
        self,
        f'{name}_linear',
        settings.linear(din, dout, bias=True, init=init, rngs=rngs, spikes_in=True),
      )
      setattr(self, f'{name}_bn', settings.bn(dout))
      setattr(self, f'{name}_lif', settings.lif())
    self.names = tuple(names)

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self.names:
      x = layers.bn_fire(
        getattr(self, f'{name}_bn'),
        getattr(self, f'{name}_lif'),
        getattr(self, f'{name}_linear')(x),
      )
    return x
