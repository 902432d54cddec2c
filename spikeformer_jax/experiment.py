"""The experiment (model graphs, optimizer, train state) and the jitted steps.

The model is a Flax NNX module; training is functional: `nnx.split` gives a
static graph definition and the state {params, batch_stats}, and a plain
`jax.jit` step merges, computes and returns the new state, with explicit
shardings (batch on the mesh axis 'data', state replicated) and the old state
donated. The train state is a plain pytree for optax and orbax:

    {'params': nnx.State, 'batch_stats': nnx.State, 'opt_state': ..., 'step': int32,
     'rng': uint32 key data, 'ema': {params, batch_stats} (with config.ema_decay)}

'rng' is the RNG stream of the model's stochastic ops (MSViT's drop path;
future dropout): it starts from `config.seed` (`rng_start`), and every train
step (every micro-step under gradient accumulation) splits it into the key
that step uses, handed to the model as `nnx.Rngs(dropout=key)` when its
`__call__` takes `rngs`, and the next state's. It is replicated like the step,
and saved with the state, so a resumed run continues the same sequence; a
checkpoint written before the stream existed restores with
`rng_for_old_checkpoint(seed, step)` (`Experiment.backfill`). Mixup / CutMix
keep their own keys, fold_in(key(seed), step), as before the stream.

`evaluate` runs an eval step over a whole split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Protocol, cast
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import ml_collections
import optax
from flax import nnx

from spikeformer_jax import checkpointing
from spikeformer_jax import data as data_lib
from spikeformer_jax import errors
from spikeformer_jax import kernels
from spikeformer_jax import losses
from spikeformer_jax import models
from spikeformer_jax import optim
from spikeformer_jax import sharding
from spikeformer_jax import validation
from spikeformer_jax.data import mixup

BN_SCOPES = validation.BN_SCOPES


def input_shape(config) -> tuple:
  """One training example as the input pipeline delivers it: the model's
  image size and channels, with the frames first for event data."""
  m, frames = config.model, tuple(config.data.shape)[:-3]
  return frames + (m.img_size, m.img_size, m.in_channels)


def params_the_loss_reaches(model: nnx.Module, example_shape: tuple):
  """Which parameters the forward reads at all: a pytree of bools like the
  model's params (a liveness pass backwards over the traced forward).

  PyTorch gives a parameter that the forward never touches no gradient, and
  its optimizers then skip it, weight decay included (the official code's
  unused modules, which `model.dead_modules` builds so that its checkpoints
  load). A primitive with an inner program that `live_inputs` does not know
  stops with an error rather than guess.
  """
  graphdef = nnx.graphdef(model)
  params, rest = nnx.state(model, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  closed = jax.make_jaxpr(
    lambda p, r: nnx.merge(graphdef, p, r, copy=True)(
      jnp.zeros((2,) + tuple(example_shape), jnp.float32)
    )
  )(params, rest)
  used = live_inputs(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return jax.tree.unflatten(treedef, used[: len(leaves)])


# Primitives whose inner program maps its inputs and outputs one to one (the
# eqn's invars / outvars are the inner jaxpr's), by name: the parameter that
# holds it. JAX's own dead-code pass treats them the same way.
_CALLS = {
  'pjit': 'jaxpr',
  'jit': 'jaxpr',
  'closed_call': 'call_jaxpr',
  'call': 'call_jaxpr',
  'core_call': 'call_jaxpr',
  'remat2': 'jaxpr',
  'remat': 'jaxpr',
  'checkpoint': 'jaxpr',
  'shard_map': 'jaxpr',
}
# Inner programs whose every input counts once any output does: custom
# derivatives (their rule may read what the primal does not), while loops
# (their condition reads the carry).
_ALL_IN = ('custom_jvp_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr', 'while')


def _jaxpr(x):
  """The open Jaxpr of a Jaxpr or ClosedJaxpr param."""
  return x.jaxpr if isinstance(x, jex_core.ClosedJaxpr) else x


def _has_inner_program(eqn) -> bool:
  for v in eqn.params.values():
    for x in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(x, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
        return True
  return False


def _scan_groups(eqn) -> tuple[int, int]:
  """(consts, carry) counts of a scan's invars (consts, carry, xs). jax <= 0.11
  names them in params; jax 0.12 gives the groups' flat trees (`ft_in`: after
  forwarding loop-invariant carries as consts), whose body has as many
  invars and outvars as the eqn."""
  p = eqn.params
  if 'num_consts' in p:
    return p['num_consts'], p['num_carry']
  try:
    consts, carry, _ = (len(g) for g in p['ft_in'].unpack())
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise NotImplementedError(
      f'experiment.live_inputs cannot read this JAX version\'s scan params {sorted(p)}'
    ) from e
  body = _jaxpr(p['jaxpr'])
  if len(body.invars) != len(eqn.invars) or len(body.outvars) != len(eqn.outvars):
    raise NotImplementedError('experiment.live_inputs: a scan whose body and eqn differ in arity')
  return consts, carry


def live_inputs(jaxpr, live_outputs) -> list[bool]:
  """Which invars of `jaxpr` (a jax.extend.core.Jaxpr) reach the outputs
  marked in `live_outputs`: a backward pass over its eqns, into the inner
  programs of calls, scan and cond. What JAX's (private) dead-code
  elimination computes; NotImplementedError for an inner program of a kind
  it does not know, rather than a guess."""
  live: set = set()

  def mark(atoms, flags):
    for v, f in zip(atoms, flags):
      if f and isinstance(v, jex_core.Var) and not isinstance(v, jex_core.Literal):
        live.add(v)

  mark(jaxpr.outvars, live_outputs)
  for eqn in reversed(jaxpr.eqns):
    outs = [isinstance(v, jex_core.Var) and v in live for v in eqn.outvars]
    if not any(outs) and not eqn.effects:
      continue
    mark(eqn.invars, _eqn_live_inputs(eqn, outs))
  return [v in live for v in jaxpr.invars]


def _eqn_live_inputs(eqn, outs: list[bool]) -> list[bool]:
  name, n = eqn.primitive.name, len(eqn.invars)
  if eqn.effects or not _has_inner_program(eqn) or name in _ALL_IN:
    return [True] * n  # every input of a plain primitive (or an effect) counts
  if name in _CALLS:
    return live_inputs(_jaxpr(eqn.params[_CALLS[name]]), outs)
  if name == 'cond':  # invars: the branch index, then the branches' operands
    ins = [False] * (n - 1)
    for branch in eqn.params['branches']:
      ins = [a or b for a, b in zip(ins, live_inputs(_jaxpr(branch), outs))]
    return [True, *ins]
  if name == 'scan':  # invars: consts, carry, xs; outvars: carry, ys
    body = _jaxpr(eqn.params['jaxpr'])
    n_consts, n_carry = _scan_groups(eqn)
    carry, ys = outs[:n_carry], outs[n_carry:]
    while True:  # a carry the body reads is live in every iteration before
      ins = live_inputs(body, carry + ys)
      carry_in = [a or b for a, b in zip(ins[n_consts : n_consts + n_carry], carry)]
      if carry_in == carry:
        break
      carry = carry_in
    return ins[:n_consts] + carry + ins[n_consts + n_carry :]
  raise NotImplementedError(
    f'params_the_loss_reaches: the traced forward holds a {name!r} primitive '
    'with an inner program, which experiment.live_inputs cannot see into; add '
    'its rule there (or build the model without dead_modules).'
  )


class _FamilyModel(Protocol):
  """What `build` sets on every family's model; build_model's return type,
  nnx.Module, does not declare it."""

  per_timestep_logits: bool  # True: logits [B, T, classes] for the TET loss


def bn_groups_for(config, mesh) -> int:
  if config.bn_scope not in BN_SCOPES:
    raise errors.ConfigError(
      f'bn_scope={config.bn_scope!r}; valid: {BN_SCOPES} (global: '
      'statistics over the whole sharded batch, like SyncBN / one GPU; '
      'device: per data-parallel device, like PyTorch DDP).'
    )
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
  model_takes_rngs: bool = False  # its __call__ takes `rngs`: the train step passes the stream
  # {state key: fn(restored state) -> entry} for the entries that checkpoints
  # written before them lack (Checkpointer.restore's `backfill`).
  backfill: dict = dataclasses.field(default_factory=dict)

  def init_state(self):
    return jax.jit(self.init_fn, out_shardings=self.state_sharding)()


def build(
  config: ml_collections.ConfigDict, mesh, steps_per_epoch: int, lamb_order=None
) -> Experiment:
  """Model graph definitions, optimizer, and the (abstract) train state.
  `lamb_order`: the official order of Lamb's norm sum (optim.timm_lamb)."""
  bn_groups = bn_groups_for(config, mesh)
  model = nnx.eval_shape(lambda: models.build_model(config.model, bn_groups=bn_groups))
  model.train()
  # Only the official code's unused modules are never reached (a trace).
  reached = (
    params_the_loss_reaches(model, input_shape(config))
    if config.model.get('dead_modules')
    else None
  )
  tx, schedule = optim.make_optimizer(config, steps_per_epoch, reached, lamb_order)

  def init_fn():
    model = models.build_model(config.model, seed=config.seed, bn_groups=bn_groups)
    params, batch_stats, rest = nnx.state(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
      raise ValueError(f'model holds state beyond params and batch stats: {rest}')
    state = {
      'params': params,
      'batch_stats': batch_stats,
      'opt_state': tx.init(params),
      'step': jnp.zeros((), jnp.int32),
      'rng': rng_start(config.seed),
    }
    if losses.ema_decay(config):  # evaluated beside the trained weights
      state['ema'] = {'params': params, 'batch_stats': batch_stats}
    return state

  family_model = cast(_FamilyModel, model)  # the same object
  # TET: every timestep's logits
  family_model.per_timestep_logits = losses.tet_config(config) is not None
  graphdef_train = nnx.graphdef(model)
  model.eval()
  family_model.per_timestep_logits = False
  graphdef_eval = nnx.graphdef(model)
  abstract = jax.eval_shape(init_fn)
  state_sharding = sharding.state_shardings(  # config.json of older runs has no mesh
    abstract, mesh, config.get('mesh', {}).get('fsdp_min_size', sharding.FSDP_MIN_SIZE)
  )
  old_rng = jax.jit(
    lambda step: rng_for_old_checkpoint(config.seed, step), out_shardings=state_sharding['rng']
  )
  return Experiment(
    config=config,
    mesh=mesh,
    graphdef_train=graphdef_train,
    graphdef_eval=graphdef_eval,
    tx=tx,
    schedule=schedule,
    state_sharding=state_sharding,
    abstract_state=checkpointing.abstract_like(abstract, state_sharding),
    init_fn=init_fn,
    num_params=models.count_params(model),
    bn_groups=bn_groups,
    steps_per_epoch=steps_per_epoch,
    model_takes_rngs='rngs' in inspect.signature(type(model).__call__).parameters,
    backfill={'rng': lambda state: old_rng(state['step'])},
  )


# Tells the stream's keys from the other keys drawn from config.seed (the
# parameter initialisation's nnx.Rngs(seed), mixup's fold_in(key(seed), step)).
_RNG_STREAM_ID = 0x64726F70  # 'drop'


def rng_start(seed: int) -> jax.Array:
  """The train state's RNG stream at step 0: key data (uint32), as orbax saves it."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), _RNG_STREAM_ID))


def rng_for_old_checkpoint(seed: int, step) -> jax.Array:
  """The stream of a checkpoint written before the train state had one, at
  `step`: derived from the seed and the step, so that resuming such a run is
  deterministic (its earlier steps drew no keys from the stream)."""
  return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng_start(seed)), step))


def split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(the key of this step, the stream's next key data)."""
  key, rest = jax.random.split(jax.random.wrap_key_data(rng))
  return key, jax.random.key_data(rest)


@contextlib.contextmanager
def compiling_for(mesh):
  """Traces a step for `mesh`: the 'auto' choices (model.weight_grad,
  model.kernels) for its platform, and the kernels mapped over its batch
  shards."""
  with kernels.compiling_for(sharding.platform(mesh), mesh):
    yield


def make_train_step(exp: Experiment):
  """jit(state, batch) -> (new state, metrics); the state is donated.

  The model's stochastic ops draw from the state's RNG stream (module
  docstring). Mixup / CutMix (config.mixup) run inside the step on the sharded
  batch, keyed by the step; the loss is the cross-entropy against soft targets
  (timm's SoftTargetCrossEntropy), which with neither is label smoothing.
  """
  config = exp.config
  smoothing = config.label_smoothing
  num_classes = config.model.num_classes
  tet = losses.tet_config(config)
  mix = config.get('mixup')
  decay = losses.ema_decay(config)

  def train_step(state, batch):
    with compiling_for(exp.mesh):  # 'auto' for the target
      return _train_step(state, batch)

  def _train_step(state, batch):
    images, labels = batch['image'], batch['label']
    if mixup.active(mix):
      key = jax.random.fold_in(jax.random.key(config.seed), state['step'])
      enabled = state['step'] // exp.steps_per_epoch < mix.off_epoch if mix.off_epoch > 0 else True
      images, targets, _ = mixup.mix_batch(
        key, images, labels, mix, num_classes=num_classes, smoothing=smoothing, enabled=enabled
      )
    else:  # float64 inputs (replays of float64 recordings) get float64 targets
      targets = mixup.smooth_one_hot(
        labels, num_classes, smoothing, jnp.promote_types(images.dtype, jnp.float32)
      )

    key, rng = split_rng(state['rng'])

    def loss_fn(params):
      model = nnx.merge(exp.graphdef_train, params, state['batch_stats'], copy=True)
      logits = model(images, rngs=nnx.Rngs(dropout=key)) if exp.model_takes_rngs else model(images)
      if tet is not None:  # [B, T, classes]; predictions from the mean, as at evaluation
        loss = losses.tet_loss(logits, targets, tet.means, tet.lamb)
        logits = logits.mean(axis=1)
      else:
        loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state['params']
    )
    updates, opt_state = exp.tx.update(grads, state['opt_state'], state['params'])
    new_state = {
      'params': optax.apply_updates(state['params'], updates),
      'batch_stats': batch_stats,
      'opt_state': opt_state,
      'step': state['step'] + 1,
      'rng': rng,
    }
    if decay:
      ema = losses.ema_update(
        state['ema'], {'params': new_state['params'], 'batch_stats': batch_stats}, decay
      )
      if isinstance(exp.tx, optax.MultiSteps):  # after optimizer updates only, as timm
        ema = jax.tree.map(
          lambda e, o: jnp.where(exp.tx.has_updated(opt_state), e, o), ema, state['ema']
        )
      new_state['ema'] = ema
    metrics = {
      'loss': loss,
      'top1': jnp.mean(jnp.argmax(logits, -1) == labels),
      'lr': exp.schedule(state['step']),
      'grad_norm': optax.tree.norm(grads),
    }
    return new_state, metrics

  batch_sh = sharding.batch_sharding(exp.mesh)
  return jax.jit(
    train_step,
    in_shardings=(exp.state_sharding, batch_sh),
    out_shardings=(exp.state_sharding, sharding.replicated(exp.mesh)),
    donate_argnums=(0,),
  )


def make_eval_step(exp: Experiment, ema: bool = False, firing_rates: bool = False):
  """jit(state, batch with 'mask') -> sums of correct top-1/5, loss and count,
  of the trained weights or (ema) of their moving average; with
  `firing_rates`, also every neuron's spike and unit counts (`evaluate` turns
  them into per-layer firing rates)."""
  if ema and not losses.ema_decay(exp.config):
    raise errors.ConfigError('this run kept no EMA of its weights (ema_decay is 0).')

  def eval_step(state, batch):
    with compiling_for(exp.mesh):
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
    return {
      'correct1': jnp.sum((jnp.argmax(logits, -1) == label) * mask),
      'correct5': jnp.sum(top5 * mask),
      'loss': jnp.sum(losses.cross_entropy(logits, label) * mask),
      'count': jnp.sum(mask),
      **out,
    }

  batch_sh = sharding.batch_sharding(exp.mesh)
  return jax.jit(
    eval_step,
    in_shardings=(exp.state_sharding, batch_sh),
    out_shardings=sharding.replicated(exp.mesh),
  )


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


def evaluate(
  eval_step,
  state,
  source,
  mesh,
  batch_size: int,
  transform=None,
  ema_step=None,
  stop: Callable[[], bool] | None = None,
) -> dict:
  """top1, top5 and mean loss over every example of `source` (through the eval
  `transform`: resize, centre crop, normalisation); with `ema_step`, also
  'ema_'-prefixed metrics of the weights' EMA, on the same batches (read once).
  Raises EvalInterrupted when `stop()` turns true (checked between batches)."""
  steps = {'': eval_step} if ema_step is None else {'': eval_step, 'ema_': ema_step}
  totals: dict[str, Any] = {}
  for b in data_lib.eval_batches(
    source,
    global_batch=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    transform=transform,
  ):
    if stop is not None and stop():
      raise EvalInterrupted()
    gb = sharding.global_batch(b, mesh)
    for prefix, step in steps.items():
      out = step(state, gb)
      totals[prefix] = out if prefix not in totals else jax.tree.map(jnp.add, totals[prefix], out)
  res: dict[str, Any] = {}
  for prefix, t in jax.device_get(totals).items():
    n = max(float(t['count']), 1.0)
    res.update(
      {
        f'{prefix}top1': float(t['correct1']) / n,
        f'{prefix}top5': float(t['correct5']) / n,
        f'{prefix}loss': float(t['loss']) / n,
      }
    )
    if 'spikes' in t:  # make_eval_step(firing_rates=True)
      res[f'{prefix}firing_rates'] = {
        name: float(t['spikes'][name]) / max(float(u), 1.0) for name, u in t['units'].items()
      }
  res['count'] = int(totals['']['count'])
  return res


def fit_eval_batch(batch: int, n: int, mesh, log=None) -> int:
  """eval_batch_size, at most the `n` test examples rounded up to the data-
  parallel devices: evaluation pads its last batch, so a larger one only
  spends memory (100000 on a 359-example split would be OOM-killed at the
  first evaluation, after training). The config keeps its value."""
  devices = sharding.data_size(mesh)
  fit = min(batch, -(-n // devices) * devices)
  if fit < batch and log is not None:
    log(
      f'eval_batch_size={batch} is larger than the {n} test examples: evaluating in '
      f'batches of {fit}.'
    )
  return fit
