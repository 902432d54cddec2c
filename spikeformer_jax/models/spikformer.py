"""Spikformer (Zhou et al., ICLR 2023), faithful to ZK-Zhou/spikformer.

Three official flavours differ only in data, listed in `FLAVOURS`:
  * cifar    (cifar10/model.py):   Linear q/k/v with bias, (Q K^T) V order,
                                   max-pool after SPS stages 3 and 4;
  * imagenet (imagenet/model.py):  kernel-1 convs, Q (K^T V) order, a max-pool
                                   after each of the four SPS stages;
  * dvs      (cifar10dvs/model.py): 2 input channels, scale 0.25, four pools,
                                   plus an unused pos_embed and final LayerNorm.
Everything else (SPS, SSA, MLP, the spike-add residual stream, the head) is
shared. Dead modules of the official code (LayerNorms never called, the DVS
pos_embed) are built only with `dead_modules=True`, so both of the official
parameter totals can be reproduced. The paper's DVS options the released code
lacks, a 1-D max-pool after Q and K (`qk_pool`) and a learnable attention scale
(`attn_scale_learnable`), are off by default (attention/ssa.py).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import blocks
from spikeformer_jax import errors
from spikeformer_jax import layers
from spikeformer_jax import ops
from spikeformer_jax.layers import Settings
from spikeformer_jax.ops import max_pool
from spikeformer_jax.models import common

FLAVOURS: dict[str, dict[str, Any]] = {
  'cifar': dict(
    pooling='0011',
    qkv_bias=True,
    dense_init='trunc_normal',
    attn_order='qk_first',
    attn_scale=0.125,
    in_channels=3,
  ),
  'imagenet': dict(
    pooling='1111',
    qkv_bias=False,
    dense_init='torch_default',
    attn_order='kv_first',
    attn_scale=0.125,
    in_channels=3,
  ),
  'dvs': dict(
    pooling='1111',
    qkv_bias=False,
    dense_init='torch_default',
    attn_order='qk_first',
    attn_scale=0.25,
    in_channels=2,
  ),
}


class SPS(nnx.Module):
  """Spiking Patch Splitting: four conv-BN-LIF stages (widths D/8, D/4, D/2, D),
  each optionally followed by MaxPool(3, 2, 1) on its spikes (`pooling`, one
  '0'/'1' per stage), then a relative position embedding conv-BN-LIF whose
  spikes are added to the feature spikes (values in {0, 1, 2})."""

  def __init__(
    self, in_channels: int, dim: int, pooling: str, *, settings: Settings, rngs: nnx.Rngs
  ):
    blocks.add_sps_stages(
      self, in_channels, dim, pooling, settings=settings, init='torch_default', rngs=rngs
    )
    self.rpe_conv, self.rpe_bn, self.rpe_lif = (
      settings.conv(dim, dim, rngs=rngs, spikes_in=True),
      settings.bn(dim),
      settings.lif(),
    )
    self.pooling = pooling

  def stage(self, i: int, x: jax.Array) -> jax.Array:
    """Stage i: conv-BN-LIF (and its pooling); i == 4 is the RPE (+ x)."""
    if i == len(blocks.SPS_STAGES):
      return x + layers.bn_fire(self.rpe_bn, self.rpe_lif, self.rpe_conv(x))
    sfx = blocks.SPS_STAGES[i]
    conv, bn, lif = (getattr(self, f'{n}{sfx}') for n in ('proj_conv', 'proj_bn', 'proj_lif'))
    x = layers.bn_fire(bn, lif, conv(x))
    return max_pool(x) if self.pooling[i] == '1' else x

  def __call__(self, x: jax.Array, remat: str = '') -> jax.Array:
    # [B*T, H, W, C_in] -> [B*T, N, D]; remat: a policy per stage (model.remat_stem)
    for i in range(len(blocks.SPS_STAGES) + 1):
      x = blocks.apply_block(self, x, remat, fn=blocks.method_call('stage', i))
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Block(nnx.Module):
  """x = x + SSA(x); x = x + MLP(x): a spike-add (integer-valued) residual."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    settings: Settings,
    flavour: dict,
    cfg: ml_collections.ConfigDict,
    rngs: nnx.Rngs,
  ):
    dead_modules = cfg.dead_modules
    if dead_modules:  # built, never called (official Block.norm1 / norm2)
      self.norm1 = nnx.LayerNorm(dim, param_dtype=settings.param_dtype, rngs=rngs)
      self.norm2 = nnx.LayerNorm(dim, param_dtype=settings.param_dtype, rngs=rngs)
    self.attn = blocks.SpikingAttention(
      dim,
      num_heads,
      settings=settings,
      kind=cfg.get('attention', 'ssa'),
      style='spikformer',
      scale=flavour['attn_scale'],
      order=flavour['attn_order'],
      qkv_bias=flavour['qkv_bias'],
      attn_v_threshold=cfg.attn_v_threshold,
      init=flavour['dense_init'],
      dead_modules=dead_modules,
      model=cfg,
      rngs=rngs,
    )
    self.mlp = blocks.SpikingMLP(
      dim, int(dim * mlp_ratio), settings=settings, init=flavour['dense_init'], rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(x)
    return x + self.mlp(x)


class Spikformer(nnx.Module):
  """Spikformer. Input: images [B, H, W, C] (repeated over T, direct encoding)
  or event frames [B, T, H, W, C]. Output: logits [B, num_classes]."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, settings: Settings, rngs: nnx.Rngs):
    check_config(cfg)
    flavour = dict(FLAVOURS[cfg.flavour])
    for key in ('pooling', 'attn_order', 'attn_scale'):  # '' / 0: the flavour's value
      if cfg.get(key):
        flavour[key] = cfg[key]
    dim = cfg.embed_dim
    layers.check_spike_sums(settings, cfg.depth)
    self.patch_embed = SPS(cfg.in_channels, dim, flavour['pooling'], settings=settings, rngs=rngs)
    self.block = nnx.List(
      [
        Block(
          dim, cfg.num_heads, cfg.mlp_ratio, settings=settings, flavour=flavour, cfg=cfg, rngs=rngs
        )
        for _ in range(cfg.depth)
      ]
    )
    if cfg.dead_modules and cfg.flavour == 'dvs':  # official, never used
      n_tokens = (cfg.img_size // 16) ** 2
      self.pos_embed = nnx.Param(
        ops.trunc_normal_init(rngs.params(), (1, n_tokens, dim), settings.param_dtype)
      )
      self.norm = nnx.LayerNorm(dim, param_dtype=settings.param_dtype, rngs=rngs)
    self.head = nnx.Linear(
      dim,
      cfg.num_classes,
      kernel_init=ops.trunc_normal_init,
      dtype=settings.dtype,
      param_dtype=settings.param_dtype,
      rngs=rngs,
    )
    self.T = settings.T
    self.dtype = settings.dtype
    self.logits_dtype = jnp.promote_types(settings.param_dtype, jnp.float32)
    self.per_timestep_logits = False  # True for the TET loss
    self.remat = cfg.get('remat', '')
    self.remat_stem = cfg.get('remat_stem', '')

  def __call__(self, x: jax.Array) -> jax.Array:
    T, b = self.T, x.shape[0]
    x = self.patch_embed(ops.fold_time(x, T, self.dtype), self.remat_stem)
    for blk in self.block:
      x = blocks.apply_block(blk, x, self.remat)
    return blocks.mean_token_head(self.head, x, b, T, self.per_timestep_logits, self.logits_dtype)


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def model_config(flavour: str = 'cifar', *, embed_dim: int = 384, depth: int = 4,
                 num_heads: int = 12, T: int = 4, num_classes: int = 10,
                 img_size: int = 32, mlp_ratio: float = 4.0) -> ml_collections.ConfigDict:
  """The `config.model` of a Spikformer, with the official flavour's defaults."""
  if flavour not in FLAVOURS:
    raise errors.ConfigError(f'flavour={flavour!r}; valid: {sorted(FLAVOURS)}.')
  return ml_collections.ConfigDict(dict(
      name='spikformer',   # the family (models.names())
      flavour=flavour,     # the official code's flavour: cifar, imagenet or dvs
      embed_dim=embed_dim,  # D, the width of every block
      depth=depth,         # blocks
      num_heads=num_heads,  # attention heads (must divide embed_dim)
      mlp_ratio=float(mlp_ratio),  # MLP hidden width / D
      T=T,                 # timesteps
      in_channels=FLAVOURS[flavour]['in_channels'],  # 3 (images) or 2 (event polarities)
      num_classes=num_classes,  # outputs of the head (= data.num_classes)
      img_size=img_size,   # input height and width
      pooling='',          # which of the 4 SPS stages max-pool ('1010'); '': the flavour's
      attn_order='',       # qk_first ((Q K^T) V), kv_first (Q (K^T V)), auto; '': the flavour's
      attn_scale=0.0,      # s in SSA's Q K^T V s; 0: the flavour's (0.25 DVS, 0.125 otherwise)
      attention='ssa',     # ssa (official), or any registered kind on this backbone
      attn_v_threshold=0.5,  # threshold of the neuron after the attention (official 0.5)
      # The paper's DVS128 Gesture "1D max-pooling layer after Q and K" (appendix
      # C.1), which the released code lacks: > 0, kernel = stride = k over the
      # channels of the Q and K spikes, before Q K^T; k divides the head width;
      # attention 'ssa' only (attention/ssa.py).
      qk_pool=0,
      # True: eq. 15's scale s a learnable scalar per block (section 4.2),
      # initialised at the scale, no weight decay; attention 'ssa' only.
      attn_scale_learnable=False,
      # True: also build the official code's unused modules (LayerNorms, the DVS
      # pos_embed) so that official checkpoints load; they get no gradient.
      dead_modules=False,
      **common.shared_fields(),  # dtype, remat, neuron, the attention kinds' own fields
  ))
# fmt: on


def check_config(m: ml_collections.ConfigDict):
  """One clear error per malformed Spikformer `config.model`."""
  common.check_heads(m)
  if m.get('flavour') not in FLAVOURS:
    raise errors.ConfigError(f'model.flavour={m.get("flavour")!r}; valid: {sorted(FLAVOURS)}.')
  common.check_pooling(m.get('pooling') or '')
  check_paper_options(m)


def check_paper_options(m: ml_collections.ConfigDict):
  """model.qk_pool and model.attn_scale_learnable: options of the 'ssa' kind
  (the kinds of Table 1 follow the official code's constant scale)."""
  pool, learnable = m.get('qk_pool', 0), m.get('attn_scale_learnable', False)
  kind = m.get('attention', 'ssa')
  d = m.embed_dim // m.num_heads
  kernels = [k for k in range(1, d + 1) if d % k == 0]
  if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0 or (pool and d % pool):
    raise errors.ConfigError(
      f'model.qk_pool={pool!r}: 0 (off) or a kernel dividing the head width '
      f'embed_dim / num_heads = {d}: one of {kernels}.'
    )
  if not isinstance(learnable, bool):
    raise errors.ConfigError(f'model.attn_scale_learnable={learnable!r}; valid: True, False.')
  for field, on in (('qk_pool', pool), ('attn_scale_learnable', learnable)):
    if on and kind != 'ssa':
      raise errors.ConfigError(
        f"model.{field}={on!r} is an option of the 'ssa' attention, not of "
        f"model.attention={kind!r}; valid: model.attention='ssa', or "
        f'model.{field}={0 if field == "qk_pool" else False}.'
      )


def downsampling(m: ml_collections.ConfigDict) -> int:
  """Every pooled SPS stage halves the image."""
  return 2 ** (m.get('pooling') or FLAVOURS[m.flavour]['pooling']).count('1')


def describe(m: ml_collections.ConfigDict) -> str:
  return f'spikformer {m.flavour} {m.depth}-{m.embed_dim}'


# Official source file of a fidelity recording -> flavour.
_FIXTURE_FILES = {
  'cifar10/model.py': 'cifar',
  'imagenet/model.py': 'imagenet',
  'cifar10dvs/model.py': 'dvs',
}


def from_fixture(rec: dict) -> ml_collections.ConfigDict:
  """Our `config.model` for the architecture a fidelity recording is of."""
  flavour = _FIXTURE_FILES.get(rec['file'])
  if flavour is None:
    raise errors.DataError(
      f"unknown Spikformer source file {rec['file']!r}; expected one of {sorted(_FIXTURE_FILES)}."
    )
  kw = rec['constructor_args_full']
  mc = model_config(
    flavour,
    embed_dim=kw['embed_dims'],
    depth=kw['depths'],
    num_heads=kw['num_heads'],
    T=rec['T'],
    num_classes=kw['num_classes'],
    img_size=kw['img_size_h'],
    mlp_ratio=kw['mlp_ratios'],
  )
  mc.in_channels = kw['in_channels']
  mc.dead_modules = True
  mc.dtype = 'float64'
  return mc


FAMILY = common.Family(
  name='spikformer',
  model=Spikformer,
  model_config=model_config,
  check=check_config,
  downsampling=downsampling,
  describe=describe,
  runlocal=common.flat_runlocal,
  from_fixture=from_fixture,
  added={'qk_pool': (0, int), 'attn_scale_learnable': (False, bool)},
)
