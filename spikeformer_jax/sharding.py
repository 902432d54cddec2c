"""Device mesh and shardings, derived in one place.

Data parallelism is `jax.jit` with `NamedSharding`s (what `pjit` became): the
batch axis is sharded over the mesh axis 'data', the train state is
replicated. Batch-first layout `[B, T, ...]` keeps time folding local to a
device (no collectives), and BatchNorm statistics are global over the sharded
batch unless `bn_scope='device'`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh ('data',) over all (or the first `num_devices`) devices."""
  devices = jax.devices()
  n = len(devices) if num_devices in (None, 0, -1) else num_devices
  if n < 1 or n > len(devices):
    raise ValueError(f'num_devices={num_devices}: use -1 (all) or 1..{len(devices)}, '
                     'the number of visible devices.')
  return Mesh(np.asarray(devices[:n]), ('data',), axis_types=(AxisType.Auto,))


def data_size(mesh: Mesh) -> int:
  return mesh.shape['data']


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, mesh: Mesh) -> dict:
  """This process's rows of a batch -> global arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size'):
  n = data_size(mesh)
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} must be divisible by the {n} data-parallel '
                     f'devices; use a multiple of {n}.')
