"""Checks of a config and its data, before anything is built or compiled.

A mistake in a field or a data file is reported as one line that names the
field (or file), the value and what is valid, instead of a trace deep inside
jit or, worse, a run that trains on the wrong thing:

  validate_config(config)                      the config alone: run it first.
  validate_start(config)                       what a training run needs besides.
  validate_data(config, train_src, test_src)   the loaded splits against the model.
  validate_split(config, source, split)        one split (eval.py, analysis).

The npz reader checks what only the file shows (lengths, label values, finite
pixels) and names the file; the models check their own sizes while they are
built abstractly, still before compiling.
"""

from __future__ import annotations

import importlib
import math
import re

from spikeformer_jax import attention
from spikeformer_jax import blocks
from spikeformer_jax import data as data_lib
from spikeformer_jax import errors
from spikeformer_jax import models
from spikeformer_jax import optim
from spikeformer_jax import synapses
from spikeformer_jax.data import augment

BN_SCOPES = ('global', 'device')
OPTIMIZERS = ('adamw', 'lamb')
REMODES = ('', 'const', 'rand', 'pixel')
SPLIT_BY = ('number', 'time')


_MISSING = object()


def _get(config, field: str, default=_MISSING):
  """config['a']['b'] for 'a.b'; `default` (or _MISSING) where a key is absent,
  as in the config.json of older runs."""
  for key in field.split('.'):
    if config is None or not hasattr(config, 'keys') or key not in config:
      return default
    config = config[key]
  return config


def _require(ok: bool, message: str):
  if not ok:
    raise errors.ConfigError(message)


def _at_least(config, field: str, low, why: str = ''):
  value = _get(config, field)
  if value is not _MISSING:
    _require(value >= low, f'{field}={value} must be >= {low}{why}.')


def _in_range(config, field: str, low, high, why: str = ''):
  """low <= value < high."""
  value = _get(config, field)
  if value is not _MISSING:
    _require(low <= value < high, f'{field}={value} must be in [{low}, {high}){why}.')


def _probability(config, field: str):
  value = _get(config, field)
  if value is not _MISSING:
    _require(0 <= value <= 1, f'{field}={value} is a probability: use a value in [0, 1].')


def load_plugins(config):
  """Imports `config.plugins`, the modules that register attention kinds or
  model families (docs/extending.md): a run's config.json names them, so
  eval.py and resumed runs find them again."""
  for name in config.get('plugins', ()) or ():
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise errors.ConfigError(
        f'plugins: cannot import {name!r} ({e}); make it importable '
        '(installed, on PYTHONPATH, or in the working directory).'
      ) from e


def validate_config(config):
  """Everything that needs the config alone (no data, no devices): cheap.
  Imports `config.plugins` first."""
  load_plugins(config)
  _validate_finite(config)
  _validate_model(config)
  _validate_data_config(config)
  _validate_training(config)


def validate_start(config):
  """What training from `config` needs beyond a valid config (train.py and
  sweep points; not eval or the planner, which load no initial weights): a
  fine-tuning config (`init_required`, Spikformer's Table 7 rows) names the
  weights it starts from, or says `none`, instead of silently training from
  scratch."""
  if config.get('init_required', False) and not config.get('init_from', ''):
    name = config.get('name', '') or 'this config'
    raise errors.ConfigError(
      f'{name} fine-tunes trained weights but init_from is not set: give '
      '--config.init_from=WORKDIR of the run to start from (Table 7: the '
      'ImageNet run), or --config.init_from=none to train it from scratch.'
    )


def _non_finite(value) -> bool:
  if isinstance(value, (tuple, list)):
    return any(_non_finite(v) for v in value)
  return isinstance(value, float) and not math.isfinite(value)


def _validate_finite(config, prefix: str = ''):
  """Every float field (and every float of a tuple field) is finite: NaN
  passes `x > 0`-style checks' negations as False and trains a run of NaN."""
  for key in config.keys():
    value, field = config[key], prefix + str(key)
    if hasattr(value, 'keys'):
      _validate_finite(value, field + '.')
    elif _non_finite(value):
      raise errors.ConfigError(f'{field}={value} must be finite.')


def _plugin_check(check, model):
  """A kind's or family's `check(model)`. Rejecting a config is what a check is
  for, so a plain ValueError it raises is a config error too (one line): a
  plug-in need not know errors.ConfigError (see errors.py)."""
  try:
    check(model)
  except errors.UserError:
    raise
  except ValueError as e:
    raise errors.ConfigError(errors.one_line(e)) from e


def _validate_model(c):
  m = c.model
  family = models.get(m.name)  # raises with the registered names
  attention_kinds = m.get('attention', 'ssa')
  for kind in (attention_kinds,) if isinstance(attention_kinds, str) else tuple(attention_kinds):
    if kind not in attention.names():
      raise errors.ConfigError(
        f'model.attention={attention_kinds!r}; valid kinds: {", ".join(attention.names())}.'
      )
    impl = attention.get(kind)
    _plugin_check(impl.check, impl.with_own_fields(m))  # own fields, defaults where m lacks them
  _require(m.T >= 1, f'model.T={m.T}: the number of timesteps must be >= 1.')
  for field in ('img_size', 'in_channels', 'num_classes'):
    _at_least(c, f'model.{field}', 1)
  _plugin_check(family.check, m)  # the family's own sizes; also what models.downsampling needs
  ratio = m.get('mlp_ratio', 4.0)
  _require(ratio > 0, f'model.mlp_ratio={ratio} must be > 0.')
  widths = [m.embed_dim] if 'embed_dim' in m else list(m.get('dims', ()))
  for width in widths:  # the blocks' MLPs are int(width * mlp_ratio) wide
    _require(
      int(width * ratio) >= 1,
      f'model.mlp_ratio={ratio} makes the MLP of a width-{width} block '
      f'int({width} * {ratio}) = 0 wide; use mlp_ratio > 1/{width}.',
    )
  for field in ('remat', 'remat_stem'):
    blocks.check_remat(m.get(field, ''), f'model.{field}')
  synapses.resolve(m.get('weight_grad', 'auto'))  # raises on an unknown name
  dtype = m.get('dtype', 'float32')
  _require(dtype in models.DTYPES, f'model.dtype={dtype!r}; valid: {sorted(models.DTYPES)}.')
  try:
    models.make_neuron(m.neuron)
  except ValueError as e:
    raise errors.ConfigError(str(e).replace('Neuron.', 'model.neuron.')) from None
  _at_least(c, 'model.neuron.alpha', 0, " (0: the surrogate's default)")
  for field in ('neuron.v_threshold', 'attn_v_threshold'):
    value = _get(m, field)
    if value is not _MISSING:
      _require(value > 0, f'model.{field}={value} must be > 0.')
  _validate_neuron_dynamics(m)  # an attention kind's own neurons: its check
  factor = models.downsampling(m)
  if m.img_size % factor:
    raise errors.ConfigError(
      f'model.img_size={m.img_size} is not a multiple of {factor}, the '
      f'factor by which the patch stem of {models.describe(m)} downsamples; '
      f'use e.g. {max(factor, m.img_size // factor * factor)}.'
    )


def _validate_neuron_dynamics(m):
  """The network neurons' constants within their meaning: a leak that keeps a
  fraction of the membrane, a reset below the threshold."""
  n = m.neuron
  kind, form = n.get('kind', 'lif'), n.get('charge_form', 'spikingjelly')
  # SpikingJelly's charge keeps 1 - 1/tau of the membrane each step (its LIF
  # asserts tau > 1).
  tau = n.get('tau', 2.0)
  if kind == 'lif' and form == 'spikingjelly':
    _require(
      tau > 1,
      f'model.neuron.tau={tau} must be > 1: the LIF keeps 1 - 1/tau of its '
      f'membrane each step (SpikingJelly asserts tau > 1); e.g. 2.0, or kind=if '
      'for no leak.',
    )
  beta = n.get('beta', 0.5)
  _require(
    0 <= beta <= 1,
    f'model.neuron.beta={beta} is the fraction of the membrane kept '
    "(charge_form='paper'): use a value in [0, 1].",
  )
  attn_vth = m.get('attn_v_threshold', None)
  if kind in ('lif', 'if') and not n.get('soft_reset', False):
    thresholds = [('model.neuron.v_threshold', n.v_threshold)]
    if attn_vth is not None:  # the attention's neuron: the network's, at its own threshold
      thresholds.append(('model.attn_v_threshold', attn_vth))
    for name, vth in thresholds:
      _require(
        n.v_reset < vth,
        f'model.neuron.v_reset={n.v_reset} must be below {name}={vth} '
        '(a hard reset at or above the threshold fires again at once); or set '
        'model.neuron.soft_reset=True.',
      )


def _validate_data_config(c):
  d = c.data
  if d.name not in data_lib.NAMES:
    raise errors.ConfigError(
      f'data.name={d.name!r}; valid: {", ".join(map(repr, data_lib.NAMES))}.'
    )
  _at_least(c, 'data.num_classes', 1)
  _at_least(c, 'data.image_size', 1)
  shape = tuple(d.get('shape', (1, 1, 1)))
  _require(
    len(shape) in (3, 4) and all(isinstance(s, int) and s >= 1 for s in shape),
    f'data.shape={shape}: expected (H, W, C) images or (T, H, W, 2) event frames, '
    'positive integers.',
  )
  if d.get('path') and d.name != 'npz':  # a file the user expects to be trained on
    raise errors.ConfigError(
      f'data.path={d.path!r} is read only with data.name=\'npz\' (now '
      f'{d.name!r}): set --config.data.name=npz, or drop data.path.'
    )
  if d.name == 'npz' and not d.get('path'):
    raise errors.ConfigError(
      "data.name='npz' reads data.path, which is not set: give "
      '--config.data.path=FILE.npz, an .npz with x_train, y_train, x_test, '
      'y_test arrays.'
    )
  if d.name in ('synthetic', 'synthetic_events'):
    _at_least(c, 'data.num_train', 1, ' (synthetic training examples)')
    _at_least(c, 'data.num_test', 1, ' (synthetic test examples)')
  _at_least(c, 'data.workers', 0, ' (0: batches prepared in a thread)')
  _at_least(c, 'data.seed', 0)
  split_by = d.get('split_by', 'number')
  _require(split_by in SPLIT_BY, f'data.split_by={split_by!r}; valid: {SPLIT_BY}.')
  mean, std = data_lib.norm_stats(d)  # raises on an unknown data.norm_from
  _require(
    len(mean) == len(std),
    f'data.mean={tuple(mean)} and data.std={tuple(std)} need '
    'one value per channel each (or both () for raw values).',
  )
  _require(all(s > 0 for s in std), f'data.std={tuple(std)} must be > 0.')
  a = data_lib.augment_config()  # defaults under what the config sets
  a.update(d.get('augment') or {})
  for field in ('hflip', 'reprob'):
    _probability(c, f'data.augment.{field}')
  for field in ('crop_scale', 'crop_ratio'):
    lo_hi = tuple(a[field])
    _require(
      len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
      f'data.augment.{field}={lo_hi}: expected (low, high) with 0 < low <= high.',
    )
  _require(
    0 < a.eval_crop_pct <= 1,
    f'data.augment.eval_crop_pct={a.eval_crop_pct} must be in (0, 1] (1: no centre crop).',
  )
  try:
    augment._interp(a.interpolation)  # pylint: disable=protected-access
  except ValueError as e:
    raise errors.ConfigError(f'data.augment.interpolation={a.interpolation!r}: {e}.') from None
  _require(
    a.interpolation != 'random' or a.eval_crop_pct == 1,
    f"data.augment.interpolation='random' is for training only, and eval_crop_pct="
    f'{a.eval_crop_pct} resizes the test images; set it to bicubic or bilinear.',
  )
  _require(a.remode.lower() in REMODES, f'data.augment.remode={a.remode!r}; valid: {REMODES}.')
  if a.dvs_policy not in data_lib.DVS_POLICIES:
    raise errors.ConfigError(
      f'data.augment.dvs_policy={a.dvs_policy!r}; valid: {data_lib.DVS_POLICIES}.'
    )
  _at_least(c, 'data.augment.dvs_cutout', 0, ' (0: off)')
  if a.rand_augment:  # its grammar, before the workdir is made (data_lib builds it later)
    try:
      augment.rand_augment(a.rand_augment, a.rand_augment_ops)
    except ValueError as e:
      raise errors.ConfigError(
        f'data.augment.rand_augment={a.rand_augment!r} / rand_augment_ops='
        f'{a.rand_augment_ops!r}: {e}'
      ) from None


def _validate_training(c):
  _in_range(c, 'seed', 0, 2**63, ' (jax.random.key takes a 64-bit signed integer)')
  _at_least(c, 'batch_size', 1)
  _at_least(c, 'eval_batch_size', 1)
  _at_least(c, 'epochs', 0)
  _at_least(c, 'cooldown_epochs', 0)
  _at_least(c, 'total_steps', 0, ' (0: from epochs)')
  if c.epochs < 1 and c.total_steps <= 0:
    raise errors.ConfigError('set epochs >= 1 or total_steps > 0.')
  if c.log_every_steps < 1:
    raise errors.ConfigError(f'log_every_steps={c.log_every_steps} must be >= 1.')
  _at_least(c, 'eval_every_epochs', 0, ' (0: only at the end)')
  _at_least(c, 'ckpt_every_steps', 0, ' (0: every epoch)')
  keep = c.get('ckpt_keep', 1)
  _require(keep >= 1, f'ckpt_keep={keep} would keep no checkpoint; use ckpt_keep >= 1.')
  devices = c.get('num_devices', -1)
  _require(devices >= -1, f'num_devices={devices}: use -1 (all visible devices) or a count >= 1.')
  for axis in ('data', 'fsdp'):
    size = _get(c, f'mesh.{axis}')
    if size is not _MISSING:
      _require(
        size == -1 or size >= 1, f'mesh.{axis}={size}: use a device count >= 1, or -1 for the rest.'
      )
  if _get(c, 'mesh.data', None) == -1 and _get(c, 'mesh.fsdp', None) == -1:
    raise errors.ConfigError('mesh.data=-1 and mesh.fsdp=-1: at most one axis can take the rest.')
  _at_least(c, 'mesh.fsdp_min_size', 0)
  _at_least(c, 'mesh.dcn_data', 1, ' (the slices the data axis spans; 1: one slice)')
  bn_scope = c.get('bn_scope', 'global')
  if bn_scope not in BN_SCOPES:
    raise errors.ConfigError(
      f'bn_scope={bn_scope!r}; valid: {BN_SCOPES} (global: '
      'statistics over the whole sharded batch, like SyncBN / one GPU; '
      'device: per data-parallel device, like PyTorch DDP).'
    )
  _in_range(c, 'label_smoothing', 0, 1, ' (0: none)')
  _in_range(c, 'ema_decay', 0, 1, ' (0: no EMA of the weights)')
  profile = tuple(c.get('profile_steps', ()) or ())
  _require(
    not profile or (len(profile) == 2 and 1 <= profile[0] <= profile[1]),
    f'profile_steps={profile}: () (none) or (first, last) train steps, 1 <= first <= '
    'last, e.g. (10, 12).',
  )
  _validate_init_skip(c.get('init_skip', ()))
  target = c.get('target_top1', 0.0)
  _require(
    0 <= target <= 1, f'target_top1={target} is a fraction: use a value in [0, 1], e.g. 0.97.'
  )
  o = c.optimizer
  _require(o.name in OPTIMIZERS, f'optimizer.name={o.name!r}; valid: {OPTIMIZERS}.')
  schedule = o.get('schedule', 'timm_cosine')
  _require(
    schedule in optim.SCHEDULES, f'optimizer.schedule={schedule!r}; valid: {optim.SCHEDULES}.'
  )
  _require(o.lr > 0, f'optimizer.lr={o.lr} must be > 0.')
  for field in ('weight_decay', 'warmup_epochs', 'warmup_lr', 'min_lr'):
    _at_least(c, f'optimizer.{field}', 0)
  warmup = o.get('warmup_epochs', 0)
  if c.total_steps <= 0 and warmup > 0:  # the whole schedule runs: it must reach the base lr
    _require(
      warmup < c.epochs,
      f'optimizer.warmup_epochs={warmup} must be below epochs='
      f'{c.epochs}: the lr would never reach optimizer.lr; lower warmup_epochs or raise '
      'epochs (total_steps > 0 runs a part of the schedule and is not checked).',
    )
  _at_least(c, 'optimizer.grad_clip_norm', 0, ' (0: none)')
  for field in ('b1', 'b2'):
    _in_range(c, f'optimizer.{field}', 0, 1)
  eps = o.get('eps', 1e-8)
  _require(eps > 0, f'optimizer.eps={eps} must be > 0.')
  _at_least(c, 'optimizer.accum_steps', 1, ' (1: no gradient accumulation)')
  for field in ('mixup_alpha', 'cutmix_alpha'):
    _at_least(c, f'mixup.{field}', 0, ' (0: off)')
  _at_least(c, 'mixup.off_epoch', 0, ' (0: mix until the end)')
  for field in ('prob', 'switch_prob'):
    _probability(c, f'mixup.{field}')
  if _get(c, 'tet.enabled', False):
    _require(
      0 <= c.tet.lamb <= 1, f'tet.lamb={c.tet.lamb} must be in [0, 1] (the weight of the MSE term).'
    )


def _validate_init_skip(patterns):
  example = "e.g. --config.init_skip=\"('head',)\""
  _require(
    isinstance(patterns, (tuple, list)) and all(isinstance(p, str) for p in patterns),
    f'init_skip={patterns!r}: a tuple of regular expressions (strings), {example}.',
  )
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise errors.ConfigError(
        f'init_skip={tuple(patterns)!r}: {p!r} is not a regular expression ({e}).'
      ) from None


def validate_data(config, train_src=None, test_src=None):
  """The loaded splits against the model; a split passed as None is skipped."""
  for split, source in (('train', train_src), ('test', test_src)):
    if source is not None:
      validate_split(config, source, split)


def validate_split(config, source, split: str):
  """One split against the model: shapes, channels, frames, classes, labels."""
  m = config.model
  what = f'data {config.data.name!r}' + ('' if split == 'train' else f' ({split} split)')
  _require(len(source) > 0, f'{what} has no {split} examples.')
  img = tuple(source.image_shape)
  _require(
    len(img) in (3, 4),
    f'{what} has examples of shape {img}; expected [H, W, C] images or [T, H, W, 2] event frames.',
  )
  if img[-3] != m.img_size or img[-2] != m.img_size:
    raise errors.ConfigError(
      f'{what} has {img[-3]}x{img[-2]} images but '
      f'model.img_size={m.img_size}; set both to the same size.'
    )
  if img[-1] != m.in_channels:
    raise errors.ConfigError(
      f'{what} has {img[-1]} channels but model.in_channels={m.in_channels}.'
    )
  if len(img) == 4 and img[0] != m.T:
    raise errors.ConfigError(f'event data has T={img[0]} frames but model.T={m.T}.')
  if source.num_classes != m.num_classes:
    raise errors.ConfigError(
      f'{what} has {source.num_classes} classes but model.num_classes={m.num_classes}.'
    )
  mean = getattr(source, 'mean', None)
  if mean is not None and len(mean) not in (1, img[-1]):
    raise errors.ConfigError(
      f'data.mean={tuple(mean)} has {len(mean)} values for '
      f'{img[-1]}-channel images; give one per channel (or one for all).'
    )
  labels = getattr(source, 'labels', None)
  if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= m.num_classes):
    raise errors.ConfigError(
      f'{what} has labels in [{labels.min()}, '
      f'{labels.max()}] but model.num_classes={m.num_classes}.'
    )
