"""Spike-driven Transformer (SDT), faithful to BICLab/Spike-Driven-Transformer;
with `attention='a2os2a'` the A2OS2A Spiking Transformer (Guo et al., CVPR 2025).

Differences from Spikformer that decide the function:
  * MS_SPS: stages 0-2 max-pool their spikes, stage 3 pools the BatchNorm
    output; the SPS returns real values (membrane), x = rpe_bn(rpe_conv(
    LIF(x_feat))) + x_feat, with no neuron after the RPE.
  * membrane shortcuts: every block adds to a real-valued stream u; each
    module starts with a LIF on u (`shortcut_lif`, `fc1_lif`, `fc2_lif`).
  * SDSA: Q * talking_heads_lif(sum over tokens of K * V), no scale.
  * head: mean over tokens of u, `head_lif` over T, Linear per timestep,
    mean over T (kept per timestep for the TET loss). `model.head_order=
    'fire_then_pool'` puts the neuron before the pool instead, as A2OS2A's
    eq. 18 writes it: Y = CH(GAP(SN(U_L))), the mean of the spikes.
  * init: every Conv2d trunc_normal(.02) with zero bias; the head Linear keeps
    PyTorch's default. The unused `talking_heads` Conv1d (h*h parameters per
    block) is built with `dead_modules=True`.
"""

from __future__ import annotations

import ml_collections
import jax
import jax.numpy as jnp
from flax import nnx

from spikeformer_jax import blocks
from spikeformer_jax import errors
from spikeformer_jax import layers
from spikeformer_jax import ops
from spikeformer_jax.layers import Settings, SpikingNeuron
from spikeformer_jax.norm import BatchNorm
from spikeformer_jax.ops import max_pool
from spikeformer_jax.models import common

# Pooling per dataset in the official configs (spec 2.1).
POOLING = {'cifar': '0011', 'imagenet': '1111', 'gesture': '0111', 'cifar10dvs': '0011'}
# Where the head's neuron sits: after the mean over tokens (the official code)
# or before it (A2OS2A eq. 18). Neither adds parameters.
HEAD_ORDERS = ('pool_then_fire', 'fire_then_pool')


class MS_SPS(nnx.Module):  # pylint: disable=invalid-name
  """SDT's spiking patch splitting; output: membrane tokens [B*T, N, D]."""

  # The last stage, which `stage` calls by name (blocks.add_sps_stages sets all four).
  proj_conv3: nnx.Conv
  proj_bn3: BatchNorm
  proj_lif3: SpikingNeuron

  def __init__(
    self, in_channels: int, dim: int, pooling: str, *, settings: Settings, rngs: nnx.Rngs
  ):
    blocks.add_sps_stages(
      self, in_channels, dim, pooling, settings=settings, init='trunc_normal', rngs=rngs
    )
    self.rpe_conv = settings.conv(dim, dim, init='trunc_normal', rngs=rngs, spikes_in=True)
    self.rpe_bn = settings.bn(dim)
    self.pooling = pooling

  def stage(self, i: int, x: jax.Array) -> jax.Array:
    """Stage i of four; the last one ends in the RPE on the membrane."""
    if i < 3:
      sfx = blocks.SPS_STAGES[i]
      x = layers.bn_fire(
        getattr(self, f'proj_bn{sfx}'),
        getattr(self, f'proj_lif{sfx}'),
        getattr(self, f'proj_conv{sfx}')(x),
      )
      return max_pool(x) if self.pooling[i] == '1' else x
    x = self.proj_bn3(self.proj_conv3(x))
    if self.pooling[3] == '1':
      x = max_pool(x)  # on the BatchNorm output, before the neuron
    return self.rpe_bn(self.rpe_conv(self.proj_lif3(x))) + x

  def __call__(self, x: jax.Array, remat: str = '') -> jax.Array:
    # remat: a policy per stage (model.remat_stem)
    for i in range(4):
      x = blocks.apply_block(self, x, remat, fn=blocks.method_call('stage', i))
    return x.reshape(x.shape[0], -1, x.shape[-1])


class MS_MLP(nnx.Module):  # pylint: disable=invalid-name
  """u -> fc2_bn(fc2(fc2_lif(fc1_bn(fc1(fc1_lif(u)))))) + u (membrane shortcut)."""

  def __init__(self, dim: int, hidden: int, *, settings: Settings, rngs: nnx.Rngs):
    self.fc1_lif = settings.lif()
    self.fc1_linear = settings.linear(
      dim, hidden, bias=True, init='trunc_normal', rngs=rngs, spikes_in=True
    )
    self.fc1_bn = settings.bn(hidden)
    self.fc2_lif = settings.lif()
    self.fc2_linear = settings.linear(
      hidden, dim, bias=True, init='trunc_normal', rngs=rngs, spikes_in=True
    )
    self.fc2_bn = settings.bn(dim)
    self.res = dim == hidden  # the official inner shortcut (never with ratio 4)

  def __call__(self, u: jax.Array) -> jax.Array:
    identity = u
    x = self.fc1_bn(self.fc1_linear(self.fc1_lif(u)))
    if self.res:
      x = identity = identity + x
    return self.fc2_bn(self.fc2_linear(self.fc2_lif(x))) + identity


class Block(nnx.Module):
  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    settings: Settings,
    cfg: ml_collections.ConfigDict,
    erode_hw,
    rngs: nnx.Rngs,
  ):
    self.attn = blocks.SpikingAttention(
      dim,
      num_heads,
      settings=settings,
      kind=cfg.attention,
      style='sdt',
      scale=0.125,
      order=cfg.attn_order or 'auto',
      qkv_bias=False,
      attn_v_threshold=cfg.attn_v_threshold,
      init='trunc_normal',
      proj=cfg.attn_proj,
      erode_hw=erode_hw,
      dead_modules=cfg.dead_modules,
      model=cfg,
      rngs=rngs,
    )
    self.mlp = MS_MLP(dim, int(dim * mlp_ratio), settings=settings, rngs=rngs)

  def __call__(self, u: jax.Array) -> jax.Array:
    return self.mlp(self.attn(u))


class SDT(nnx.Module):
  """Input: images [B, H, W, C] (repeated over T) or frames [B, T, H, W, C].
  Output: logits [B, classes], or [B, T, classes] with `per_timestep_logits`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, settings: Settings, rngs: nnx.Rngs):
    check_config(cfg)
    dim = cfg.embed_dim
    self.patch_embed = MS_SPS(cfg.in_channels, dim, cfg.pooling, settings=settings, rngs=rngs)
    grid = cfg.img_size // 2 ** cfg.pooling.count('1')
    erode_hw = (grid, grid) if cfg.dvs_mode else None
    self.block = nnx.List(
      [
        Block(
          dim,
          cfg.num_heads,
          cfg.mlp_ratio,
          settings=settings,
          cfg=cfg,
          erode_hw=erode_hw,
          rngs=rngs,
        )
        for _ in range(cfg.depth)
      ]
    )
    self.head_lif = settings.lif()
    self.head = nnx.Linear(
      dim,
      cfg.num_classes,
      kernel_init=ops.torch_default_kernel_init,
      bias_init=ops.torch_default_bias_init(dim),
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
    self.head_order = cfg.get('head_order', 'pool_then_fire')  # .get: older configs

  def __call__(self, x: jax.Array) -> jax.Array:
    T, b = self.T, x.shape[0]
    u = self.patch_embed(ops.fold_time(x, T, self.dtype), self.remat_stem)
    for blk in self.block:
      u = blocks.apply_block(blk, u, self.remat)
    if self.head_order == 'fire_then_pool':  # A2OS2A eq. 18: CH(GAP(SN(U_L)))
      feat = self.head_lif(u).mean(axis=1)
    else:  # the official SDT head: the neuron on the token mean of the membrane
      feat = self.head_lif(u.mean(axis=1))
    y = self.head(feat)  # [B*T, classes]
    y = y.reshape(b, T, -1).astype(self.logits_dtype)
    return y if self.per_timestep_logits else y.mean(axis=1)


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def model_config(dataset: str = 'cifar', *, embed_dim: int = 512, depth: int = 2,
                 num_heads: int = 8, T: int = 4, num_classes: int = 10,
                 img_size: int = 32, mlp_ratio: float = 4.0,
                 attention: str = 'sdsa') -> ml_collections.ConfigDict:
  """`config.model` of an SDT (attention='sdsa') or A2OS2A (attention='a2os2a')."""
  if dataset not in POOLING:
    raise errors.ConfigError(f'dataset={dataset!r}; valid: {sorted(POOLING)}.')
  return ml_collections.ConfigDict(dict(
      name='sdt',                 # the family (models.names())
      embed_dim=embed_dim,        # D, the width of every block
      depth=depth,                # blocks
      num_heads=num_heads,        # attention heads (must divide embed_dim)
      mlp_ratio=float(mlp_ratio),  # MLP hidden width / D
      T=T,                        # timesteps
      in_channels=2 if dataset in ('gesture', 'cifar10dvs') else 3,  # 2: event polarities
      num_classes=num_classes,  # outputs of the head (= data.num_classes)
      img_size=img_size,          # input height and width
      pooling=POOLING[dataset],   # which of the 4 MS_SPS stages max-pool ('1111')
      dvs_mode=dataset == 'cifar10dvs',  # SDT's Erode, official for CIFAR10-DVS only
      attention=attention,        # sdsa (SDT), a2os2a, or any registered kind
      # qk_first, kv_first or '' = auto (the cheaper association; exact for integer
      # operands, float rounding with A2OS2A's real K)
      attn_order='',
      attn_v_threshold=0.5,       # talking_heads_lif / A2OS2A's neuron after Q K^T V
      attn_proj=True,             # projection conv + BN after the attention
      # HEAD_ORDERS: 'pool_then_fire' (the SDT code: head_lif on the token mean of
      # the membrane) or 'fire_then_pool' (A2OS2A eq. 18: the neuron on every
      # token, then the mean of the spikes); no parameter changes
      head_order='pool_then_fire',
      # True: also build the official code's unused modules (talking_heads) so that
      # official checkpoints load; they get no gradient and no weight decay.
      dead_modules=False,
      **common.shared_fields()))  # dtype, remat, neuron, the attention kinds' own fields
# fmt: on


def check_config(m: ml_collections.ConfigDict):
  """One clear error per malformed SDT `config.model`."""
  common.check_heads(m)
  common.check_pooling(m.pooling)
  order = m.get('head_order', 'pool_then_fire')
  if order not in HEAD_ORDERS:
    raise errors.ConfigError(
      f'model.head_order={order!r}; valid: '
      f'{", ".join(map(repr, HEAD_ORDERS))} (\'pool_then_fire\': the '
      "official SDT head; 'fire_then_pool': A2OS2A eq. 18)."
    )


def downsampling(m: ml_collections.ConfigDict) -> int:
  """Every pooled MS_SPS stage halves the image."""
  return 2 ** m.pooling.count('1')


def describe(m: ml_collections.ConfigDict) -> str:
  return f'sdt {m.attention} {m.depth}-{m.embed_dim}'


def from_fixture(rec: dict) -> ml_collections.ConfigDict:
  """Our `config.model` for the architecture a fidelity recording is of."""
  kw = rec['constructor_args_full']
  if kw.get('spike_mode', 'lif') != 'lif' or kw.get('TET'):
    raise errors.DataError(
      f"SDT fixture with spike_mode={kw.get('spike_mode')!r}, "
      f"TET={kw.get('TET')}: only the released 'lif', TET=False graph is "
      "checked."
    )
  mc = model_config(
    'cifar',
    embed_dim=kw['embed_dims'],
    depth=kw['depths'],
    num_heads=kw['num_heads'],
    T=rec['T'],
    num_classes=kw['num_classes'],
    img_size=kw['img_size_h'],
    mlp_ratio=kw['mlp_ratios'],
  )
  mc.in_channels = kw['in_channels']
  mc.pooling = kw['pooling_stat']
  mc.dvs_mode = bool(kw['dvs_mode'])
  mc.dead_modules = True
  mc.dtype = 'float64'
  return mc


FAMILY = common.Family(
  name='sdt',
  model=SDT,
  model_config=model_config,
  check=check_config,
  downsampling=downsampling,
  describe=describe,
  runlocal=common.flat_runlocal,
  from_fixture=from_fixture,
  added={'head_order': ('pool_then_fire', str)},
)
