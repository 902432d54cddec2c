"""What an attention kind is, and the registry that is the only list of them.

A kind is the part of a block's attention that papers change: how Q, K, V
(or their stand-ins) are made from the tokens, the equation that combines
them, what that costs, and what its attention picture shows. The block's
style around it (Spikformer's output neuron, SDT's membrane shortcut) and the
output projection belong to `blocks.SpikingAttention`, which builds the
kind's submodules on itself under the official names (`q_linear`, `attn_lif`,
...), so parameter paths and checkpoints do not depend on where a kind lives.

A new kind is one file:

    from spikeformer_jax import attention

    class MyKind(attention.Kind):
      name = 'mine'
      picture = 'Q K^T'                       # what record_map sows, for plots
      def build(self, attn, ctx):             # submodules, on attn
        attention.build_qkv(attn, ctx)        # q/k/v _linear, _bn, _lif
        attn.attn_lif = ctx.settings.lif(v_threshold=ctx.attn_v_threshold)
      def forward(self, attn, x):             # [B*T, N, C] -> [B*T, N, C]
        ...
      def products(self, attn, *, T, n, c, rate):  # for eval.py --analyze
        ...

    attention.register(MyKind())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from spikeformer_jax import kernels
from spikeformer_jax import layers
from spikeformer_jax import ops
from spikeformer_jax import registry


@dataclasses.dataclass(frozen=True)
class Context:
  """What a kind may read while it builds its submodules (one block)."""

  dim: int
  num_heads: int
  settings: layers.Settings
  init: str  # dense init: 'trunc_normal' or 'torch_default'
  qkv_bias: bool
  scale: float  # the backbone's attention scale
  order: str  # 'qk_first' | 'kv_first' | 'auto'
  attn_v_threshold: float  # threshold of the neuron after the attention
  rngs: nnx.Rngs
  model: ml_collections.ConfigDict | None = None  # config.model (kinds' own fields)
  options: dict = dataclasses.field(default_factory=dict)  # per-block extras of a family

  @property
  def s(self) -> layers.Settings:
    """The old name of `settings`, for plug-ins written before it."""
    return self.settings

  def linear(self) -> nnx.Linear:
    """The token-wise dim -> dim map of Q, K and V (spike inputs)."""
    return self.settings.linear(
      self.dim, self.dim, bias=self.qkv_bias, init=self.init, rngs=self.rngs, spikes_in=True
    )


class Kind:
  """One attention kind; stateless (the parameters live on the module)."""

  name: str = ''
  picture: str = 'attention map'  # what record_map sows (the attention picture's title)
  config: dict[str, Callable[[], ml_collections.ConfigDict]] = {}  # its config.model fields
  # Its config.model fields (or subfields, dotted) added after runs were saved
  # without them: field -> (the value those runs behave as, what of a value
  # matters). A resumed run compares through it (config_lib.model_defining).
  added: dict[str, tuple[Any, Callable[[Any], Any]]] = {}

  def build(self, attn: nnx.Module, ctx: Context):
    raise NotImplementedError

  def forward(self, attn: nnx.Module, x: jax.Array) -> jax.Array:
    """Tokens [B*T, N, C] (spikes) -> [B*T, N, C], before the block's projection."""
    raise NotImplementedError

  def products(
    self, attn: nnx.Module, *, T: int, n: int, c: int, rate: Callable[[str], float | None]
  ) -> list[tuple]:
    """The activation products per example: (label, MACs, operand rates...);
    `rate(neuron_name)` is a neuron's firing rate, None marks a real operand."""
    raise NotImplementedError

  def map_axes(self, rows: int, cols: int) -> tuple[str, str, bool]:
    """(y label, x label, square) of one recorded map [rows, cols]."""
    del rows, cols
    return 'query token', 'key token', True

  def check(self, model: ml_collections.ConfigDict):
    """Config errors of this kind, one line each (before anything is built).
    `model` holds the kind's own fields (`with_own_fields`): read them directly."""

  def own_config(self, ctx: Context, name: str) -> ml_collections.ConfigDict:
    """Its field `name` of config.model, or the default where the config was
    made before the kind was registered (a plug-in named on the command line)."""
    if ctx.model is not None and name in ctx.model:
      return ctx.model[name]
    return self.config[name]()

  def with_own_fields(self, model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model`, or a copy of it given the defaults of the kind's own fields it
    lacks (a config made before the kind was registered); `model` is unchanged."""
    missing = [name for name in self.config if name not in model]
    if not missing:
      return model
    model = ml_collections.ConfigDict(model.to_dict())
    for name in missing:
      model[name] = self.config[name]()
    return model


_KINDS = registry.Registry[Kind](
  'attention kind', lambda name, names: f'attention kind {name!r}; valid kinds: {", ".join(names)}.'
)


def register(kind: Kind, *, replace: bool = False) -> Kind:
  """Makes `kind` available as `config.model.attention=kind.name`."""
  return _KINDS.register(kind.name, kind, replace=replace)


unregister, names, get = _KINDS.unregister, _KINDS.names, _KINDS.get  # names: in registration order


def added_fields() -> dict[str, tuple[Any, Callable[[Any], Any]]]:
  """Every kind's `added` fields, as 'model.<field>'."""
  return {f'model.{k}': v for kind in _KINDS.values() for k, v in kind.added.items()}


def config_fields() -> dict[str, ml_collections.ConfigDict]:
  """Every kind's own `config.model` fields (e.g. A2OS2A's `ternary`), with
  their defaults: each family's model config carries them, so any kind runs
  on any backbone by config."""
  return {k: make() for kind in _KINDS.values() for k, make in kind.config.items()}


# ---------------------------------------------------------------- helpers
# `attn` is any kind's module (Any): its q/k/v layers are attributes set here
# (setattr by name), which a static type cannot list.


def build_qkv(
  attn: Any, ctx: Context, *, q_lif: bool = True, k_lif: bool = True, v_lif: Any = True
):
  """q/k/v_linear and q/k/v_bn, and the neurons asked for: v_lif may be a
  `layers.SpikingNeuron` of the kind's own (A2OS2A's ternary one)."""
  attn.q_linear, attn.q_bn = ctx.linear(), ctx.settings.bn(ctx.dim)
  if q_lif:
    attn.q_lif = ctx.settings.lif()
  attn.k_linear, attn.k_bn = ctx.linear(), ctx.settings.bn(ctx.dim)
  if k_lif:
    attn.k_lif = ctx.settings.lif()
  attn.v_linear, attn.v_bn = ctx.linear(), ctx.settings.bn(ctx.dim)
  if v_lif is True:
    attn.v_lif = ctx.settings.lif()
  elif v_lif:
    attn.v_lif = v_lif


def qkv(attn: Any, x: jax.Array):
  """BN(W x) of Q, K and V, before their neurons."""
  return (attn.q_bn(attn.q_linear(x)), attn.k_bn(attn.k_linear(x)), attn.v_bn(attn.v_linear(x)))


def fire_qkv(attn: Any, x: jax.Array, fns: tuple):
  """fn(BN(W x)) of Q, K and V for fns (one each); a SpikingNeuron there runs
  through layers.bn_fire (one fused kernel with model.kernels on)."""
  if not any(
    isinstance(fn, layers.SpikingNeuron) and kernels.resolve(fn.kernels) == 'pallas' for fn in fns
  ):
    return tuple(fn(a) for fn, a in zip(fns, qkv(attn, x)))  # the pure-JAX program, as before
  out = []
  for name, fn in zip('qkv', fns):
    y = getattr(attn, f'{name}_linear')(x)
    bn = getattr(attn, f'{name}_bn')
    out.append(layers.bn_fire(bn, fn, y) if isinstance(fn, layers.SpikingNeuron) else fn(bn(y)))
  return tuple(out)


def erode(x: jax.Array, spatial: tuple | None) -> jax.Array:
  """SDT's DVS `Erode`: MaxPool3d((1,3,3), 1, (0,1,1)) on the last two axes of
  the official 5-D tensor. spatial=(H, W): pool tokens [BT, N, C] over the
  image grid; None: pool [BT, h, N, d] over (token index, head channel), as the
  official code does for k*v and q*kv."""
  if spatial is not None:
    bt, n, c = x.shape
    y = ops.max_pool(x.reshape(bt, spatial[0], spatial[1], c), 3, 1, 1)
    return y.reshape(bt, n, c)
  return ops.max_pool(x.reshape((-1,) + x.shape[-2:] + (1,)), 3, 1, 1).reshape(x.shape)


def erode_kv(attn: Any, k: jax.Array, v: jax.Array):
  """K and V eroded on SDT's DVS backbone (`erode_hw` set), else unchanged."""
  if attn.erode_hw is None:
    return k, v
  return erode(k, attn.erode_hw), erode(v, attn.erode_hw)


def heads(attn: Any, *xs):
  return tuple(None if x is None else ops.split_heads(x, attn.num_heads) for x in xs)


def matmul_products(
  order: str, *, T: int, n: int, c: int, h: int, fq, fk, fv, qk_pool: int = 0
) -> list[tuple]:
  """The two matrix products of Q K^T V in `order`; the N x N (or d x d) map
  in between holds counts or reals, not spikes. `qk_pool` > 1: Q and K pooled
  to d / qk_pool channels (Spikformer's `model.qk_pool`), the shorter inner
  dimension of their product; the rates stay the Q / K neurons' own, before
  the pool (a lower bound of the pooled operands')."""
  d = c // h
  dq = d // max(qk_pool, 1)
  if order == 'auto':  # as spiking_self_attention decides, on the (pooled) Q
    order = 'kv_first' if n > dq else 'qk_first'
  if order == 'qk_first':
    return [('Q K^T', T * h * n * n * dq, fq, fk), ('(Q K^T) V', T * h * n * n * d, None, fv)]
  return [('K^T V', T * h * n * dq * d, fk, fv), ('Q (K^T V)', T * h * n * dq * d, fq, None)]


def qk_map(q: jax.Array, k: jax.Array) -> jax.Array:
  """Q K^T per head in at least float32 (exact counts), for recording."""
  from spikeformer_jax import neurons  # pylint: disable=import-outside-toplevel

  dt = neurons.membrane_dtype(q.dtype)
  return q.astype(dt) @ jnp.swapaxes(k.astype(dt), -1, -2)
