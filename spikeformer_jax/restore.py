"""A run's checkpoint read back: evaluated on a split (eval.py) or as a model
(analysis), on any mesh, while the run may still be training."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from spikeformer_jax import checkpointing
from spikeformer_jax import data as data_lib
from spikeformer_jax import errors
from spikeformer_jax import sharding
from spikeformer_jax import experiment
from spikeformer_jax import storage
from spikeformer_jax import validation


def _restore(config: ml_collections.ConfigDict, workdir: str, mesh, step: int | None):
  """The eval experiment and the restored state of a checkpoint of `workdir`;
  an unreadable checkpoint is named, with the steps that do read."""
  # Per-device BN statistics only matter in training; evaluation uses running stats.
  eval_config = ml_collections.ConfigDict(config.to_dict())
  eval_config.bn_scope = 'global'
  exp = experiment.build(eval_config, mesh, steps_per_epoch=1)
  directory = storage.join(workdir, 'checkpoints')

  def read(root, s):
    ckpt = checkpointing.Checkpointer(root, create=False)
    try:
      return ckpt.restore(exp.abstract_state, s, backfill=exp.backfill)
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
      intact = ckpt.intact_steps(exp.abstract_state, exclude=(bad,), backfill=exp.backfill)
    finally:
      ckpt.close(quiet=True)
    raise errors.CheckpointError(
      f'{errors.one_line(e)}; '
      + (
        f'intact steps: {", ".join(map(str, intact))}: evaluate one with --step={intact[-1]}.'
        if intact
        else 'no other step reads either.'
      )
    ) from e
  return exp, state


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  split: str = 'test',
  step: int | None = None,
  num_devices: int | None = None,
  ema: bool = False,
) -> dict:
  """top-1, top-5 and loss of a checkpoint of `workdir` on `split`, on any mesh
  (ema: of the weights' moving average)."""
  validation.validate_config(config)
  mesh = sharding.make_mesh(num_devices if num_devices else config.num_devices)
  source = data_lib.get_source(config.data, split)
  validation.validate_split(config, source, split)
  batch = config.eval_batch_size
  n = sharding.data_size(mesh)
  batch = experiment.fit_eval_batch(-(-batch // n) * n, len(source), mesh)
  exp, state = _restore(config, workdir, mesh, step)
  eval_step = sharding.synced_first_call(experiment.make_eval_step(exp, ema=ema), 'eval step')
  res = experiment.evaluate(
    eval_step, state, source, mesh, batch, data_lib.make_transform(config.data, source, train=False)
  )
  return {'split': split, 'step': int(jax.device_get(state['step'])), **res}


def restore_model(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> tuple[nnx.Module, int]:
  """The model of a checkpoint of `workdir` (eval mode, on one device) and its step."""
  mesh = sharding.make_mesh(1)
  exp, state = _restore(config, workdir, mesh, step)
  model = nnx.merge(exp.graphdef_eval, state['params'], state['batch_stats'])
  return model, int(jax.device_get(state['step']))
