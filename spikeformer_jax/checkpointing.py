"""Orbax checkpoints behind one small interface.

Saves are asynchronous; only committed checkpoints are ever restored (orbax
writes to a temporary directory and renames on success), and the last `keep`
are kept. `restore` takes an abstract state whose `ShapeDtypeStruct`s carry
the target shardings, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, create: bool = True):
    self.directory = os.path.abspath(directory)
    if not create and not os.path.isdir(self.directory):
      raise FileNotFoundError(f'no checkpoint directory {self.directory}.')
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict | None = None, *, force: bool = False):
    """Starts saving `state` (a pytree of arrays) and a JSON-able `meta`."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})),
        force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Returns (state, meta) of `step` (default: the latest) onto the shardings
    of `abstract_state` (a pytree of jax.ShapeDtypeStruct with .sharding)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}.')
    if step not in self.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; '
                              f'available: {self.all_steps()}.')
    self._check_shapes(step, abstract_state)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f'checkpoint {self.directory}/{step} does not fit this model and optimizer '
          f'(was it written with another config?): {e}') from e
    return out['state'], out['meta']

  def _check_shapes(self, step: int, abstract_state):
    """One clear error, before orbax's own, when the checkpoint's arrays do
    not fit the model (another size, class count or optimizer)."""
    try:
      md = ocp.StandardCheckpointer().metadata(
          os.path.join(self.directory, str(step), 'state'))
      stored = _shapes(getattr(getattr(md, 'item_metadata', md), 'tree', md))
    except Exception:  # pylint: disable=broad-except
      return  # no readable metadata: let the restore itself decide
    wanted = _shapes(abstract_state)
    diffs = [f'{k}: checkpoint {stored.get(k)} vs model {wanted.get(k)}'
             for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if diffs:
      raise ValueError(
          f'checkpoint {self.directory}/{step} does not fit this model and optimizer '
          f'(was it written with another config?); {len(diffs)} arrays differ, e.g.\n  '
          + '\n  '.join(diffs[:5]))

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying `shardings` (same tree or a prefix)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def _shapes(tree) -> dict:
  """{'params/block/0/attn/q_bn/scale': shape}, whatever the path key types."""
  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [name(k) for k in path]
    if parts and parts[-1] == 'value':  # nnx.Variable wrappers
      parts = parts[:-1]
    out['/'.join(parts)] = tuple(getattr(leaf, 'shape', ()))
  return out
