"""The training loop: `train_and_evaluate` trains, evaluates, checkpoints and
resumes a run in its workdir (importable, testable; train.py is its CLI).

Where the rest lives: the experiment and the jitted train / eval steps in
`experiment`, the losses and the EMA in `losses`, stopping on a signal in
`preemption`, the workdir's lock and files in `workdir`, evaluating a saved
checkpoint in `restore`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from spikeformer_jax import checkpointing
from spikeformer_jax import compile_cache
from spikeformer_jax import data as data_lib
from spikeformer_jax import errors
from spikeformer_jax import losses
from spikeformer_jax import metrics as metrics_lib
from spikeformer_jax import models
from spikeformer_jax import preemption
from spikeformer_jax import pretrained
from spikeformer_jax import sharding
from spikeformer_jax import experiment
from spikeformer_jax import storage
from spikeformer_jax import validation
from spikeformer_jax import workdir as workdir_lib

Preempted = errors.Stopped  # the name older callers catch


def param_overview(params) -> tuple[str, str]:
  """(one line: parameters per top-level module and in all; a table of every
  parameter: name, shape, count), as big_vision logs at the start of a run."""
  rows = [
    (name, tuple(leaf.shape), int(np.prod(leaf.shape, dtype=np.int64)))
    for name, leaf in checkpointing.flatten(params).items()
  ]
  groups: dict[str, int] = {}
  for name, _, n in rows:
    groups[name.split('/')[0]] = groups.get(name.split('/')[0], 0) + n
  total = sum(n for *_, n in rows)
  line = (
    'parameters: '
    + ', '.join(f'{g} {n:,}' for g, n in groups.items())
    + f'; total {total:,} in {len(rows)} arrays'
  )
  width = max(len(name) for name, *_ in rows)
  table = '\n'.join(
    [f'{name:<{width}}  {str(shape):<22} {n:>12,}' for name, shape, n in rows]
    + [f'{"total":<{width}}  {"":<22} {total:>12,}']
  )
  return line, table + '\n'


def final_line(final: dict, target: float = 0.0) -> str:
  verdict = ''
  if target:
    verdict = f' | target {target:.0%} ' + (
      'reached' if final['test_top1'] >= target else 'NOT reached'
    )
  return (
    f'final: test_top1 {final["test_top1"]:.2%} | test_top5 {final["test_top5"]:.2%} | '
    f'test_loss {final["test_loss"]:.4f} | steps {final["steps"]} | '
    f'wall_time_s {final["wall_time_s"]:.1f}{verdict}'
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates each epoch, checkpoints, and returns the final metrics.

  Rerunning with the same workdir resumes from the latest intact checkpoint;
  rerunning a finished run changes nothing. One run at a time holds a workdir.
  """
  t_start = time.time()
  storage.check(workdir)  # s3:// and the like: one line, before anything starts
  validation.validate_config(config)
  validation.validate_start(config)
  compile_cache.setup(config, workdir, metrics_lib.log)  # before the first compile
  init = initial_weights(config, workdir)  # before anything is written
  with (
    workdir_lib.hold_workdir(workdir) as lock,
    preemption.StopSignals(on_abort=lock.release) as stop_signals,
  ):
    return _train_and_evaluate(config, workdir, stop_signals, t_start, init)


def initial_weights(config, workdir: str):
  """(arrays, log lines) of `config.init_from` for a run that starts fresh;
  None without init_from (or init_from='none') or when the workdir holds a
  checkpoint to resume. UserError for a bad source or one that does not fit
  the model."""
  if not pretrained.requested(config) or checkpointing.committed_steps(
    storage.join(workdir, 'checkpoints')
  ):
    return None
  return pretrained.load(config, nnx.eval_shape(lambda: models.build_model(config.model)))


def _train_and_evaluate(config, workdir, stop_signals, t_start, init=None) -> dict:
  log = metrics_lib.log
  mesh = sharding.mesh_from_config(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')

  train_src = data_lib.get_source(config.data, 'train')
  test_src = data_lib.get_source(config.data, 'test')
  validation.validate_data(config, train_src, test_src)
  eval_batch = experiment.fit_eval_batch(config.eval_batch_size, len(test_src), mesh, log)
  test_tf = data_lib.make_transform(config.data, test_src, train=False)
  loader = data_lib.Loader(
    train_src,
    global_batch=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    transform=data_lib.make_transform(config.data, train_src, train=True),
    workers=config.data.get('workers', 0),
  )
  total_steps = (
    config.total_steps
    if config.total_steps > 0
    else (config.epochs + config.cooldown_epochs) * loader.steps_per_epoch
  )
  profile = tuple(config.get('profile_steps', ()) or ())
  if profile and profile[1] > total_steps:  # else no trace would be written, silently
    raise errors.ConfigError(
      f'profile_steps={profile} ends beyond this run\'s {total_steps} steps; '
      f'choose (first, last) with last <= {total_steps}, or () for none.'
    )
  ckpt = checkpointing.Checkpointer(storage.join(workdir, 'checkpoints'), keep=config.ckpt_keep)
  try:
    changed, defining = (
      workdir_lib.check_resume_config(config, workdir)
      if ckpt.latest_step() is not None
      else ([], [])
    )
    done = workdir_lib.finished_run(workdir, ckpt.latest_step(), total_steps)
    if done is not None and not defining:  # another model, allowed: its checkpoint decides
      ignored = f' (changed fields ignored: {", ".join(changed)})' if changed else ''
      log(
        f'{workdir} holds a finished run ({total_steps} steps): nothing changed{ignored}. '
        'Evaluate it again with eval.py, or raise total_steps / epochs to train on.'
      )
      log(final_line(done, config.get('target_top1', 0.0)))
      return done
    # Before restoring or compiling anything; a resume falls back to older steps only.
    if (ckpt.latest_step() or 0) > total_steps:
      raise errors.ConfigError(
        f'the checkpoint in {ckpt.directory} is at step {ckpt.latest_step()}, '
        f'beyond this run\'s total_steps={total_steps}; raise total_steps / '
        'epochs or use another --workdir.'
      )
    if changed:
      log(f'Resuming with changed fields: {", ".join(changed)}.')
    return _train_loop(
      config,
      workdir,
      stop_signals,
      t_start,
      mesh,
      loader,
      train_src,
      test_src,
      test_tf,
      ckpt,
      total_steps,
      init,
      eval_batch,
    )
  finally:
    ckpt.close(quiet=True)


class _TrainMetrics:
  """The train step's metrics between two log lines: `pending` still on the
  device (fetching them is a host round-trip, done at log lines and saves),
  `fetched` on the host. A checkpoint keeps the fetched ones (`unlogged`), so
  that a resumed run logs the same averages as an uninterrupted one."""

  def __init__(self, unlogged: list, step: int):
    self.pending: list[dict] = []
    self.fetched = [{k: np.dtype(dt).type(v) for k, (v, dt) in x.items()} for x in unlogged]
    self.t_log, self.step_log = time.time(), step  # of the last log line: the throughput

  def add(self, step_metrics: dict):
    self.pending.append(step_metrics)

  def fetch_and_check(self, step: int, ckpt: checkpointing.Checkpointer):
    """Fetches the pending metrics and stops on a bad loss."""
    self.fetched.extend(jax.device_get(self.pending))
    self.pending = []
    for key, what in (('loss', 'training loss'), ('grad_norm', 'gradient')):
      if self.fetched and not np.all(np.isfinite([x[key] for x in self.fetched])):
        ckpt.wait()
        last = ckpt.latest_step()
        raise errors.Diverged(
          f'non-finite {what} by step {step}; stopping. '
          + (
            f'The last good checkpoint is step {last} in {ckpt.directory}.'
            if last is not None
            else 'No checkpoint was saved yet.'
          )
          + ' Lower optimizer.lr, or check the data.'
        )

  def unlogged(self) -> list:
    """The fetched metrics as a checkpoint's JSON keeps them (value, dtype)."""
    return [{k: (float(v), np.asarray(v).dtype.name) for k, v in x.items()} for x in self.fetched]

  def log_line(self, step: int, batch_size: int) -> tuple[dict, float]:
    """(the mean of every metric since the last log line, images per second),
    and starts the next line."""
    avg = {k: float(np.mean([x[k] for x in self.fetched])) for k in self.fetched[0]}
    now = time.time()
    ips = (step - self.step_log) * batch_size / max(now - self.t_log, 1e-9)
    self.fetched, self.t_log, self.step_log = [], now, step
    return avg, ips


@dataclasses.dataclass
class _Run:
  """What the loop's helpers share, fixed before the first step."""

  config: ml_collections.ConfigDict
  ckpt: checkpointing.Checkpointer
  writer: metrics_lib.MetricWriter
  stop_signals: preemption.StopSignals
  evaluate: Callable[[dict], dict]  # state -> test metrics (and the EMA's, 'ema_'-prefixed)
  total_steps: int
  steps_per_epoch: int


class _Profiler:
  """config.profile_steps=(first, last): a trace of those steps to
  workdir/profile (none for a run that resumes after `first`). In a store the
  trace is written to a local directory and uploaded when it ends (the
  profiler writes through the local file system only)."""

  def __init__(self, config, workdir: str, start: int):
    self.steps = tuple(config.get('profile_steps', ()) or ())
    self.directory = storage.join(workdir, 'profile')
    self._local: str | None = None  # a store: where the trace is written first
    self.tracing = False
    if self.steps and start >= self.steps[0]:
      metrics_lib.log(
        f'profile_steps={self.steps}: this run resumes after step '
        f'{self.steps[0]}; no profile is taken.'
      )
      self.steps = ()

  def before(self, step: int):
    if self.steps and step == self.steps[0]:
      if storage.is_remote(self.directory):
        self._local = tempfile.mkdtemp(prefix='spikeformer-profile-')
      jax.profiler.start_trace(self._local or self.directory)
      self.tracing = True

  def after(self, step: int, state):
    if self.tracing and step == self.steps[1]:
      jax.block_until_ready(state)
      self.abort()
      if self._local:
        storage.put_tree(self._local, self.directory)
        shutil.rmtree(self._local, ignore_errors=True)
      metrics_lib.log(
        f'profile of steps {self.steps[0]}-{self.steps[1]} -> {self.directory} '
        '(TensorBoard\'s profile plugin or Perfetto)'
      )

  def abort(self):
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def _train_loop(
  config,
  workdir,
  stop_signals,
  t_start,
  mesh,
  loader,
  train_src,
  test_src,
  test_tf,
  ckpt,
  total_steps,
  init=None,
  eval_batch=None,
) -> dict:
  """Builds the experiment, resumes or starts the state, records the run,
  trains (logging, evaluating, saving and stopping on a signal as configured),
  then commits the final checkpoint and evaluates it: the final metrics."""
  log = metrics_lib.log
  steps_per_epoch = loader.steps_per_epoch
  exp = experiment.build(config, mesh, steps_per_epoch)
  train_step = sharding.synced_first_call(experiment.make_train_step(exp), 'train step')
  evaluate = _test_evaluation(config, exp, test_src, test_tf, eval_batch, stop_signals)
  run_info = {
    'bn_scope': config.bn_scope,
    'bn_groups': exp.bn_groups,
    'devices': mesh.size,
    'mesh': dict(mesh.shape),
    'processes': jax.process_count(),
    'global_batch': config.batch_size,
    'per_device_batch': config.batch_size // sharding.data_size(mesh),
    'num_params': exp.num_params,
    'steps_per_epoch': steps_per_epoch,
    'total_steps': total_steps,
  }
  state, meta = _restore_or_init(exp, ckpt, init)
  start = int(jax.device_get(state['step']))  # <= total_steps: checked before
  # Only a config that restored (or initialised) becomes the run's record.
  workdir_lib.write_json(
    storage.join(workdir, 'config.json'), {'config': config.to_dict(), 'run': run_info}
  )
  overview, table = param_overview(exp.abstract_state['params'])
  workdir_lib.write_text(storage.join(workdir, 'params.txt'), table)
  log(
    f'{models.describe(config.model)}, T={config.model.T}, '
    f'{exp.num_params:,} params, {config.model.dtype}; data {config.data.name} '
    f'({len(train_src)} train / {len(test_src)} test); batch {config.batch_size} on '
    f'{mesh.size} {jax.devices()[0].platform} devices, BN {config.bn_scope}; '
    f'{total_steps} steps ({steps_per_epoch}/epoch).'
  )
  log(f'{overview} (each: {workdir}/params.txt)')

  # An evaluation that a signal interrupted (meta) or the final one is redone:
  # its rows, if a kill left any, are dropped.
  eval_pending = bool(meta.get('eval_pending')) or start == total_steps
  writer = metrics_lib.MetricWriter(
    workdir, resume_step=start, redo_eval=eval_pending, tensorboard=config.get('tensorboard', True)
  )
  writer.hparams(json.loads(json.dumps(config.to_dict())))
  run = _Run(config, ckpt, writer, stop_signals, evaluate, total_steps, steps_per_epoch)
  metrics = _TrainMetrics(meta.get('unlogged', []), start)
  eval_every = config.eval_every_epochs * steps_per_epoch if config.eval_every_epochs > 0 else 0
  ckpt_every = config.ckpt_every_steps if config.ckpt_every_steps > 0 else steps_per_epoch
  profiler = _Profiler(config, workdir, start)
  batches = loader.iterate(start, total_steps)  # batch of step s+1 = loader.batch(s)
  stop_signals.ckpt_dir = ckpt.directory
  try:
    if eval_pending and start < total_steps:  # the evaluation a signal interrupted
      stop_signals.armed = True
      _evaluate_or_stop(run, state, metrics, start)
    for step, local in zip(range(start + 1, total_steps + 1), batches):
      profiler.before(step)
      # The step's boundaries in an XProf trace (cheap when none is taken).
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, m = train_step(state, sharding.global_batch(local, mesh))
      profiler.after(step, state)
      metrics.add(m)
      stop_signals.armed = True  # compiled: from now on a signal saves the step reached
      if jax.process_count() == 1:  # several: at the next save, which all of them reach
        ckpt.poll()  # a failed background save stops the run now, not at the next save
      if step % config.log_every_steps == 0 or step == total_steps:
        _log_train(run, metrics, step)
      if step == total_steps:
        break
      if eval_every and step % eval_every == 0:
        _evaluate_or_stop(run, state, metrics, step)
      if step % ckpt_every == 0:
        _save(run, state, metrics, step)
      if stop_signals.reached(step):
        raise _stop_at(run, state, metrics, step)
  except BaseException:
    profiler.abort()
    batches.close()
    ckpt.wait_quietly()  # a crash never loses a checkpoint already being written
    writer.close()
    raise
  batches.close()
  final = _final_checkpoint_and_evaluation(run, state, metrics)
  final.update(
    steps_this_run=total_steps - start,
    wall_time_s=round(time.time() - t_start, 2),
    paper_top1=config.get('paper_top1', 0.0),
    **run_info,
  )
  workdir_lib.write_json(storage.join(workdir, 'final_metrics.json'), final)
  log(final_line(final, config.get('target_top1', 0.0)))
  return final


def _test_evaluation(
  config, exp, test_src, test_tf, eval_batch, stop_signals
) -> Callable[[dict], dict]:
  """state -> the test metrics of the weights and, with ema_decay, of their
  EMA ('ema_'-prefixed); each layer's firing rates go to TensorBoard."""
  eval_step = sharding.synced_first_call(
    experiment.make_eval_step(exp, firing_rates=config.get('tensorboard', True)), 'eval step'
  )
  ema_eval_step = (
    sharding.synced_first_call(experiment.make_eval_step(exp, ema=True), 'ema eval step')
    if losses.ema_decay(config)
    else None
  )
  # Evaluations stop between batches on a signal (one process: with several,
  # only the train loop's sync point is common to all of them).
  stop = stop_signals.requested if jax.process_count() == 1 else None
  return functools.partial(
    experiment.evaluate,
    eval_step,
    source=test_src,
    mesh=exp.mesh,
    batch_size=eval_batch or config.eval_batch_size,
    transform=test_tf,
    ema_step=ema_eval_step,
    stop=stop,
  )


def _restore_or_init(exp, ckpt, init) -> tuple[dict, dict]:
  """(train state, checkpoint meta) of the newest intact checkpoint, or a
  fresh state (with `init`'s weights: config.init_from) and {}."""
  log = metrics_lib.log
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore_intact(exp.abstract_state, log=log, backfill=exp.backfill)
    log(f'Resuming from {ckpt.directory}/{int(jax.device_get(state["step"]))}.')
    return state, meta
  state = exp.init_state()
  if init is not None:  # weights only; the optimizer starts fresh
    state = pretrained.apply(state, init[0])
    for line in init[1]:
      log(line)
  return state, {}


def _log_train(run: _Run, metrics: _TrainMetrics, step: int):
  """The train metrics' log line and row: their mean since the last one."""
  metrics.fetch_and_check(step, run.ckpt)
  avg, ips = metrics.log_line(step, run.config.batch_size)
  eta = (run.total_steps - step) * run.config.batch_size / max(ips, 1e-9)
  metrics_lib.log(
    f'step {step}/{run.total_steps} | epoch {step / run.steps_per_epoch:.2f} | '
    f'loss {avg["loss"]:.4f} | top1 {avg["top1"]:.3f} | lr {avg["lr"]:.2e} | '
    f'{ips:.1f} img/s | ETA {metrics_lib.fmt_duration(eta)}'
  )
  run.writer.write(step, **{f'train_{k}': v for k, v in avg.items()}, images_per_s=ips)


def _save(run: _Run, state, metrics: _TrainMetrics, step: int, **meta):
  """Starts saving the state of `step` (never one that went non-finite)."""
  metrics.fetch_and_check(step, run.ckpt)
  run.writer.sync()  # a store: the lines up to `step` are there before its checkpoint
  run.ckpt.save(step, state, {'step': step, **meta, 'unlogged': metrics.unlogged()}, force=True)


def _evaluate_or_stop(run: _Run, state, metrics: _TrainMetrics, step: int):
  """The periodic evaluation at `step`: logged and written; a signal during
  it saves the step (the evaluation owed) and stops."""
  try:
    ev = run.evaluate(state)
  except experiment.EvalInterrupted:
    raise _stop_at(run, state, metrics, step, eval_pending=True) from None
  run.writer.firing_rates(step, ev.pop('firing_rates', {}))
  metrics_lib.log(
    f'eval epoch {step // run.steps_per_epoch} | test_top1 {ev["top1"]:.4f} | '
    f'test_top5 {ev["top5"]:.4f} | test_loss {ev["loss"]:.4f}'
    + (f' | ema test_top1 {ev["ema_top1"]:.4f}' if 'ema_top1' in ev else '')
  )
  run.writer.write(step, **{f'test_{k}': v for k, v in ev.items()})
  run.writer.sync()


def _stop_at(
  run: _Run, state, metrics: _TrainMetrics, step: int, eval_pending: bool = False
) -> errors.Stopped:
  """Saves the step reached (and whether its evaluation is still owed); the
  exception that stops the run."""
  if run.ckpt.latest_step() != step:
    _save(run, state, metrics, step, eval_pending=eval_pending)
  run.ckpt.wait()
  run.writer.close()
  return run.stop_signals.stopped(
    f'at step {step}/{run.total_steps}', run.ckpt.directory, step, 'resume'
  )


def _final_checkpoint_and_evaluation(run: _Run, state, metrics: _TrainMetrics) -> dict:
  """Commits the final checkpoint, then evaluates it: an evaluation that
  fails or is stopped loses nothing trained. The final metrics."""
  total, ckpt, stop_signals, writer = run.total_steps, run.ckpt, run.stop_signals, run.writer
  metrics.fetch_and_check(total, ckpt)
  if ckpt.latest_step() != total:
    writer.sync()  # a store: the lines up to `total` are there before its checkpoint
    ckpt.save(total, state, {'step': total}, force=True)
  stop_signals.armed = True  # a signal from here on: stop with the final checkpoint committed
  ckpt.wait()
  if stop_signals.requested():
    writer.close()
    raise stop_signals.stopped(f'after step {total}/{total}', ckpt.directory, total, 'evaluate it')
  try:
    ev = run.evaluate(state)
  except experiment.EvalInterrupted:
    writer.close()
    raise stop_signals.stopped(
      'during the final evaluation', ckpt.directory, total, 'evaluate it'
    ) from None
  writer.firing_rates(total, ev.pop('firing_rates', {}))
  writer.write(total, **{f'test_{k}': v for k, v in ev.items()})
  writer.close()
  return {
    'test_top1': ev['top1'],
    'test_top5': ev['top5'],
    'test_loss': ev['loss'],
    'test_examples': ev['count'],
    'steps': total,
    **{f'test_{k}': v for k, v in ev.items() if k.startswith('ema_')},
  }
