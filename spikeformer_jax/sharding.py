"""Device mesh and shardings, derived in one place.

Training is `jax.jit` with `NamedSharding`s (what `pjit` became) over a 2-D
mesh ('data', 'fsdp'). The batch axis is sharded over both axes (every
device sees its own examples); the parameters and optimizer state are
replicated over 'data' and, with fsdp > 1, sharded over 'fsdp' (each large
array split along its largest divisible dimension; XLA gathers them for the
forward pass and reduce-scatters the gradients), so the ImageNet models'
state need not fit on one device. Batch-first layout `[B, T, ...]` keeps time
folding local to a device (no collectives), and BatchNorm statistics are
global over the sharded batch unless `bn_scope='device'`.
"""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from spikeformer_jax import errors

AXES = ('data', 'fsdp')
BATCH = P(AXES)  # the batch axis over every device
FSDP_MIN_SIZE = 2**14  # default: smaller arrays (biases, norms) stay replicated


def mesh_shape(
  num_devices: int | None, data: int, fsdp: int, available: int, where: str = 'visible devices'
) -> tuple[int, int]:
  """(data, fsdp) of the mesh over `available` devices (make_mesh's rule, a
  pure function: the planner checks a TPU slice's mesh before loading libtpu)."""
  n = available if num_devices in (None, 0, -1) else num_devices
  if n < 1 or n > available:
    raise errors.ConfigError(
      f'num_devices={num_devices}: use -1 (all) or 1..{available}, the number of {where}.'
    )
  if data == -1 and fsdp == -1:
    raise errors.ConfigError('mesh.data=-1 and mesh.fsdp=-1: at most one axis can take the rest.')
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if known < 1 or n % known:
      raise errors.ConfigError(
        f'mesh.{"fsdp" if data == -1 else "data"}={known} does not divide '
        f'the {n} devices; use a divisor of {n}, or -1.'
      )
    data, fsdp = (n // known, known) if data == -1 else (known, n // known)
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise errors.ConfigError(
      f'mesh.data={data} x mesh.fsdp={fsdp} must equal the {n} devices '
      '(num_devices); -1 takes the rest.'
    )
  return data, fsdp


def mesh_shape_from_config(config, available: int, where: str = 'visible devices'):
  m = config.get('mesh', None)
  return mesh_shape(config.num_devices, m.data if m else -1, m.fsdp if m else 1, available, where)


def make_mesh(
  num_devices: int | None = None, *, data: int = -1, fsdp: int = 1, devices=None
) -> Mesh:
  """A ('data', 'fsdp') mesh over all (or the first `num_devices`) devices;
  one of `data`, `fsdp` may be -1: the rest. `devices`: jax.devices(), or
  others (the compile-only devices of a TPU topology: aot.py)."""
  devices = jax.devices() if devices is None else list(devices)
  data, fsdp = mesh_shape(num_devices, data, fsdp, len(devices))
  return Mesh(
    np.asarray(devices[: data * fsdp]).reshape(data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2
  )


def mesh_from_config(config, devices=None) -> Mesh:
  m = config.get('mesh', None)
  return make_mesh(
    config.num_devices, data=m.data if m else -1, fsdp=m.fsdp if m else 1, devices=devices
  )


def platform(mesh: Mesh) -> str:
  """'cpu', 'gpu' or 'tpu': what the mesh's devices are (the target of a
  step compiled ahead of time, not necessarily this machine's backend)."""
  return mesh.devices.flat[0].platform


def data_size(mesh: Mesh) -> int:
  """Devices the batch is split over (all of them: data x fsdp)."""
  return math.prod(mesh.shape[a] for a in AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple, fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """'fsdp' on the largest dimension it divides, for arrays of min_size or more."""
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  dims = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % fsdp == 0]
  if not dims:
    return P()
  spec: list[str | None] = [None] * len(shape)
  spec[dims[0]] = 'fsdp'
  return P(*spec)


def state_shardings(abstract_state: dict, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> dict:
  """Shardings of the train state: params and optimizer state per fsdp_spec,
  BatchNorm statistics, the step and the RNG stream replicated."""
  fsdp = mesh.shape['fsdp']

  def shard(x):
    return NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size))

  repl = replicated(mesh)
  return {
    k: jax.tree.map(shard if k in ('params', 'opt_state') else (lambda _: repl), v)
    for k, v in abstract_state.items()
  }


def global_batch(local: dict, mesh: Mesh) -> dict:
  """This process's rows of a batch -> global arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }


_BARRIER_IDS = itertools.count()


def barrier(name: str, timeout_s: int = 3600):
  """Waits until every process reaches this point (the coordination
  service's barrier: no collective, and no 30 s limit). Processes must call
  it in the same order (the ids count up). One process: returns at once.

  orbax's public barrier function, not its `sync_global_processes`: that one
  is `multihost_utils.sync_global_devices` (a collective over every device,
  under gloo's 30 s limit on CPU) unless given a subset of processes."""
  from orbax.checkpoint import multihost  # pylint: disable=import-outside-toplevel

  multihost.get_barrier_sync_fn()(
    key=f'spikeformer_jax/{next(_BARRIER_IDS)}/{name}', timeout_ms=timeout_s * 1000
  )


def synced_first_call(step, name: str):
  """The jitted `step`; with several processes its first call compiles, then
  waits for every process before it runs.

  CPU collectives (gloo) give a peer 30 s to reach a new communicator: a
  compile slower on one host than on another (load, a compile-cache hit on one
  of them) failed 3 of 4 two-process runs on 2 loaded cores ("Gloo context
  initialization failed: GetKeyValue() timed out"), and the other process
  then waited for ever in its collective."""
  if jax.process_count() == 1:
    return step
  ready = False

  def call(*args):
    nonlocal ready
    if not ready:
      step.lower(*args).compile()  # fills the jit's cache: the call below does not compile
      barrier(f'{name} compiled')
      ready = True
    return step(*args)

  return call


def check_batch_size(batch_size: int, mesh, what: str = 'batch_size'):
  """`mesh`: a Mesh, or the number of data-parallel devices (data x fsdp)."""
  n = mesh if isinstance(mesh, int) else data_size(mesh)
  if batch_size % n:
    raise errors.ConfigError(
      f'{what}={batch_size} must be divisible by the {n} data-parallel '
      f'devices; use a multiple of {n}.'
    )
