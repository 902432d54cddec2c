r"""Replays recorded training runs of the official recipes through our own
train step (shared/fixtures/trajectory/README.md).

A trajectory recording holds an official model's initial state, the batch of
every iteration and, after every iteration, the loss, the learning rate and
every parameter and BatchNorm buffer (and the EMA's), from the official
train.py + yml of its repository. `recipe_config` turns the official arguments
the file stores into the config fields a user sets (the README's recipe
table); `check_trajectory` builds the experiment with `experiment.build`, loads
the initial state, feeds the recorded batches in order through
`experiment.make_train_step` and compares after every iteration. Run it with
`python -m spikeformer_jax.fidelity FILE.npz` (float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from spikeformer_jax import config_lib
from spikeformer_jax import convert
from spikeformer_jax import experiment
from spikeformer_jax import losses
from spikeformer_jax import recordings
from spikeformer_jax import sharding
from spikeformer_jax.recordings import BadRecording

# Pass criteria (float64) after every iteration, relative to max |official|
# of each tensor. The arithmetic is the official one up to the order of
# floating-point operations inside XLA's and PyTorch's kernels (sums,
# convolutions), which the one-step recordings bound at 1e-9 of a gradient
# tensor's largest entry. Adam divides every gradient entry by its running
# RMS + eps, so for entries whose gradient is near eps (or is rounding noise:
# biases that feed a train-mode BatchNorm) that difference grows up to 1/eps
# times. Parameters and EMA entries may therefore also differ by
# STEP_FRACTION of the summed learning rates of the updates so far (a full
# Adam step moves an entry by about lr); a wrong weight decay, eps, schedule
# or mask moves them by much more. README, "Training exactly as the official
# recipes".
TOL = {
  'loss': 1e-10,  # the training loss of the iteration
  'lr': 1e-13,  # the learning rate the optimizer used
  'parameters': 1e-10,  # + STEP_FRACTION * sum(lr) / max|official|
  'bn buffers': 1e-9,  # running mean / variance: batch statistics of those weights
  'ema': 1e-10,  # timm ModelEmaV2 of params and buffers; + the parameters' allowance
}
STEP_FRACTION = 1e-4
_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')

# Default eps of the optimizers timm's create_optimizer_v2 builds when
# --opt-eps is unset: torch AdamW, timm Lamb.
_TIMM_EPS = {'adamw': 1e-8, 'lamb': 1e-6}


def _as_fixture(rec: dict) -> dict:
  """The trajectory's model description in the one-step fixtures' terms."""
  kw = rec['constructor_kwargs']
  return {
    **rec,
    'file': rec['model_file'].split()[0],
    'constructor_args_full': kw,
    'T': kw.get('T', rec.get('T')),
  }


def _unsupported(what: str):
  return NotImplementedError(
    f'{what}: not one of the official recipes this port replays '
    '(timm cosine + AdamW / Lamb, MAE fine-tuning + AdamW).'
  )


def recipe_config(rec: dict) -> ml_collections.ConfigDict:
  """Our training config of the official recipe a trajectory recorded, from
  the argparse namespace the file stores (`args_used`) alone.

  timm's train.py (Spikformer, SDT): opt, lr, weight_decay, opt_eps,
  opt_betas, warmup_lr, warmup_epochs, min_lr, epochs, cooldown_epochs,
  clip_grad, smoothing, model_ema / model_ema_decay. MAE's engine (MSViT):
  blr with the batch scaling, accum_iter, the per-update half-cosine.
  """
  a = rec['args_used']
  mc = recordings.model_config_from_fixture(_as_fixture(rec))
  _, channels, height, width = rec['input_shape'][-4:]
  data = config_lib.data_config('synthetic', rec['num_classes'], (height, width, channels))
  mae = 'blr' in a  # MSViT's imagenet/train.py (MAE fine-tuning); else timm's train.py
  if mae:
    if float(a.get('layer_decay', 1.0)) != 1.0:
      raise _unsupported(f"layer_decay={a['layer_decay']}")
    if rec['steps_per_epoch'] % int(a.get('accum_iter', 1)):
      # the official loop drops the remainder's gradients at each epoch's zero_grad
      raise _unsupported(
        f"accum_iter={a['accum_iter']} not dividing the {rec['steps_per_epoch']} steps of an epoch"
      )
    opt, lr, eps = 'adamw', a['blr'], _TIMM_EPS['adamw']
  else:
    opt = str(a['opt']).lower()
    if opt not in _TIMM_EPS:
      raise _unsupported(f'opt={opt!r}')
    if a.get('sched') != 'cosine' or a.get('lr_noise') or a.get('clip_mode', 'norm') != 'norm':
      raise _unsupported(
        f"sched={a.get('sched')!r}, lr_noise={a.get('lr_noise')}, "
        f"clip_mode={a.get('clip_mode', 'norm')!r}"
      )
    for arg, default in (('lr_cycle_limit', 1), ('lr_cycle_mul', 1.0), ('lr_k_decay', 1.0)):
      if a.get(arg, default) != default:
        raise _unsupported(f'{arg}={a[arg]}')
    lr, eps = a['lr'], a.get('opt_eps') or _TIMM_EPS[opt]
  c = config_lib.base_config(
    mc,
    data,
    batch=rec['batch_size'],
    epochs=a['epochs'],
    lr=lr,
    wd=a['weight_decay'],
    warmup=a['warmup_epochs'],
    warmup_lr=a.get('warmup_lr', 0.0),
    min_lr=a['min_lr'],
    optimizer=opt,
    eps=eps,
  )
  c.optimizer.b1, c.optimizer.b2 = a.get('opt_betas') or (0.9, 0.999)
  c.optimizer.grad_clip_norm = float(a.get('clip_grad') or 0.0)
  c.cooldown_epochs = int(a.get('cooldown_epochs', 0))
  c.label_smoothing = float(a.get('smoothing', 0.0))
  c.ema_decay = float(a['model_ema_decay']) if a.get('model_ema') else 0.0
  if mae:
    c.optimizer.update(
      schedule='mae_cosine', lr_scale_batch=True, accum_steps=int(a.get('accum_iter', 1))
    )
  c.num_devices = 1
  c.seed = int(rec.get('seed', 0))
  return c


def _lamb_order(model, entries, rec: dict, state: dict):
  """Each parameter's position in the official optimizer's parameter order,
  the order in which timm's Lamb sums the squared gradient norms in float32
  (optim.timm_clip_by_global_norm): the recording's `param_groups` in order,
  each in named_parameters() order; without them, timm's grouping of the
  state_dict order (1-D parameters and biases, no decay, first)."""
  names = [n for g in rec.get('param_groups') or () for n in g['param_names']]
  if not names:
    names = sorted(
      (k for k in state if not k.endswith(_BUFFERS)),
      key=lambda k: not (np.ndim(state[k]) <= 1 or k.endswith('.bias')),
    )
  position = {n: i for i, n in enumerate(names)}
  by_path = {e.path: position.get(e.torch_key) for e in entries}

  def rank(keypath, _):
    path = tuple(
      getattr(k, 'key', getattr(k, 'idx', None))
      for k in keypath
      if not isinstance(k, jax.tree_util.GetAttrKey)
    )  # a Variable's .value
    if by_path.get(path) is None:
      raise BadRecording(
        f"parameter {'.'.join(map(str, path))} is in none of the "
        "recording's optimizer param_groups."
      )
    return by_path[path]

  return jax.tree_util.tree_map_with_path(rank, nnx.state(model, nnx.Param))


def _initial_state(exp, model):
  """The train state holding the recording's initial state_dict (in `model`)."""
  params, batch_stats, _ = nnx.state(model, nnx.Param, nnx.BatchStat, ...)
  state = {
    'params': params,
    'batch_stats': batch_stats,
    'opt_state': exp.tx.init(params),
    'step': jnp.zeros((), jnp.int32),
    'rng': experiment.rng_start(exp.config.seed),
  }
  if losses.ema_decay(exp.config):  # timm deep-copies the model (own buffers)
    state['ema'] = jax.tree.map(jnp.copy, {'params': params, 'batch_stats': batch_stats})
  return jax.device_put(state, exp.state_sharding)


def _torch_view(entries, *states) -> dict:
  flat = {p: np.asarray(v.get_value()) for s in states for p, v in nnx.to_flat_state(s)}
  return convert.to_torch_layout(entries, flat)


def check_trajectory(d: dict, rec: dict, name: str, kernels: str = 'auto') -> dict:
  """Replays one trajectory recording (with `kernels` as model.kernels); a
  report with 'ok', the worst error of each quantity and the first
  iteration, tensor and quantity that differ."""
  config = recipe_config(rec)
  config.model.kernels = kernels
  initial = recordings.state_dict(d)
  model, entries = recordings.model_holding(config.model, initial)
  order = _lamb_order(model, entries, rec, initial) if config.optimizer.name == 'lamb' else None
  exp = experiment.build(
    config, sharding.make_mesh(1), int(rec['steps_per_epoch']), lamb_order=order
  )
  state = _initial_state(exp, model)
  train_step = experiment.make_train_step(exp)
  worst: dict[
    str, tuple[float, float, float, str]
  ] = {}  # quantity -> (error / tolerance, error, tolerance, where)
  first: list[str] = []
  lr_sum = 0.0  # of the updates so far

  def compare(quantity, i, what, err, tol):
    where = f'iteration {i}' + (f', {what}' if what else '')
    ratio = err / tol if tol else (0.0 if err == 0 else float('inf'))
    if quantity not in worst or not ratio <= worst[quantity][0]:  # NaN is the worst
      worst[quantity] = (ratio, err, tol, where)
    if not err <= tol and not first:
      first.append(f'{where} ({quantity}): rel. error {err:.2e} > tolerance {tol:.2e}')

  def compare_state(quantity_of, i, ours: dict, prefix: str):
    for key in sorted(k[len(prefix) :] for k in d if k.startswith(prefix)):
      ref, quantity = d[prefix + key], quantity_of(key)
      scale = max(float(np.max(np.abs(ref))), 1e-300)
      tol = TOL[quantity] + (0.0 if quantity == 'bn buffers' else STEP_FRACTION * lr_sum / scale)
      if key not in ours:
        compare(quantity, i, f'{key} (not in our model)', float('inf'), tol)
      elif key.endswith('num_batches_tracked'):
        compare(quantity, i, key, 0.0 if int(ours[key]) == int(ref) else float('inf'), 0.0)
      else:
        compare(quantity, i, key, recordings.rel_error(ours[key], ref, scale), tol)

  for i in range(int(rec['n_steps'])):
    batch = {
      'image': jnp.asarray(recordings.to_nhwc(d[f'batch/{i}/input'])),
      'label': jnp.asarray(d[f'batch/{i}/labels']),
    }
    state, metrics = train_step(state, batch)
    ref_loss = float(d[f'loss/{i}'])
    compare(
      'loss',
      i,
      '',
      abs(float(metrics['loss']) - ref_loss) / max(abs(ref_loss), 1e-300),
      TOL['loss'],
    )
    ref_lr = np.asarray(d[f'lr/{i}'], np.float64)  # one lr per official param group
    compare(
      'lr',
      i,
      '',
      float(np.max(np.abs(float(metrics['lr']) - ref_lr)))
      / max(float(np.max(np.abs(ref_lr))), 1e-300),
      TOL['lr'],
    )
    if bool(d.get(f'updated/{i}', True)):  # gradient accumulation: only updates count
      lr_sum += float(np.max(ref_lr))
    compare_state(
      lambda k: 'bn buffers' if k.endswith(_BUFFERS) else 'parameters',
      i,
      _torch_view(entries, state['params'], state['batch_stats']),
      f'state_after/{i}/',
    )
    if 'ema' in state:
      compare_state(
        lambda k: 'ema',
        i,
        _torch_view(entries, state['ema']['params'], state['ema']['batch_stats']),
        f'ema_after/{i}/',
      )
  if any(k.startswith('ema_after/') for k in d) and 'ema' not in state:
    compare('ema', 0, 'the recording has an EMA; this recipe kept none', float('inf'), 0.0)
  checks = {
    q: {'error': e, 'tol': tol, 'ok': bool(r <= 1.0), 'where': where}
    for q, (r, e, tol, where) in worst.items()
  }
  return {
    'file': name,
    'family': rec.get('family'),
    'kind': 'trajectory',
    'recipe': rec.get('recipe'),
    'iterations': int(rec['n_steps']),
    'checks': checks,
    'first_mismatch': first[0] if first else None,
    'ok': not first and all(c['ok'] for c in checks.values()),
  }


def format_report(r: dict) -> str:
  lines = [
    f"{r['file']} ({r['family']}, {r['recipe']} recipe, {r['iterations']} iterations "
    f"replayed): {'MATCH' if r['ok'] else 'MISMATCH'}"
  ]
  for name, c in r['checks'].items():
    lines.append(
      f"  {'ok ' if c['ok'] else 'BAD'} {name}: rel. error {c['error']:.2e}, "
      f"tolerance {c['tol']:.1e} ({c['where']}: the closest to its tolerance)"
    )
  if r['first_mismatch']:
    lines.append(f"  first mismatch: {r['first_mismatch']}")
  return '\n'.join(lines)
