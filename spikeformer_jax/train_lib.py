"""Train state, train / eval steps and the training loop (importable, testable).

The model is a Flax NNX module; training is functional: `nnx.split` gives a
static graph definition and the state {params, batch_stats}, and a plain
`jax.jit` step merges, computes and returns the new state, with explicit
shardings (batch on the mesh axis 'data', state replicated) and the old state
donated. The train state is a plain pytree for optax and orbax:

    {'params': nnx.State, 'batch_stats': nnx.State, 'opt_state': ..., 'step': int32}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from spikeformer_jax import checkpointing
from spikeformer_jax import config_lib
from spikeformer_jax import data as data_lib
from spikeformer_jax import errors
from spikeformer_jax import metrics as metrics_lib
from spikeformer_jax import models
from spikeformer_jax import optim
from spikeformer_jax import pretrained
from spikeformer_jax import sharding
from spikeformer_jax import synapses
from spikeformer_jax import validation
from spikeformer_jax import workdir as workdir_lib
from spikeformer_jax.data import mixup

BN_SCOPES = validation.BN_SCOPES


def cross_entropy(logits, labels, smoothing: float = 0.0):
  """Softmax cross-entropy with label smoothing as timm's (1-s)*y + s/K."""
  targets = mixup.smooth_one_hot(labels, logits.shape[-1], smoothing, logits.dtype)
  return optax.softmax_cross_entropy(logits, targets)


def tet_loss(logits_t, targets, means: float, lamb: float):
  """TET (Deng et al., 2022) as SDT's criterion.py: the cross-entropy of every
  timestep's logits, averaged, plus lamb * MSE of the logits to `means`.
  logits_t: [B, T, classes]; targets: soft targets [B, classes] (timm's
  SoftTargetCrossEntropy, so mixup and smoothing apply)."""
  ce = optax.softmax_cross_entropy(logits_t, targets[:, None]).mean()
  mse = jnp.mean(jnp.square(logits_t - means)) if lamb else 0.0
  return (1.0 - lamb) * ce + lamb * mse


def ema_decay(config) -> float:
  """`config.ema_decay` (0: no EMA of the weights)."""
  return float(config.get('ema_decay', 0.0))


def ema_update(ema, new, decay: float):
  """timm ModelEmaV2: ema = decay * ema + (1 - decay) * new, for params and
  BatchNorm statistics alike. timm writes the float average of the integer
  num_batches_tracked back into its int64 buffer, truncating it (it stays 0
  while (1 - decay) * count < 1)."""
  def average(e, n):
    if jnp.issubdtype(e.dtype, jnp.integer):
      return (decay * e.astype(jnp.float32) + (1.0 - decay) * n.astype(jnp.float32)
              ).astype(e.dtype)
    return decay * e + (1.0 - decay) * n
  return jax.tree.map(average, ema, new)


def input_shape(config) -> tuple:
  """One training example as the input pipeline delivers it: the model's
  image size and channels, with the frames first for event data."""
  m, frames = config.model, tuple(config.data.shape)[:-3]
  return frames + (m.img_size, m.img_size, m.in_channels)


def params_the_loss_reaches(model: nnx.Module, example_shape: tuple):
  """Which parameters the forward reads at all: a pytree of bools like the
  model's params (found by dead-code elimination of the traced forward).

  PyTorch gives a parameter that the forward never touches no gradient, and
  its optimizers then skip it, weight decay included (the official code's
  unused modules, which `model.dead_modules` builds so that its checkpoints
  load). Without JAX's dead-code pass (a private API) every parameter counts
  as reached.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  try:
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
    closed = jax.make_jaxpr(
        lambda p, r: nnx.merge(graphdef, p, r, copy=True)(
            jnp.zeros((2,) + tuple(example_shape), jnp.float32)))(params, rest)
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  except (ImportError, AttributeError, TypeError):
    return jax.tree.unflatten(treedef, [True] * len(leaves))
  return jax.tree.unflatten(treedef, [bool(u) for u in used[:len(leaves)]])


def tet_config(config):
  """`config.tet` when the TET loss is on, else None."""
  tet = config.get('tet')
  return tet if tet is not None and tet.enabled else None


def bn_groups_for(config, mesh) -> int:
  if config.bn_scope not in BN_SCOPES:
    raise errors.ConfigError(f'bn_scope={config.bn_scope!r}; valid: {BN_SCOPES} (global: '
                             'statistics over the whole sharded batch, like SyncBN / one GPU; '
                             'device: per data-parallel device, like PyTorch DDP).')
  return sharding.data_size(mesh) if config.bn_scope == 'device' else 1


@dataclasses.dataclass
class Experiment:
  """Everything the loop, eval.py and the benchmarks need, built once."""
  config: ml_collections.ConfigDict
  mesh: Any
  graphdef_train: Any
  graphdef_eval: Any
  tx: Any
  schedule: Callable
  state_sharding: Any
  abstract_state: Any
  init_fn: Callable
  num_params: int
  bn_groups: int
  steps_per_epoch: int

  def init_state(self):
    return jax.jit(self.init_fn, out_shardings=self.state_sharding)()


def build(config: ml_collections.ConfigDict, mesh, steps_per_epoch: int,
          lamb_order=None) -> Experiment:
  """Model graph definitions, optimizer, and the (abstract) train state.
  `lamb_order`: the official order of Lamb's norm sum (optim.timm_lamb)."""
  bn_groups = bn_groups_for(config, mesh)
  model = nnx.eval_shape(lambda: models.build_model(config.model, bn_groups=bn_groups))
  model.train()
  # Only the official code's unused modules are never reached (a trace).
  reached = (params_the_loss_reaches(model, input_shape(config))
             if config.model.get('dead_modules') else None)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch, reached, lamb_order)

  def init_fn():
    model = models.build_model(config.model, seed=config.seed, bn_groups=bn_groups)
    _, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
      raise ValueError(f'model holds state beyond params and batch stats: {rest}')
    state = {'params': params, 'batch_stats': batch_stats,
             'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
    if ema_decay(config):  # evaluated beside the trained weights
      state['ema'] = {'params': params, 'batch_stats': batch_stats}
    return state

  model.per_timestep_logits = tet_config(config) is not None  # TET: every timestep's logits
  graphdef_train = nnx.graphdef(model)
  model.eval()
  model.per_timestep_logits = False
  graphdef_eval = nnx.graphdef(model)
  abstract = jax.eval_shape(init_fn)
  state_sharding = sharding.state_shardings(  # config.json of older runs has no mesh
      abstract, mesh, config.get('mesh', {}).get('fsdp_min_size', sharding.FSDP_MIN_SIZE))
  return Experiment(
      config=config, mesh=mesh, graphdef_train=graphdef_train, graphdef_eval=graphdef_eval,
      tx=tx, schedule=schedule, state_sharding=state_sharding,
      abstract_state=checkpointing.abstract_like(abstract, state_sharding),
      init_fn=init_fn, num_params=models.count_params(model), bn_groups=bn_groups,
      steps_per_epoch=steps_per_epoch)


def make_train_step(exp: Experiment):
  """jit(state, batch) -> (new state, metrics); the state is donated.

  Mixup / CutMix (config.mixup) run inside the step on the sharded batch,
  keyed by the step; the loss is the cross-entropy against soft targets
  (timm's SoftTargetCrossEntropy), which with neither is label smoothing.
  """
  config = exp.config
  smoothing = config.label_smoothing
  num_classes = config.model.num_classes
  tet = tet_config(config)
  mix = config.get('mixup')
  decay = ema_decay(config)

  def train_step(state, batch):
    with synapses.compiling_for(sharding.platform(exp.mesh)):  # 'auto' for the target
      return _train_step(state, batch)

  def _train_step(state, batch):
    images, labels = batch['image'], batch['label']
    if mixup.active(mix):
      key = jax.random.fold_in(jax.random.key(config.seed), state['step'])
      enabled = (state['step'] // exp.steps_per_epoch < mix.off_epoch
                 if mix.off_epoch > 0 else True)
      images, targets, _ = mixup.mix_batch(key, images, labels, mix, num_classes=num_classes,
                                           smoothing=smoothing, enabled=enabled)
    else:  # float64 inputs (replays of float64 recordings) get float64 targets
      targets = mixup.smooth_one_hot(labels, num_classes, smoothing,
                                     jnp.promote_types(images.dtype, jnp.float32))

    def loss_fn(params):
      model = nnx.merge(exp.graphdef_train, params, state['batch_stats'], copy=True)
      logits = model(images)
      if tet is not None:  # [B, T, classes]; predictions from the mean, as at evaluation
        loss = tet_loss(logits, targets, tet.means, tet.lamb)
        logits = logits.mean(axis=1)
      else:
        loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'])
    updates, opt_state = exp.tx.update(grads, state['opt_state'], state['params'])
    new_state = {'params': optax.apply_updates(state['params'], updates),
                 'batch_stats': batch_stats, 'opt_state': opt_state,
                 'step': state['step'] + 1}
    if decay:
      ema = ema_update(state['ema'], {'params': new_state['params'], 'batch_stats': batch_stats},
                       decay)
      if isinstance(exp.tx, optax.MultiSteps):  # after optimizer updates only, as timm
        ema = jax.tree.map(lambda e, o: jnp.where(exp.tx.has_updated(opt_state), e, o),
                           ema, state['ema'])
      new_state['ema'] = ema
    metrics = {'loss': loss,
               'top1': jnp.mean(jnp.argmax(logits, -1) == labels),
               'lr': exp.schedule(state['step']),
               'grad_norm': optax.tree.norm(grads)}
    return new_state, metrics

  batch_sh = sharding.batch_sharding(exp.mesh)
  return jax.jit(train_step, in_shardings=(exp.state_sharding, batch_sh),
                 out_shardings=(exp.state_sharding, sharding.replicated(exp.mesh)),
                 donate_argnums=(0,))


def make_eval_step(exp: Experiment, ema: bool = False, firing_rates: bool = False):
  """jit(state, batch with 'mask') -> sums of correct top-1/5, loss and count,
  of the trained weights or (ema) of their moving average; with
  `firing_rates`, also every neuron's spike and unit counts (`evaluate` turns
  them into per-layer firing rates)."""
  if ema and not ema_decay(exp.config):
    raise errors.ConfigError('this run kept no EMA of its weights (ema_decay is 0).')

  def eval_step(state, batch):
    with synapses.compiling_for(sharding.platform(exp.mesh)):
      return _eval_step(state, batch)

  def _eval_step(state, batch):
    weights = state['ema'] if ema else state
    model = nnx.merge(exp.graphdef_eval, weights['params'], weights['batch_stats'], copy=True)
    mask = batch['mask'].astype(jnp.float32)
    out = {}
    if firing_rates:
      model.set_attributes(record_spikes='per_example', raise_if_not_found=False)
      logits, inter = nnx.capture(model, nnx.Intermediate)(batch['image'])
      out['spikes'], out['units'] = spike_sums(inter, mask)
    else:
      logits = model(batch['image'])
    label = batch['label']
    k = min(5, logits.shape[-1])
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == label[:, None], axis=-1)
    return {'correct1': jnp.sum((jnp.argmax(logits, -1) == label) * mask),
            'correct5': jnp.sum(top5 * mask),
            'loss': jnp.sum(cross_entropy(logits, label) * mask),
            'count': jnp.sum(mask), **out}

  batch_sh = sharding.batch_sharding(exp.mesh)
  return jax.jit(eval_step, in_shardings=(exp.state_sharding, batch_sh),
                 out_shardings=sharding.replicated(exp.mesh))


def spike_sums(inter, mask) -> tuple[dict, dict]:
  """Per neuron module (dotted path): the spikes of the unmasked examples and
  their number of units (T x neurons, per call), from what
  `record_spikes='per_example'` sowed."""
  spikes, units = {}, {}
  for path, var in nnx.to_flat_state(inter):
    if path[-1] not in ('spikes_per_example', 'units_per_example'):
      continue
    name = '.'.join(map(str, path[:-1]))
    if path[-1] == 'spikes_per_example':
      spikes[name] = sum(jnp.sum(v * mask) for v in var.get_value())
    else:
      units[name] = sum(v * jnp.sum(mask) for v in var.get_value())
  return spikes, units


class EvalInterrupted(Exception):
  """`stop()` asked an evaluation to stop between batches."""


def evaluate(eval_step, state, source, mesh, batch_size: int, transform=None,
             ema_step=None, stop: Callable[[], bool] | None = None) -> dict:
  """top1, top5 and mean loss over every example of `source` (through the eval
  `transform`: resize, centre crop, normalisation); with `ema_step`, also
  'ema_'-prefixed metrics of the weights' EMA, on the same batches (read once).
  Raises EvalInterrupted when `stop()` turns true (checked between batches)."""
  steps = {'': eval_step} if ema_step is None else {'': eval_step, 'ema_': ema_step}
  totals = {}
  for b in data_lib.eval_batches(source, global_batch=batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count(), transform=transform):
    if stop is not None and stop():
      raise EvalInterrupted()
    gb = sharding.global_batch(b, mesh)
    for prefix, step in steps.items():
      out = step(state, gb)
      totals[prefix] = out if prefix not in totals else jax.tree.map(jnp.add, totals[prefix], out)
  res = {}
  for prefix, t in jax.device_get(totals).items():
    n = max(float(t['count']), 1.0)
    res.update({f'{prefix}top1': float(t['correct1']) / n,
                f'{prefix}top5': float(t['correct5']) / n, f'{prefix}loss': float(t['loss']) / n})
    if 'spikes' in t:  # make_eval_step(firing_rates=True)
      res[f'{prefix}firing_rates'] = {name: float(t['spikes'][name]) / max(float(u), 1.0)
                                      for name, u in t['units'].items()}
  res['count'] = int(totals['']['count'])
  return res


Preempted = errors.Stopped  # the name older callers catch


class StopWatch:
  """Notices SIGTERM (a preemption notice), SIGINT (Ctrl-C) and SIGHUP (a
  closed terminal; left ignored under nohup) so that the loop saves the step
  reached and stops: after a train step, between evaluation batches, or once
  the final checkpoint is written.

  One process: the signal's byte reaches a watcher thread through
  `signal.set_wakeup_fd` at once, even while the main thread compiles. Armed
  (the first train step has compiled), the first signal sets a flag that the
  loop checks at its next safe point. Before that there is nothing to save,
  and a second Ctrl-C means "now" (a second SIGTERM or SIGHUP does not: see
  URGENT_AGAIN): both exit at once, after `on_abort`
  (releasing the workdir) and one line naming the resume point. Exiting
  without unwinding is deliberate: an exception raised into XLA's or orbax's
  threads can crash the interpreter's shutdown. Several processes: SIGTERM
  through `reached_preemption_sync_point`, JAX's distributed preemption
  service, so that all processes stop at the same step (a checkpoint is a
  collective); SIGINT keeps Python's default there.
  """
  SIGNALS = {signal.SIGTERM: ('preempted', 'SIGTERM', 143),
             signal.SIGINT: ('interrupted', 'SIGINT', 130),
             signal.SIGHUP: ('hung up', 'SIGHUP', 129)}  # a closed terminal
  # A second Ctrl-C is a person asking for "now". A second SIGTERM or SIGHUP
  # is not: a scheduler (SLURM at its time limit, `sweep.py run` passing its
  # own on) may deliver the same request to a process twice, and its SIGKILL
  # after the grace period is the "now".
  URGENT_AGAIN = (signal.SIGINT,)

  def __init__(self, on_abort: Callable[[], None] = lambda: None):
    self.signum = None
    self.armed = False  # the first step compiled: a signal waits for a safe point
    self.ckpt_dir = None  # named when stopping at once
    self._on_abort = on_abort
    self._previous, self._pipe, self._old_fd = {}, None, None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      r, w = os.pipe()
      os.set_blocking(w, False)
      self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
      self._pipe = (r, w)
      for s in self.SIGNALS:  # a Python handler, so that the wakeup fd hears it
        if signal.getsignal(s) is signal.SIG_IGN:  # nohup's SIGHUP: stays ignored
          continue
        self._previous[s] = signal.signal(s, lambda *_: None)
      threading.Thread(target=self._watch, args=(r,), daemon=True, name='stop-watch').start()
    return self

  def _watch(self, r):
    while True:
      try:
        data = os.read(r, 64)
      except OSError:
        return
      if not data:
        os.close(r)
        return
      for signum in data:
        if signum in self.SIGNALS:
          self._on_signal(signum)

  def _on_signal(self, signum):
    what, name, code = self.SIGNALS[signum]
    if self.armed and self.signum is None:
      self.signum = signum
      return
    if self.armed and signum not in self.URGENT_AGAIN:
      print(f'{what} again ({name}): already stopping, the save goes on.', file=sys.stderr,
            flush=True)
      return
    self._on_abort()
    print(f'{what} ({name}) before training started: nothing to save.' if not self.armed
          else f'{what} again ({name}): stopping now, not waiting for the save; '
          f'{self._resume_point()}', file=sys.stderr, flush=True)
    os._exit(code)  # pylint: disable=protected-access

  def _resume_point(self) -> str:
    steps = sorted(int(n) for n in os.listdir(self.ckpt_dir) if n.isdigit()) \
        if self.ckpt_dir and os.path.isdir(self.ckpt_dir) else []
    if not steps:
      return 'no checkpoint is committed yet: the rerun starts from scratch.'
    return f'the rerun resumes from the last committed checkpoint, step {steps[-1]}.'

  def requested(self) -> bool:
    """A signal arrived (this process; the evaluation's check between batches)."""
    return self.signum is not None

  def reached(self, step: int) -> bool:
    """All processes stop at this step."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested()

  def stopped(self, where: str, ckpt_dir: str, step: int, todo: str) -> errors.Stopped:
    what, name, code = self.SIGNALS.get(self.signum, self.SIGNALS[signal.SIGTERM])
    return errors.Stopped(f'{what} ({name}) {where}: checkpoint {step} saved in {ckpt_dir}; '
                          f'rerun the same command to {todo}.', code)

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    if self._pipe is not None:
      signal.set_wakeup_fd(self._old_fd)
      os.close(self._pipe[1])  # the watcher reads EOF and ends


@contextlib.contextmanager
def hold_workdir(workdir: str):
  """This run (process 0 for all of its processes) holds `workdir`'s lock."""
  created = workdir_lib.ensure(workdir)
  lock = workdir_lib.WorkdirLock(workdir, command=' '.join(sys.argv))
  err = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except errors.UserError as e:
      err = e
  if jax.process_count() > 1:  # every process stops if process 0 could not take it
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if not ok and err is None:
      err = errors.WorkdirBusy(f'process 0 could not take the lock of {workdir}; see its '
                               'output.')
  if err is not None:
    raise err
  failed = True
  try:
    yield lock
    failed = False
  finally:
    if jax.process_index() == 0:
      lock.release()
      if failed:  # e.g. refused by the data or the devices: no empty workdir left behind
        workdir_lib.remove_created(created)


def read_json(path: str, what: str = '') -> dict:
  """A JSON file of the workdir, or one line naming it and the problem."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise errors.UserError(f'{path} is not valid JSON ({e.msg}, line {e.lineno}){what}.') from e
  except UnicodeDecodeError as e:
    raise errors.UserError(f'{path} is not a text file{what}.') from e


def check_resume_config(config, workdir: str) -> tuple[list[str], list[str]]:
  """Refuses to resume a run whose saved config differs in model-defining
  fields (config_lib.MODEL_DEFINING) unless `allow_config_change`. Returns
  (changed fields, the model-defining ones among them, allowed): a new lr or
  total_steps is a legitimate resume."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return [], []
  fix = ': it records the run\'s config; restore it from a copy, or delete it to resume ' \
        'without comparing configs'
  saved = read_json(path, fix)
  if not isinstance(saved, dict) or not isinstance(saved.get('config'), dict):
    raise errors.UserError(f'{path} holds no run config ("config" key){fix}.')
  saved = saved['config']
  want = json.loads(json.dumps(config.to_dict()))
  changed = [k for k in config_lib.config_diff(saved, want) if k != 'allow_config_change']
  defining = config_lib.model_defining(changed, saved, want)
  if defining and not config.get('allow_config_change', False):
    shown = ', '.join(f'{k} ({config_lib.lookup(saved, k)!r} -> '
                      f'{config_lib.lookup(config.to_dict(), k)!r})'
                      for k in defining[:4]) + (' ...' if len(defining) > 4 else '')
    raise errors.ConfigError(f'{workdir} holds a run of another model: {shown}. Use another '
                             '--workdir, or --config.allow_config_change=True to resume anyway.')
  return changed, defining


def _mean_metrics(fetched: list[dict]) -> dict:
  return {k: float(np.mean([x[k] for x in fetched])) for k in fetched[0]}


def param_overview(params) -> tuple[str, str]:
  """(one line: parameters per top-level module and in all; a table of every
  parameter: name, shape, count), as big_vision logs at the start of a run."""
  rows = [(name, tuple(leaf.shape), int(np.prod(leaf.shape, dtype=np.int64)))
          for name, leaf in checkpointing.flatten(params).items()]
  groups = {}
  for name, _, n in rows:
    groups[name.split('/')[0]] = groups.get(name.split('/')[0], 0) + n
  total = sum(n for *_, n in rows)
  line = ('parameters: ' + ', '.join(f'{g} {n:,}' for g, n in groups.items())
          + f'; total {total:,} in {len(rows)} arrays')
  width = max(len(name) for name, *_ in rows)
  table = '\n'.join([f'{name:<{width}}  {str(shape):<22} {n:>12,}' for name, shape, n in rows]
                    + [f'{"total":<{width}}  {"":<22} {total:>12,}'])
  return line, table + '\n'


def write_json(path, obj):
  _write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _write_text(path, text: str):
  if metrics_lib.is_main():
    tmp = path + '.tmp'
    try:
      with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
      os.replace(tmp, path)
    except OSError as e:
      raise errors.UserError(f'cannot write {path}: {e.strerror}; free the space or fix the '
                             'directory, then rerun the same command.') from e


def final_line(final: dict, target: float = 0.0) -> str:
  verdict = ''
  if target:
    verdict = (f' | target {target:.0%} ' +
               ('reached' if final['test_top1'] >= target else 'NOT reached'))
  return (f'final: test_top1 {final["test_top1"]:.2%} | test_top5 {final["test_top5"]:.2%} | '
          f'test_loss {final["test_loss"]:.4f} | steps {final["steps"]} | '
          f'wall_time_s {final["wall_time_s"]:.1f}{verdict}')


def finished_run(workdir: str, latest_step: int | None, total_steps: int) -> dict | None:
  """The final metrics of a run in `workdir` that already finished `total_steps`."""
  path = os.path.join(workdir, 'final_metrics.json')
  if latest_step != total_steps or not os.path.exists(path):
    return None
  final = read_json(path, ': delete it to evaluate the final checkpoint again')
  return final if final.get('steps') == total_steps else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates each epoch, checkpoints, and returns the final metrics.

  Rerunning with the same workdir resumes from the latest intact checkpoint;
  rerunning a finished run changes nothing. One run at a time holds a workdir.
  """
  t_start = time.time()
  validation.validate_config(config)
  validation.validate_start(config)
  init = initial_weights(config, workdir)  # before anything is written
  with hold_workdir(workdir) as lock, StopWatch(on_abort=lock.release) as watch:
    return _train_and_evaluate(config, workdir, watch, t_start, init)


def initial_weights(config, workdir: str):
  """(arrays, log lines) of `config.init_from` for a run that starts fresh;
  None without init_from (or init_from='none') or when the workdir holds a
  checkpoint to resume. UserError for a bad source or one that does not fit
  the model."""
  if not pretrained.requested(config) or checkpointing.committed_steps(
      os.path.join(workdir, 'checkpoints')):
    return None
  return pretrained.load(config, nnx.eval_shape(lambda: models.build_model(config.model)))


def fit_eval_batch(batch: int, n: int, mesh, log=None) -> int:
  """eval_batch_size, at most the `n` test examples rounded up to the data-
  parallel devices: evaluation pads its last batch, so a larger one only
  spends memory (100000 on a 359-example split would be OOM-killed at the
  first evaluation, after training). The config keeps its value."""
  devices = sharding.data_size(mesh)
  fit = min(batch, -(-n // devices) * devices)
  if fit < batch and log is not None:
    log(f'eval_batch_size={batch} is larger than the {n} test examples: evaluating in '
        f'batches of {fit}.')
  return fit


def _train_and_evaluate(config, workdir, watch, t_start, init=None) -> dict:
  log = metrics_lib.log
  mesh = sharding.mesh_from_config(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')

  train_src = data_lib.get_source(config.data, 'train')
  test_src = data_lib.get_source(config.data, 'test')
  validation.validate_data(config, train_src, test_src)
  eval_batch = fit_eval_batch(config.eval_batch_size, len(test_src), mesh, log)
  test_tf = data_lib.make_transform(config.data, test_src, train=False)
  loader = data_lib.Loader(train_src, global_batch=config.batch_size, seed=config.seed,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(),
                           transform=data_lib.make_transform(config.data, train_src, train=True),
                           workers=config.data.get('workers', 0))
  spe = loader.steps_per_epoch
  total_steps = (config.total_steps if config.total_steps > 0
                 else (config.epochs + config.cooldown_epochs) * spe)
  profile = tuple(config.get('profile_steps', ()) or ())
  if profile and profile[1] > total_steps:  # else no trace would be written, silently
    raise errors.ConfigError(f'profile_steps={profile} ends beyond this run\'s {total_steps} '
                             f'steps; choose (first, last) with last <= {total_steps}, or () for '
                             'none.')
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    keep=config.ckpt_keep)
  try:
    changed, defining = (check_resume_config(config, workdir) if ckpt.latest_step() is not None
                         else ([], []))
    done = finished_run(workdir, ckpt.latest_step(), total_steps)
    if done is not None and not defining:  # another model, allowed: its checkpoint decides
      ignored = f' (changed fields ignored: {", ".join(changed)})' if changed else ''
      log(f'{workdir} holds a finished run ({total_steps} steps): nothing changed{ignored}. '
          'Evaluate it again with eval.py, or raise total_steps / epochs to train on.')
      log(final_line(done, config.get('target_top1', 0.0)))
      return done
    if (ckpt.latest_step() or 0) > total_steps:  # before restoring (or compiling) anything
      raise errors.ConfigError(f'the checkpoint in {ckpt.directory} is at step '
                               f'{ckpt.latest_step()}, beyond this run\'s total_steps='
                               f'{total_steps}; raise total_steps / epochs or use another '
                               '--workdir.')
    if changed:
      log(f'Resuming with changed fields: {", ".join(changed)}.')
    return _train_loop(config, workdir, watch, t_start, mesh, loader, train_src, test_src,
                       test_tf, ckpt, total_steps, init, eval_batch)
  finally:
    ckpt.close(quiet=True)


def _train_loop(config, workdir, watch, t_start, mesh, loader, train_src, test_src, test_tf,
                ckpt, total_steps, init=None, eval_batch=None) -> dict:
  log = metrics_lib.log
  spe = loader.steps_per_epoch
  exp = build(config, mesh, spe)
  # The per-layer firing rates of each evaluation go to TensorBoard.
  train_step = sharding.synced_first_call(make_train_step(exp), 'train step')
  eval_step = sharding.synced_first_call(
      make_eval_step(exp, firing_rates=config.get('tensorboard', True)), 'eval step')
  ema_eval_step = (sharding.synced_first_call(make_eval_step(exp, ema=True), 'ema eval step')
                   if ema_decay(config) else None)
  # Evaluations stop between batches on a signal (one process: with several,
  # only the train loop's sync point is common to all of them).
  stop = watch.requested if jax.process_count() == 1 else None

  def evaluate_all(state):
    """Test metrics of the weights and, with ema_decay, 'ema_'-prefixed of their EMA."""
    return evaluate(eval_step, state, test_src, mesh, eval_batch or config.eval_batch_size,
                    test_tf, ema_step=ema_eval_step, stop=stop)

  run_info = {'bn_scope': config.bn_scope, 'bn_groups': exp.bn_groups,
              'devices': mesh.size, 'mesh': dict(mesh.shape), 'processes': jax.process_count(),
              'global_batch': config.batch_size,
              'per_device_batch': config.batch_size // sharding.data_size(mesh),
              'num_params': exp.num_params, 'steps_per_epoch': spe,
              'total_steps': total_steps}
  state, meta = None, None
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore_intact(exp.abstract_state, log=log)
  if state is None:
    state, meta = exp.init_state(), {}
    if init is not None:  # config.init_from: weights only; the optimizer starts fresh
      state = pretrained.apply(state, init[0])
      for line in init[1]:
        log(line)
  else:
    log(f'Resuming from {ckpt.directory}/{int(jax.device_get(state["step"]))}.')
  start = int(jax.device_get(state['step']))
  if start > total_steps:
    raise errors.ConfigError(f'the checkpoint in {ckpt.directory} is at step {start}, beyond '
                             f'this run\'s total_steps={total_steps}; raise total_steps / epochs '
                             'or use another --workdir.')
  # Only a config that restored (or initialised) becomes the run's record.
  write_json(os.path.join(workdir, 'config.json'),
              {'config': config.to_dict(), 'run': run_info})
  overview, table = param_overview(exp.abstract_state['params'])
  _write_text(os.path.join(workdir, 'params.txt'), table)

  log(f'{models.describe(config.model)}, T={config.model.T}, '
      f'{exp.num_params:,} params, {config.model.dtype}; data {config.data.name} '
      f'({len(train_src)} train / {len(test_src)} test); batch {config.batch_size} on '
      f'{mesh.size} {jax.devices()[0].platform} devices, BN {config.bn_scope}; '
      f'{total_steps} steps ({spe}/epoch).')
  log(f'{overview} (each: {workdir}/params.txt)')
  # An evaluation that a signal interrupted (meta) or the final one is redone:
  # its rows, if a kill left any, are dropped.
  eval_pending = bool(meta.get('eval_pending')) or start == total_steps
  writer = metrics_lib.MetricWriter(workdir, resume_step=start, redo_eval=eval_pending,
                                    tensorboard=config.get('tensorboard', True))
  writer.hparams(json.loads(json.dumps(config.to_dict())))
  pending, t_log, step_log = [], time.time(), start
  eval_every = config.eval_every_epochs * spe if config.eval_every_epochs > 0 else 0
  ckpt_every = config.ckpt_every_steps if config.ckpt_every_steps > 0 else spe
  # Metrics fetched since the last log line; a checkpoint keeps them, so that a
  # resumed run logs the same averages as an uninterrupted one.
  fetched = [{k: np.dtype(dt).type(v) for k, (v, dt) in x.items()}
             for x in meta.get('unlogged', [])]

  def fetch_and_check(step):
    """Fetches pending metrics (a host round-trip) and stops on a bad loss."""
    fetched.extend(jax.device_get(pending))
    pending.clear()
    for key, what in (('loss', 'training loss'), ('grad_norm', 'gradient')):
      if fetched and not np.all(np.isfinite([x[key] for x in fetched])):
        ckpt.wait()
        last = ckpt.latest_step()
        raise errors.Diverged(
            f'non-finite {what} by step {step}; stopping. ' +
            (f'The last good checkpoint is step {last} in {ckpt.directory}.' if last is not None
             else 'No checkpoint was saved yet.') + ' Lower optimizer.lr, or check the data.')

  def save(step, **meta):
    fetch_and_check(step)  # never save a state that went non-finite
    unlogged = [{k: (float(v), np.asarray(v).dtype.name) for k, v in x.items()} for x in fetched]
    ckpt.save(step, state, {'step': step, **meta, 'unlogged': unlogged}, force=True)

  def periodic_eval(step):
    ev = evaluate_all(state)
    writer.firing_rates(step, ev.pop('firing_rates', {}))
    log(f'eval epoch {step // spe} | test_top1 {ev["top1"]:.4f} | '
        f'test_top5 {ev["top5"]:.4f} | test_loss {ev["loss"]:.4f}' +
        (f' | ema test_top1 {ev["ema_top1"]:.4f}' if 'ema_top1' in ev else ''))
    writer.write(step, **{f'test_{k}': v for k, v in ev.items()})

  def stop_at(step, eval_pending=False):
    """Saves the step reached (and whether its evaluation is still owed) and stops."""
    if ckpt.latest_step() != step:
      save(step, eval_pending=eval_pending)
    ckpt.wait()
    writer.close()
    return watch.stopped(f'at step {step}/{total_steps}', ckpt.directory, step, 'resume')

  step = start
  batches = loader.iterate(start, total_steps)  # batch of step s+1 = loader.batch(s)
  watch.ckpt_dir = ckpt.directory
  profile = tuple(config.get('profile_steps', ()) or ())
  if profile and start >= profile[0]:
    log(f'profile_steps={profile}: this run resumes after step {profile[0]}; no profile is '
        'taken.')
    profile = ()
  tracing = False
  try:
    if eval_pending and start < total_steps:  # the evaluation a signal interrupted
      watch.armed = True
      try:
        periodic_eval(start)
      except EvalInterrupted:
        raise stop_at(start, eval_pending=True) from None
    for step, local in zip(range(start + 1, total_steps + 1), batches):
      if profile and step == profile[0]:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        tracing = True
      state, m = train_step(state, sharding.global_batch(local, mesh))
      if tracing and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
        log(f'profile of steps {profile[0]}-{profile[1]} -> {workdir}/profile (TensorBoard\'s '
            'profile plugin or Perfetto)')
      pending.append(m)
      watch.armed = True  # compiled: from now on a signal saves the step reached
      if jax.process_count() == 1:  # several: at the next save, which all of them reach
        ckpt.poll()  # a failed background save stops the run now, not at the next save
      if step % config.log_every_steps == 0 or step == total_steps:
        fetch_and_check(step)
        avg = _mean_metrics(fetched)
        fetched.clear()
        now = time.time()
        ips = (step - step_log) * config.batch_size / max(now - t_log, 1e-9)
        eta = (total_steps - step) * config.batch_size / max(ips, 1e-9)
        log(f'step {step}/{total_steps} | epoch {step / spe:.2f} | loss {avg["loss"]:.4f} | '
            f'top1 {avg["top1"]:.3f} | lr {avg["lr"]:.2e} | {ips:.1f} img/s | '
            f'ETA {metrics_lib.fmt_duration(eta)}')
        writer.write(step, **{f'train_{k}': v for k, v in avg.items()}, images_per_s=ips)
        t_log, step_log = now, step
      if step == total_steps:
        break
      if eval_every and step % eval_every == 0:
        try:
          periodic_eval(step)
        except EvalInterrupted:
          raise stop_at(step, eval_pending=True) from None
      if step % ckpt_every == 0:
        save(step)
      if watch.reached(step):
        raise stop_at(step)
  except BaseException:
    if tracing:
      jax.profiler.stop_trace()
    batches.close()
    ckpt.wait_quietly()  # a crash never loses a checkpoint already being written
    writer.close()
    raise
  batches.close()

  # The final checkpoint is committed before the final evaluation: an
  # evaluation that fails or is stopped loses nothing trained.
  fetch_and_check(total_steps)
  if ckpt.latest_step() != total_steps:
    ckpt.save(total_steps, state, {'step': total_steps}, force=True)
  watch.armed = True  # a signal from here on: stop with the final checkpoint committed
  ckpt.wait()
  if watch.requested():
    writer.close()
    raise watch.stopped(f'after step {total_steps}/{total_steps}', ckpt.directory,
                        total_steps, 'evaluate it')
  try:
    ev = evaluate_all(state)
  except EvalInterrupted:
    writer.close()
    raise watch.stopped('during the final evaluation', ckpt.directory, total_steps,
                        'evaluate it') from None
  writer.firing_rates(total_steps, ev.pop('firing_rates', {}))
  final = {'test_top1': ev['top1'], 'test_top5': ev['top5'], 'test_loss': ev['loss'],
           'test_examples': ev['count'], 'steps': total_steps,
           **{f'test_{k}': v for k, v in ev.items() if k.startswith('ema_')},
           'steps_this_run': total_steps - start,
           'wall_time_s': round(time.time() - t_start, 2),
           'paper_top1': config.get('paper_top1', 0.0), **run_info}
  writer.write(total_steps, **{f'test_{k}': v for k, v in ev.items()})
  writer.close()
  write_json(os.path.join(workdir, 'final_metrics.json'), final)
  log(final_line(final, config.get('target_top1', 0.0)))
  return final


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} the --workdir of a '
                            'training run? Or pass --config explicitly.')
  saved = read_json(path, ': pass --config explicitly')
  if not isinstance(saved, dict) or not isinstance(saved.get('config'), dict):
    raise errors.UserError(f'{path} holds no run config ("config" key); pass --config '
                           'explicitly.')
  saved = saved['config']

  def tuples(x):  # JSON turned tuples into lists; configs use tuples.
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
  return ml_collections.ConfigDict(tuples(saved))


def model_differences(config, workdir: str) -> str:
  """One warning line (eval.py --config) naming the fields where `config.model`
  differs from the model of the run in `workdir` (its config.json), else ''.
  Not an error: evaluating a run at another T is an experiment; a silent one
  would be a mistake."""
  try:
    run = load_run_config(workdir)
  except errors.USER_ERRORS:  # no or no readable config.json: nothing to compare with
    return ''

  def flat(d, prefix='model'):
    items = {}
    for k, v in (d.items() if isinstance(d, dict) else ()):
      if isinstance(v, dict):
        items.update(flat(v, f'{prefix}.{k}'))
      else:
        items[f'{prefix}.{k}'] = tuple(v) if isinstance(v, list) else v
    return items
  ours = flat(config.model.to_dict())
  theirs = flat(run.model.to_dict() if 'model' in run else {})
  diff = [f'{k} ({theirs.get(k, "unset")} -> {ours.get(k, "unset")})'
          for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
  if not diff:
    return ''
  return (f'warning: --config differs from the run\'s {workdir}/config.json in '
          f'{", ".join(diff)}: evaluating with the --config model.')


def _restore(config: ml_collections.ConfigDict, workdir: str, mesh, step: int | None):
  """The eval experiment and the restored state of a checkpoint of `workdir`;
  an unreadable checkpoint is named, with the steps that do read."""
  # Per-device BN statistics only matter in training; evaluation uses running stats.
  eval_config = ml_collections.ConfigDict(config.to_dict())
  eval_config.bn_scope = 'global'
  exp = build(eval_config, mesh, steps_per_epoch=1)
  directory = os.path.join(workdir, 'checkpoints')

  def read(root, s):
    ckpt = checkpointing.Checkpointer(root, create=False)
    try:
      return ckpt.restore(exp.abstract_state, s)
    finally:
      ckpt.close(quiet=True)

  try:  # the run may still be training, deleting old steps as it goes
    state, _ = checkpointing.read_committed(directory, read, step=step, workdir=workdir)
  except checkpointing.RunBeingWritten:
    raise
  except errors.CheckpointError as e:
    ckpt = checkpointing.Checkpointer(directory, create=False)
    try:
      bad = ckpt.latest_step() if step is None else step
      intact = ckpt.intact_steps(exp.abstract_state, exclude=(bad,))
    finally:
      ckpt.close(quiet=True)
    raise errors.CheckpointError(
        f'{errors.one_line(e)}; ' + (f'intact steps: {", ".join(map(str, intact))}: evaluate '
                                     f'one with --step={intact[-1]}.' if intact else
                                     'no other step reads either.')) from e
  return exp, state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        split: str = 'test', step: int | None = None,
                        num_devices: int | None = None, ema: bool = False) -> dict:
  """top-1, top-5 and loss of a checkpoint of `workdir` on `split`, on any mesh
  (ema: of the weights' moving average)."""
  validation.validate_config(config)
  mesh = sharding.make_mesh(num_devices if num_devices else config.num_devices)
  source = data_lib.get_source(config.data, split)
  validation.validate_split(config, source, split)
  batch = config.eval_batch_size
  n = sharding.data_size(mesh)
  batch = fit_eval_batch(-(-batch // n) * n, len(source), mesh)
  exp, state = _restore(config, workdir, mesh, step)
  res = evaluate(sharding.synced_first_call(make_eval_step(exp, ema=ema), 'eval step'),
                 state, source, mesh, batch,
                 data_lib.make_transform(config.data, source, train=False))
  return {'split': split, 'step': int(jax.device_get(state['step'])), **res}


def restore_model(config: ml_collections.ConfigDict, workdir: str,
                  step: int | None = None) -> tuple[nnx.Module, int]:
  """The model of a checkpoint of `workdir` (eval mode, on one device) and its step."""
  mesh = sharding.make_mesh(1)
  exp, state = _restore(config, workdir, mesh, step)
  model = nnx.merge(exp.graphdef_eval, state['params'], state['batch_stats'])
  return model, int(jax.device_get(state['step']))
