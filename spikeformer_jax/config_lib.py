"""Shared pieces of the ml_collections configs in configs/ (one place)."""

from __future__ import annotations

import json

import ml_collections

from spikeformer_jax import data as data_lib
from spikeformer_jax import errors
from spikeformer_jax import models
from spikeformer_jax.data import mixup

NORM = data_lib.NORM


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def data_config(name, num_classes, shape, mean=(0.5,), std=(0.25,)):
  """`config.data`; mean=() feeds raw values (event counts)."""
  return ml_collections.ConfigDict(dict(
      name=name,              # the dataset (spikeformer_jax.data.NAMES)
      num_classes=num_classes,  # the data's classes; must equal model.num_classes
      image_size=shape[-2],   # the model's input size (tfds / event sources resize to it)
      shape=tuple(shape),     # example shape, [T,] H, W, C (events: T = frames)
      num_train=512,          # synthetic: training examples
      num_test=128,           # synthetic: test examples
      seed=0,                 # synthetic: the generator's seed
      synthetic_kind='gesture',  # synthetic_events: 'gesture' or 'image' (CIFAR10-DVS-like)
      path='',                # npz: file with x_train, y_train, x_test, y_test
      data_dir='',            # tfds: prepared datasets ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
      split_by='number',      # event datasets: frame integration, 'number' or 'time'
      mean=tuple(mean),       # per-channel normalisation; () = raw values (event counts)
      std=tuple(std),         # per-channel normalisation; () = raw values (event counts)
      norm_from='',           # a dataset of data.NORM whose statistics replace mean / std
                              # (MSViT's CIFAR-100 rows: 'cifar10', as its code)
      workers=0,              # > 0: grain worker processes prepare the batches; 0: a
                              # background thread
      augment=data_lib.augment_config(),
  ))
# fmt: on


def image_data(dataset, num_classes, img):
  mean, std = NORM[dataset]
  return data_config(dataset, num_classes, (img, img, 3), mean, std)


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def base_config(model, data, *, batch, epochs, lr, wd, warmup, warmup_lr, min_lr=1e-5,
                optimizer='adamw', eps=1e-8):
  """Everything but the model and data, with the official recipes' shape."""
  c = ml_collections.ConfigDict()
  c.name = ''                  # 'family:variant', set by get_config: names the run in reports
  c.seed = 42                  # initialisation, batch order, augmentation and mixup draws
  c.model = model              # a family's model_config() (spikeformer_jax/models/)
  c.data = data                # data_config()
  c.batch_size = batch         # global: over all devices and processes
  c.eval_batch_size = max(batch, 64)  # global; the last batch is padded (padding not counted)
  c.epochs = epochs            # + cooldown_epochs = the epochs trained (docs/configs.md)
  c.cooldown_epochs = 10       # timm's epochs at min_lr after the cosine
  c.total_steps = 0            # > 0: stop after this many steps (schedule still from epochs)
  c.label_smoothing = 0.1      # of the soft targets (timm's; mixup mixes the smoothed ones)
  c.mixup = mixup.mixup_config()  # mixup / CutMix on device (timm's Mixup, 'batch' mode)
  c.ema_decay = 0.0            # > 0: keep timm ModelEmaV2 of the weights, evaluated beside them
  c.tet = ml_collections.ConfigDict(dict(  # Temporal Efficient Training loss (SDT's option)
      enabled=False,           # the TET loss against the same soft targets as the plain loss
      means=1.0,               # the target of TET's MSE term on the logits
      lamb=0.001))             # the loss: (1 - lamb) x cross-entropy + lamb x MSE
  c.optimizer = ml_collections.ConfigDict(dict(
      name=optimizer,          # adamw | lamb (SDT's ImageNet and Gesture recipes)
      lr=lr,                   # peak learning rate (the base lr with lr_scale_batch)
      weight_decay=wd,         # decoupled; never on 1-D parameters and biases (timm's mask)
      b1=0.9, b2=0.999, eps=eps,  # Adam's betas and epsilon (Lamb's official eps: 1e-6)
      # timm: linear warmup from warmup_lr over warmup_epochs, then the cosine to min_lr
      warmup_epochs=warmup, warmup_lr=warmup_lr, min_lr=min_lr,
      schedule='timm_cosine',   # timm_cosine | mae_cosine (MSViT / QKFormer ImageNet)
      schedule_per_epoch=True,  # timm steps the schedule once per epoch
      lr_scale_batch=False,     # True: lr is the base lr "blr", x global batch x accum / 256
      accum_steps=1,            # gradient accumulation: steps per optimizer update
      grad_clip_norm=0.0))     # > 0: torch's clip_grad_norm_ at that norm (timm --clip-grad)
  c.bn_scope = 'global'        # BatchNorm statistics over the global batch ('global': one
                               # GPU, SyncBN) or per data-parallel device ('device': DDP)
  c.num_devices = -1           # devices of the mesh; -1: all visible devices
  # Mesh axes (their product = num_devices; -1 = the rest): the batch is split
  # over both, the params and optimizer state sharded over fsdp.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                 # data-parallel devices
      fsdp=1,                  # devices that shard the parameters and optimizer state
      dcn_data=1,              # slices the data axis spans (multi-slice TPU: data = dcn_data x
                               # data per slice; fsdp stays within a slice)
      fsdp_min_size=2 ** 14))  # arrays with fewer elements stay replicated
  c.log_every_steps = 50       # a metrics line (metrics.jsonl, TensorBoard) every N steps
  c.eval_every_epochs = 1      # evaluate on the test split every N epochs, and at the end
  c.ckpt_every_steps = 0       # 0: every epoch
  c.ckpt_keep = 3              # checkpoints kept (>= 1); older ones are deleted
  c.paper_top1 = 0.0           # the paper's number, shown beside ours (sweeps)
  c.target_top1 = 0.0          # if set, the last line says whether it was reached
  c.allow_config_change = False  # resume even if model-defining fields changed
  c.plugins = ()               # modules to import first: they register attention kinds / families
  c.init_from = ''             # start from these weights: a workdir / checkpoint of ours or a
                               # PyTorch (.pth, .pth.tar) / numpy (.npz) state_dict (pretrained.py)
  c.init_skip = ()             # regexes of our names kept at their initialisation, e.g.
                               # ('head',) (names such as params/head/kernel)
  c.init_required = False      # True (fine-tuning rows): refuse to start without init_from;
                               # init_from='none' trains from scratch on purpose
  c.tensorboard = True         # also write the metrics to WORKDIR/tb (tensorboardX, no TensorFlow)
  c.profile_steps = ()         # (first, last): a jax.profiler trace of those steps -> WORKDIR/profile
  c.compile_cache_dir = ''     # JAX's persistent compilation cache: '' = WORKDIR/compile_cache on
                               # TPU / GPU (none on CPU, or the one already set); 'none'; or a path
  return c
# fmt: on


def runlocal(c):
  """Shrinks any variant to seconds on CPU, on synthetic data of its kind."""
  m = c.model
  models.get(m.name).runlocal(m)  # the family's own shrink
  m.img_size = min(m.img_size, 32)
  d = c.data
  if d.name != 'digits':
    events = m.in_channels == 2
    # Event rows: recordings of the synthetic event generator, integrated as the real ones.
    d.synthetic_kind = 'gesture' if d.name == 'dvs128_gesture' else 'image'
    d.name = 'synthetic_events' if events else 'synthetic'
    d.shape = ((m.T,) if events else ()) + (m.img_size, m.img_size, m.in_channels)
    d.num_classes = m.num_classes
    d.num_train, d.num_test = 64, 32
  c.batch_size, c.eval_batch_size = 16, 16
  c.epochs, c.cooldown_epochs, c.total_steps = 1, 0, 4
  c.optimizer.accum_steps = min(c.optimizer.get('accum_steps', 1), 2)
  c.log_every_steps, c.ckpt_every_steps = 2, 2
  if 'init_required' in c:  # the shrunk model fits no pretrained run: a smoke run from scratch
    c.init_required = False
  return c


def parse_arg(arg: str, default: str, variants) -> tuple[str, bool]:
  """'VARIANT[,runlocal]' -> (variant, runlocal), with clear errors."""
  name, *flags = (arg or default).split(',')
  unknown = set(flags) - {'runlocal'}
  if unknown:
    raise errors.ConfigError(f'unknown config flags {sorted(unknown)}; valid: runlocal.')
  if name not in variants:
    raise errors.ConfigError(f'unknown variant {name!r}; valid: ' + ', '.join(variants))
  return name, 'runlocal' in flags


# Fields whose change makes a checkpoint another experiment: a run refuses to
# resume across them unless `allow_config_change` is set.
MODEL_DEFINING = (
  'model',
  'data.name',
  'data.num_classes',
  'data.image_size',
  'data.shape',
  'data.mean',
  'data.std',
  'data.norm_from',
  'ema_decay',
)  # EMA on / off changes the checkpoint's structure


def config_diff(saved, want, prefix: str = '') -> list[str]:
  """Dotted keys whose values differ between two JSON-like config dicts."""
  if isinstance(saved, dict) and isinstance(want, dict):
    return [
      d
      for k in sorted(set(saved) | set(want))
      for d in config_diff(saved.get(k), want.get(k), f'{prefix}{k}.')
    ]
  return [] if saved == want else [prefix.rstrip('.')]


# Model-defining fields of the shared config added after the first release ->
# (their default, for runs saved before they existed; what of the value
# matters: EMA on / off). A family's or attention kind's own fields declare
# theirs beside them (`added`): see `added_fields`.
_ADDED = {
  'data.norm_from': ('', str),
  'ema_decay': (0.0, bool),
  'model.neuron.membrane': ('float32', str),
  'model.neuron.kind': ('lif', str),
  'model.neuron.charge_form': ('spikingjelly', str),
  'model.neuron.beta': (0.5, float),
  'mesh.dcn_data': (1, int),  # not model-defining: older runs' configs read as one slice
}


def added_fields() -> dict:
  """Every model-defining field added after the first release -> (its default
  for older runs, what of the value matters): the shared ones and those the
  registered families and attention kinds declare."""
  return {**_ADDED, **models.added_fields()}


# Under 'model' but not defining it: how the same function is compiled.
COMPILATION_ONLY = (
  'model.remat',
  'model.remat_stem',
  'model.neuron.loop',
  'model.neuron.unroll',
  'model.neuron.recompute',
  'model.compact_spikes',
  'model.weight_grad',
  'model.bn_recompute',
  'model.kernels',
)


def model_defining(
  keys: list[str], saved: dict | None = None, want: dict | None = None
) -> list[str]:
  """The model-defining keys among changed `keys` (of saved -> want configs)."""
  out, added = [], added_fields()
  for k in keys:
    if not any(k == f or k.startswith(f + '.') for f in MODEL_DEFINING) or k in COMPILATION_ONLY:
      continue
    if saved is not None and k in added:
      default, matters = added[k]
      a, b = (lookup(d, k) for d in (saved, want))
      if matters(default if a is None else a) == matters(default if b is None else b):
        continue
    out.append(k)
  return out


def _as_config_value(v):
  if isinstance(v, list):
    return tuple(_as_config_value(x) for x in v)
  return v


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict, where: str = ''):
  """Sets dotted keys (`'model.T': 4`) on a locked config: unknown fields and
  values of the wrong type raise one ValueError naming `where`, the field and
  the value. Lists become tuples, as the configs use."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    try:
      for p in path:
        node = node[p]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = _as_config_value(value)
    except (KeyError, AttributeError) as e:
      raise errors.ConfigError(f'{where}unknown config field {key!r} (set to {value!r}).') from e
    except TypeError as e:
      raise errors.ConfigError(f'{where}{key}={value!r}: {e}') from e
  return config


def parse_set(pairs) -> dict:
  """['model.T=4', 'data.name=npz'] -> overrides; VALUE is JSON, else a string."""
  out = {}
  for pair in pairs or []:
    key, sep, value = pair.partition('=')
    if not sep:
      raise errors.ConfigError(f'--set {pair!r}: expected KEY=VALUE.')
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def lookup(d: dict | None, key: str):
  """The value at dotted `key` of a nested dict (a saved config.json), or None."""
  for p in key.split('.'):
    if not isinstance(d, dict) or p not in d:
      return None
    d = d[p]
  return d
