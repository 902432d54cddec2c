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
import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from spikeformer_jax import errors

AXES = ('data', 'fsdp')
BATCH = P(AXES)  # the batch axis over every device
FSDP_MIN_SIZE = 2**14  # default: smaller arrays (biases, norms) stay replicated


def mesh_shape(
  num_devices: int | None,
  data: int,
  fsdp: int,
  available: int,
  where: str = 'visible devices',
  dcn_data: int = 1,
) -> tuple[int, int]:
  """(data, fsdp) of the mesh over `available` devices (make_mesh's rule, a
  pure function: the planner checks a TPU slice's mesh before loading libtpu).
  With `dcn_data` > 1 the 'data' axis spans dcn_data slices x data / dcn_data
  devices in each, and 'fsdp' stays within a slice."""
  n = available if num_devices in (None, 0, -1) else num_devices
  if n < 1 or n > available:
    raise errors.ConfigError(
      f'num_devices={num_devices}: use -1 (all) or 1..{available}, the number of {where}.'
    )
  if isinstance(dcn_data, bool) or not isinstance(dcn_data, int) or dcn_data < 1 or n % dcn_data:
    raise errors.ConfigError(
      f'mesh.dcn_data={dcn_data} must be a divisor of the {n} devices (the slices the '
      "'data' axis spans); use 1 on one slice, or the number of slices."
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
  if data % dcn_data:
    raise errors.ConfigError(
      f'mesh.dcn_data={dcn_data} must divide mesh.data={data}: fsdp stays within a '
      f'slice; use a mesh.fsdp that divides the {n // dcn_data} devices of a slice.'
    )
  return data, fsdp


def _mesh_fields(config) -> tuple[int, int, int]:
  """(data, fsdp, dcn_data) of config.mesh; configs saved before a field
  existed get its default."""
  m = config.get('mesh', None)
  if not m:
    return -1, 1, 1
  return m.get('data', -1), m.get('fsdp', 1), m.get('dcn_data', 1)


def mesh_shape_from_config(config, available: int, where: str = 'visible devices'):
  data, fsdp, dcn_data = _mesh_fields(config)
  return mesh_shape(config.num_devices, data, fsdp, available, where, dcn_data)


def slices_of(devices) -> list[list]:
  """The devices grouped by slice (`device.slice_index`: TPU, and GPUs where
  jaxlib sets it), in slice order; one group where devices carry no slice
  index (CPU)."""
  groups: dict[int, list] = {}
  for d in devices:
    groups.setdefault(getattr(d, 'slice_index', 0) or 0, []).append(d)
  return [groups[k] for k in sorted(groups)]


def device_grid(devices, data: int, fsdp: int, dcn_data: int = 1) -> np.ndarray:
  """The [data, fsdp] array of `devices` that follows the hardware.

  mesh_utils orders a TPU slice's devices by their place in the torus (so
  that each axis's collectives run over neighbouring chips), sorts GPUs by id
  and keeps CPU devices in order (this reshape is then the one before it).
  With dcn_data > 1 it is MaxText's hybrid mesh: an ICI mesh
  [data / dcn_data, fsdp] in each slice, the slices stacked along 'data'
  (mesh_utils.create_hybrid_device_mesh), so that only the data-parallel
  gradient reduction crosses the data-centre network.

  CPU devices have no slice index, so there dcn_data > 1 groups consecutive
  devices into simulated slices (the layout a multi-slice run gets, which
  tests check on CPU: it changes which device holds what, not the numbers).
  JAX's hybrid mesh refuses devices without one and MaxText takes one slice
  on CPU; on an accelerator the devices' own slices decide, in one line if
  they do not match dcn_data (GPUs of several hosts with dcn_data=1: one mesh
  by id, as before).
  """
  devices = list(devices)
  slices = slices_of(devices)
  platform_ = devices[0].platform
  if platform_ == 'gpu' and dcn_data == 1:
    # jaxlib gives each host (NVLink domain) of GPUs its own slice index; one
    # mesh over all of them by id, as before (NCCL crosses hosts itself), and
    # as mesh_utils orders GPUs; mesh.dcn_data=HOSTS puts 'data' across them.
    slices = [devices]
  if len(slices) != (1 if platform_ == 'cpu' else dcn_data):
    raise errors.ConfigError(
      f'mesh.dcn_data={dcn_data} but the {len(devices)} devices are in {len(slices)} '
      f'slice(s); set mesh.dcn_data={len(slices)}'
      + (
        ', or use as many devices as the slices have (num_devices=-1).' if len(slices) > 1 else '.'
      )
    )
  if len({len(s) for s in slices}) > 1:
    raise errors.ConfigError(
      f'the slices have {sorted(len(s) for s in slices)} devices: a mesh over several '
      'slices needs the same number in each (num_devices=-1).'
    )
  cpu = platform_ == 'cpu'
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

  ici = (data // dcn_data, fsdp)
  if cpu:  # simulated slices, stacked as create_hybrid_device_mesh stacks real ones
    per = len(devices) // dcn_data
    return np.concatenate(
      [_torus_order(ici, devices[i * per : (i + 1) * per]) for i in range(dcn_data)], axis=0
    )
  if dcn_data == 1:
    return _torus_order(ici, devices)
  return _torus_order(
    ici,
    devices,
    lambda split: mesh_utils.create_hybrid_device_mesh(
      ici, (dcn_data, 1), devices, allow_split_physical_axes=split
    ),
  )


def _torus_order(shape: tuple[int, int], devices: list, build=None) -> np.ndarray:
  """`build(split)` (default: one slice's mesh_utils.create_device_mesh):
  first without splitting a physical axis over two mesh axes, then with
  (what jax.make_mesh does on v5e); if neither finds an order (part of a
  slice, e.g. num_devices=3 of 4), each slice's devices in their own order,
  with a warning: correct, with slower collectives."""
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

  if build is None:

    def build(split):
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)

  for split in (False, True):
    try:
      return build(split)
    except (ValueError, NotImplementedError, AssertionError):
      continue
  logging.warning(
    'mesh %s per slice over %d %s devices: no torus order found; using the device order.',
    'x'.join(map(str, shape)),
    len(devices),
    devices[0].device_kind,
  )
  slices = slices_of(devices)
  return np.concatenate([np.asarray(s).reshape(shape) for s in slices], axis=0)


def make_mesh(
  num_devices: int | None = None, *, data: int = -1, fsdp: int = 1, dcn_data: int = 1, devices=None
) -> Mesh:
  """A ('data', 'fsdp') mesh over all (or the first `num_devices`) devices,
  ordered by the hardware (device_grid); one of `data`, `fsdp` may be -1: the
  rest. `dcn_data`: the slices the 'data' axis spans. `devices`:
  jax.devices(), or others (the compile-only devices of a TPU topology:
  aot.py)."""
  devices = jax.devices() if devices is None else list(devices)
  data, fsdp = mesh_shape(num_devices, data, fsdp, len(devices), dcn_data=dcn_data)
  grid = device_grid(devices[: data * fsdp], data, fsdp, dcn_data)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 2)


def mesh_from_config(config, devices=None) -> Mesh:
  data, fsdp, dcn_data = _mesh_fields(config)
  return make_mesh(config.num_devices, data=data, fsdp=fsdp, dcn_data=dcn_data, devices=devices)


def slice_count(mesh: Mesh) -> int:
  """Slices the mesh's devices are in (1 on CPU and one TPU slice)."""
  return len(slices_of(mesh.devices.flat))


def axes_across_slices(mesh: Mesh) -> list[str]:
  """The mesh axes along which the slice changes: their collectives cross
  the data-centre network (['data'] with dcn_data > 1, [] on one slice)."""
  index = np.vectorize(lambda d: getattr(d, 'slice_index', 0) or 0, otypes=[int])(mesh.devices)
  return [a for i, a in enumerate(mesh.axis_names) if (np.diff(index, axis=i) != 0).any()]


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
