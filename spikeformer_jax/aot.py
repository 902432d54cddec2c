r"""Plan a training run ahead of time: compile the real train step for a TPU
topology (from any machine, no TPU needed) or for the local devices, and
report per-chip memory, FLOPs, HBM traffic and the roofline speed.

  python -m spikeformer_jax.aot --config=configs/spikformer.py:imagenet-8-768 \
      --topology=v5p:4x4x4 --batch=4096 [--max_batch] [--json] [--config.model.dtype=bfloat16]
  python -m spikeformer_jax.aot --config=configs/spikformer.py:cifar10-4-384   # local devices

The step is train.py's own (`experiment.build` + `make_train_step`: the same
state, shardings, mesh fields, bn_scope, remat and time loop), lowered with
abstract state and batch and compiled by XLA for the target. A TPU topology
is named as `GEN:SHAPE` (`v5e:2x2`, `v4:2x2x2`, `v5p:4x4x4`, `v6e:4x4`) or as
a Cloud accelerator type (`v5litepod-16`, `v5e-16`, `v5p-128`, `v4-8`,
`v6e-8`); its compile-only devices come from libtpu (`pip install
'spikeformer_jax[tpu]'`), which is not needed otherwise.

The figures are the compiler's: `memory_analysis()` (per chip: arguments,
outputs, temporaries, aliased) and `cost_analysis()` (per chip: FLOPs and
bytes accessed in HBM). The roofline step time is the larger of FLOPs / peak
and bytes / bandwidth, with each chip's published figures (CHIPS); on the
local devices the step is also run and timed. A program that does not fit is
reported as not fitting, with the compiler's figures; `--max_batch` searches
the largest global batch that fits. The report names the kernels the step
was compiled with: model.kernels and its choice for the target (`auto`:
the Pallas kernels on TPU); `--config.model.kernels=xla|pallas` sets it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import statistics
import sys
import time
from typing import Any

from spikeformer_jax import errors
from spikeformer_jax import signals

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: HBM capacity, dense bf16 peak, HBM bandwidth;
  the chip-to-chip links where published (ICI / NVLink, both directions) and
  each chip's share of the data-centre network (TPU multi-slice)."""

  name: str
  hbm_bytes: int
  peak_flops: float  # bf16 dense, FLOP/s (XLA runs float32 matmuls on the
  hbm_bytes_per_s: float  # TPU's MXU in bf16 passes at default precision)
  ici_bytes_per_s: float | None = None
  dcn_bytes_per_s: float | None = None


# The vendors' published figures, each from the page named beside it (read
# 2026-12; bf16 dense: NVIDIA lists Tensor Core FLOP/s with sparsity, half of
# which is dense). GPU entries are for the planner's estimates on local GPUs:
# nothing here compiles for a GPU offline, so they are unchecked by a compile.
CHIPS = {
  # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB, 1200 GBps (ICI not listed)
  'v4': Chip('TPU v4', 32 * GiB, 275e12, 1228e9),
  # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB, 819 GBps, ICI 400 GBps;
  # DCN 2 x 100 Gbps NICs per host of 8 chips = 25 Gb/s per chip
  'v5e': Chip('TPU v5e', 16 * GiB, 197e12, 819e9, 400e9, 25e9 / 8),
  # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GiB, 2765 GBps, ICI 1200 GBps,
  # DCN 50 Gb/s per chip
  'v5p': Chip('TPU v5p', 95 * GiB, 459e12, 2765e9, 1200e9, 50e9 / 8),
  # https://cloud.google.com/tpu/docs/tpu7x (its table has v6e beside v7): 918 TFLOP/s,
  # 32 GiB, ICI 800 GB/s, DCN 100 Gb/s per chip (1640 GBps: the v6e page)
  'v6e': Chip('TPU v6e', 32 * GiB, 918e12, 1640e9, 800e9, 100e9 / 8),
  # https://cloud.google.com/tpu/docs/tpu7x (Ironwood): 2307 TFLOP/s bf16, 192 GiB,
  # 7380 GB/s, ICI 1200 GB/s, DCN 100 Gb/s per chip
  'v7': Chip('TPU7x (Ironwood)', 192 * GiB, 2307e12, 7380e9, 1200e9, 100e9 / 8),
  # https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM datasheet): bf16 1979
  # TFLOP/s with sparsity, 80 GB, 3.35 TB/s, NVLink 900 GB/s
  'h100': Chip('NVIDIA H100 SXM', 80 * 10**9, 989e12, 3.35e12, 900e9),
  # https://www.nvidia.com/en-us/data-center/h200/: 141 GB, 4.8 TB/s, bf16 1979 TFLOP/s
  # with sparsity (the H100's), NVLink 900 GB/s
  'h200': Chip('NVIDIA H200', 141 * 10**9, 989e12, 4.8e12, 900e9),
  # https://www.nvidia.com/en-us/data-center/a100/ (A100 datasheet): bf16 312 TFLOP/s
  # dense, 80 GB HBM2e, 2039 GB/s (SXM), NVLink 600 GB/s
  'a100': Chip('NVIDIA A100 80GB', 80 * 10**9, 312e12, 2.039e12, 600e9),
  # https://www.nvidia.com/en-us/data-center/dgx-b200/ (8 GPUs): 1440 GB and 64 TB/s
  # in all, FP8 72 PFLOP/s with sparsity (bf16: half of FP8, then half for dense: 2.25
  # PFLOP/s a GPU), NVLink 14.4 TB/s in all (1.8 TB/s a GPU)
  'b200': Chip('NVIDIA B200', 180 * 10**9, 2250e12, 8e12, 1.8e12),
}
TPU_GENERATIONS = ('v4', 'v5e', 'v5p', 'v6e')
# Cloud accelerator-type prefixes; v4 and v5p count TensorCores (2 per chip).
_ACCELERATOR_TYPES = {
  'v4': ('v4', 2),
  'v5p': ('v5p', 2),
  'v5litepod': ('v5e', 1),
  'v5e': ('v5e', 1),
  'v6e': ('v6e', 1),
}
# The largest single slice of each generation (Cloud's TPU pages: v4 and v5p
# 16x16x16 and 16x16x24 of a 4096- and 8960-chip pod; v5e and v6e 16x16), and
# the chips per host the compile-only devices are laid out in (tpu_devices):
# each dimension above 1 must be a multiple of it, or libtpu refuses the shape.
MAX_SLICE = {'v4': (16, 16, 16), 'v5e': (16, 16), 'v5p': (16, 16, 24), 'v6e': (16, 16)}
HOST_BOUNDS = (2, 2, 1)
TPU_INSTALL = "pip install 'spikeformer_jax[tpu]'  (or: pip install 'jax[tpu]')"


class PlanError(errors.ConfigError):
  """A topology, batch or environment the planner cannot use (one line)."""


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str
  shape: tuple

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    return f'{self.generation}:{"x".join(map(str, self.shape))}'


def _shape_for(generation: str, chips: int) -> tuple:
  """The slice shape Cloud gives `chips` chips: 2-D for v5e / v6e, 3-D for v4 / v5p."""
  if chips < 1 or chips & (chips - 1):
    raise PlanError(f'{chips} chips: TPU slices have a power of two of chips.')
  dims = [1, 1] if generation in ('v5e', 'v6e') else [1, 1, 1]
  order = [1, 0] if len(dims) == 2 else [0, 1, 2]
  if len(dims) == 3 and chips >= 4:  # 2x2x1, 2x2x2, then z, y, x in turn: 2x2x4, 2x4x4, ...
    dims, chips = ([2, 2, 1], chips // 4) if chips == 4 else ([2, 2, 2], chips // 8)
    order = [2, 1, 0]
  i = 0
  while chips > 1:
    dims[order[i % len(order)]] *= 2
    chips //= 2
    i += 1
  return tuple(dims)


def _real_slice(name: str, topology: Topology) -> Topology:
  """`topology` if Cloud has such a slice (as far as cheap rules tell), else a
  PlanError: libtpu aborts (std::bad_alloc) on a huge one and refuses one off
  its host layout only after loading."""
  gen, shape = topology.generation, topology.shape
  most = MAX_SLICE[gen]
  if topology.chips > math.prod(most) or any(d > m for d, m in zip(sorted(shape), sorted(most))):
    raise PlanError(
      f'--topology={name}: {topology.chips} chips ({topology.name}); the '
      f'largest {gen} slice is {"x".join(map(str, most))} '
      f'({math.prod(most)} chips): use a smaller one.'
    )
  for d, b in zip(shape, HOST_BOUNDS):
    if d > 1 and d % b:
      raise PlanError(
        f'--topology={name}: {topology.name} is not laid out in hosts of '
        f'{"x".join(map(str, HOST_BOUNDS[: len(shape)]))} chips; use 1 or '
        f'a multiple of {b} in its first two dimensions, e.g. '
        f'{gen}:{"x".join(["2"] * 2 + ["1"] * (len(shape) - 2))}.'
      )
  return topology


def parse_topology(name: str) -> Topology:
  """'v5e:2x2', 'v5p:4x4x4', 'v5litepod-16', 'v5p-128', ... -> Topology."""
  m = re.fullmatch(r'(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})', name)
  if m:
    gen, shape = m.group(1), tuple(int(d) for d in m.group(2).split('x'))
    want = 2 if gen in ('v5e', 'v6e') else 3
    if len(shape) != want or min(shape) < 1:
      raise PlanError(
        f'--topology={name}: a {gen} slice has {want} dimensions of at least 1 '
        f'chip, e.g. {gen}:{"x".join(["2"] * 2 + ["1"] * (want - 2))}.'
      )
    return _real_slice(name, Topology(gen, shape))
  m = re.fullmatch(r'(v4|v5p|v5litepod|v5e|v6e)-(\d+)', name)
  if m:
    gen, per_chip = _ACCELERATOR_TYPES[m.group(1)]
    cores = int(m.group(2))
    if cores % per_chip:
      raise PlanError(f'--topology={name}: {gen} counts {per_chip} cores per chip.')
    return _real_slice(name, Topology(gen, _shape_for(gen, cores // per_chip)))
  raise PlanError(
    f'--topology={name!r}: use GEN:SHAPE (GEN one of '
    f'{", ".join(TPU_GENERATIONS)}; e.g. v5e:2x2, v5p:4x4x4) or a Cloud '
    'accelerator type (v5litepod-16, v5p-128, v4-8, v6e-8), or local.'
  )


def check_options(
  config,
  topology: str = 'local',
  batch: int | None = None,
  steps: int | None = None,
  top: int = 0,
  batch_multiple: int = 0,
  search: bool = False,
  num_slices: int = 1,
):
  """Every option of the planner and its config, in one place, before
  anything compiles (train.py's config checks, then the planner's own): a
  PlanError or ValueError of one line."""
  from spikeformer_jax import validation  # pylint: disable=import-outside-toplevel

  validation.validate_config(config)
  chips = None if topology == 'local' else parse_topology(topology).chips

  def count(name, value, low, why=''):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
      raise PlanError(f'--{name}={value} must be an integer >= {low}{why}.')

  count('num_slices', num_slices, 1, ' (slices of --topology; 1: one slice)')
  if num_slices > 1 and chips is None:
    raise PlanError(
      f'--num_slices={num_slices} takes copies of a TPU --topology (e.g. --topology=v5e:2x2); '
      "the local devices' own slices set the mesh (mesh.dcn_data)."
    )
  config = with_slices(config, num_slices, chips is not None)
  count('batch', batch, 1, ' (the global batch; default: config.batch_size)')
  count('steps', steps, 0, ' (timed steps on the local devices; 0: none)')
  count('top', top, 0, ' (0: no list of the largest HBM consumers)')
  count('batch_multiple', batch_multiple, 0, ' (0: the number of chips)')
  if batch_multiple and not search:
    raise PlanError(
      f'--batch_multiple={batch_multiple} applies to --max_batch only; add --max_batch, or drop it.'
    )
  if steps and chips is not None:
    raise PlanError(
      f'--steps={steps} times steps on the local devices; {topology} is only '
      'compiled for: drop --steps, or use --topology=local.'
    )
  if search and chips is None:
    _, chip, target = local_chip()
    if chip is None:  # a CPU: every batch would "fit" (it searched for minutes)
      raise PlanError(
        f'--max_batch on {target}: its memory capacity is unknown, so every '
        'batch would "fit"; give --topology=GEN:SHAPE (e.g. v5e:2x2) to search '
        "against a TPU's HBM, or run it on a GPU or TPU."
      )
  n = data_parallel(config, topology, num_slices)
  if search:
    unit = batch_multiple or n
    if unit % n:
      raise PlanError(
        f'--batch_multiple={batch_multiple} must be a multiple of the {n} '
        f'data-parallel devices of the mesh; use a multiple of {n}.'
      )
    if batch is not None and batch % unit:
      raise PlanError(
        f'--batch={batch} (where --max_batch starts) is not a multiple of '
        f'{unit} ({"--batch_multiple" if batch_multiple else "the devices"}): '
        f'use a multiple of {unit}, or drop --batch.'
      )
  else:
    from spikeformer_jax import sharding  # pylint: disable=import-outside-toplevel

    sharding.check_batch_size(
      config.batch_size if batch is None else batch,
      n,
      'config.batch_size' if batch is None else '--batch',
    )


def local_chip():
  """(this machine's devices, their CHIPS entry with the device's own capacity
  where it reports one, or None if unknown (CPU), the target's name)."""
  import jax  # pylint: disable=import-outside-toplevel

  devices = jax.devices()
  chip = chip_for(devices[0])
  if chip is not None:
    limit = (devices[0].memory_stats() or {}).get('bytes_limit')
    chip = dataclasses.replace(chip, hbm_bytes=limit) if limit else chip
  return devices, chip, f'local: {len(devices)} x {devices[0].device_kind}'


def with_slices(config, num_slices: int, tpu: bool = True):
  """`config` with mesh.dcn_data = num_slices (the data axis spans the
  slices) unless it already says so; a PlanError if it says otherwise."""
  m = config.get('mesh', None)
  dcn = m.get('dcn_data', 1) if m else 1
  if dcn == num_slices:
    return config
  if not tpu:  # local: the devices' own slices decide (sharding.device_grid)
    return config
  if num_slices == 1:
    raise PlanError(
      f'mesh.dcn_data={dcn} spans {dcn} slices: add --num_slices={dcn}, or drop '
      'mesh.dcn_data (1: one slice).'
    )
  if dcn != 1:
    raise PlanError(
      f'mesh.dcn_data={dcn} but --num_slices={num_slices}: the data axis spans every '
      f'slice; drop mesh.dcn_data (it follows --num_slices) or set it to {num_slices}.'
    )
  config = copy.deepcopy(config)
  with config.unlocked():
    config.mesh.dcn_data = num_slices
  return config


def data_parallel(config, topology: str, num_slices: int = 1) -> int:
  """Devices the batch is split over (data x fsdp), from the mesh config and the
  chips `topology` (x num_slices) implies (sharding's rule, before libtpu
  loads): a ValueError of one line if the mesh does not fit them."""
  from spikeformer_jax import sharding  # pylint: disable=import-outside-toplevel

  if topology == 'local':
    import jax  # pylint: disable=import-outside-toplevel

    data, fsdp = sharding.mesh_shape_from_config(config, jax.device_count())
  else:
    topo = parse_topology(topology)
    config = with_slices(config, num_slices)
    chips = topo.chips * num_slices
    what = topo.name if num_slices == 1 else f'{num_slices} x {topo.name}'
    if config.num_devices not in (-1, 0, chips):
      raise PlanError(
        f'num_devices={config.num_devices} but {what} has {chips} '
        'chips: use num_devices=-1 (the whole slice), or a topology of that '
        'many chips.'
      )
    data, fsdp = sharding.mesh_shape_from_config(config, chips, f'chips of {what}')
  return data * fsdp


def tpu_devices(topology: Topology, num_slices: int = 1):
  """The compile-only devices of `num_slices` TPU slices of `topology`
  (libtpu, no TPU needed); each carries its `slice_index`."""
  if importlib.util.find_spec('libtpu') is None:
    raise PlanError(
      f'compiling for {topology.name} needs libtpu, which is not installed: {TPU_INSTALL}.'
    )
  # libtpu looks for a TPU host's environment; these quiet the parts it can.
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{topology.generation}-{topology.chips}')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  # Compile-only devices touch no chip: several planners (or a planner beside
  # a training run) may load libtpu at once, which its lockfile forbids.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  shape = tuple(topology.shape) + (1,) * (3 - len(topology.shape))
  try:
    desc = topologies.get_topology_desc(
      platform='tpu',
      topology_name=topology.name,
      chip_config_name='default',
      chips_per_host_bounds=tuple(min(d, b) for d, b in zip(shape, (2, 2, 1))),
      num_slices=num_slices,
      wrap=(False, False, False),
    )
  except Exception as e:  # pylint: disable=broad-except
    what = topology.name + (f' x {num_slices} slices' if num_slices > 1 else '')
    raise PlanError(f'libtpu cannot describe {what}: {_first_line(e)}') from e
  return desc.devices


def _stop_at_once(signum: int):
  """SIGTERM and Ctrl-C stop the planner at once, with one line.

  A compile runs in XLA's C++ for minutes: Python runs a signal's handler (and
  raises KeyboardInterrupt) only after it returns, and libtpu installs its own
  SIGTERM handler, which dumps a stack trace. Here the signal reaches the
  watcher thread of `signals.SignalWatcher`, which prints the line and
  exits without unwinding (`os._exit`; 143 / 130 as train.py): safe, since the
  planner writes nothing but its report at the end (a persistent-cache entry
  cut short is one JAX warns about and compiles again). `_STOP.claim()` takes
  the signals back from a library that took them (libtpu, when it loads).
  """
  name = signal.Signals(signum).name
  # os.write: the main thread may hold sys.stderr's lock.
  os.write(2, f'stopped ({name}): the planner wrote nothing.\n'.encode())
  os._exit(128 + signum)  # pylint: disable=protected-access


# main() enters it; compile_step re-claims the signals
_STOP = signals.SignalWatcher((signal.SIGTERM, signal.SIGINT), _stop_at_once, name='stop-at-once')


def _first_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return lines[0] if lines else type(e).__name__


def per_core(chip: Chip, cores: int) -> Chip:
  """A chip's figures per TensorCore, where JAX shows each core as a device:
  TPU7x has two and no megacore (JAX's pallas.tpu.ChipVersion table; libtpu
  describes tpu7x:2x2x1 as 8 devices, core_on_chip 0 and 1)."""

  def share(x):
    return None if x is None else x / cores

  return Chip(
    f'{chip.name}, one of {cores} TensorCores',
    chip.hbm_bytes // cores,
    chip.peak_flops / cores,
    chip.hbm_bytes_per_s / cores,
    share(chip.ici_bytes_per_s),
    share(chip.dcn_bytes_per_s),
  )


def chip_for(device) -> Chip | None:
  """The CHIPS entry of a device (local GPUs and TPUs), None if unknown (CPU)."""
  kind = device.device_kind.lower()
  for key in ('h200', 'h100', 'a100', 'b200'):
    if key in kind:
      return CHIPS[key]
  if device.platform == 'tpu':
    if 'tpu7' in kind or 'v7' in kind:
      return per_core(CHIPS['v7'], 2)
    for key, words in (
      ('v5e', ('v5 lite', 'v5e')),
      ('v5p', ('v5p', 'tpu v5')),
      ('v6e', ('v6',)),
      ('v4', ('v4',)),
    ):
      if any(w in kind for w in words):
        return CHIPS[key]
  return None


def input_shape(config) -> tuple:
  """One training example as the input pipeline delivers it (the train step's)."""
  from spikeformer_jax import experiment  # pylint: disable=import-outside-toplevel

  return experiment.input_shape(config)


def _cost(compiled) -> dict:
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):  # older jax: one dict per program
    c = c[0] if c else {}
  return dict(c or {})


def _compiler_sizes(message: str) -> dict:
  """Figures of an out-of-memory message, e.g. 'HLO temporaries (16.56G) exceeds
  available HBM (15.75G)' -> {'HLO temporaries': ..., 'available HBM': ...} in
  bytes; also 'Used X of Y hbm' as 'used' and 'capacity'."""
  scale = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}

  def size(num, unit):
    return int(float(num) * scale[unit])

  out = {}
  for what, num, unit in re.findall(
    r'([A-Za-z][A-Za-z ]*?)\s*\(([\d.]+)\s*([KMGT]?)i?B?\)', message
  ):
    what = re.sub(r'^(.*\brequired for|exceeds|is|of)\s+', '', what.strip())
    out[what] = size(num, unit)
  m = re.search(r'Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm', message)
  if m:
    out['used'], out['capacity'] = size(*m.group(1, 2)), size(*m.group(3, 4))
  return out


def _is_oom(e: BaseException) -> bool:
  s = str(e)
  return 'RESOURCE_EXHAUSTED' in s or 'exceeds available' in s or 'Out of memory' in s


def compile_step(config, devices, batch: int):
  """(compiled train step or the out-of-memory error, mesh, experiment, compile seconds)."""
  import jax  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import experiment, sharding  # pylint: disable=import-outside-toplevel

  _STOP.claim()  # libtpu, loaded by now, may have taken SIGTERM
  mesh = sharding.mesh_from_config(config, devices)
  sharding.check_batch_size(batch, mesh, '--batch')
  exp = experiment.build(config, mesh, steps_per_epoch=1000)
  step = experiment.make_train_step(exp)
  bsh = sharding.batch_sharding(mesh)
  abstract_batch = {
    'image': jax.ShapeDtypeStruct((batch,) + input_shape(config), 'float32', sharding=bsh),
    'label': jax.ShapeDtypeStruct((batch,), 'int32', sharding=bsh),
  }
  t = time.perf_counter()
  try:
    compiled = step.lower(exp.abstract_state, abstract_batch).compile()
  except Exception as e:  # pylint: disable=broad-except
    if not _is_oom(e):
      raise
    compiled = e
  return compiled, mesh, exp, time.perf_counter() - t


def kernels_for(config, platform: str) -> tuple[str, str]:
  """(config's model.kernels, what it resolves to when compiling for
  `platform`): 'auto' is pallas on TPU, xla elsewhere (kernels.resolve)."""
  from spikeformer_jax import kernels, layers  # pylint: disable=import-outside-toplevel

  value = config.model.get('kernels', layers.Settings.kernels)
  with kernels.compiling_for(platform, None):
    return value, kernels.resolve(value)


def report(
  config, compiled, mesh, batch: int, chip: Chip | None, compile_s: float, target: str
) -> dict:
  """The planner's figures for one compiled (or out-of-memory) step."""
  from spikeformer_jax import sharding  # pylint: disable=import-outside-toplevel

  n = mesh.size
  kernels, kernels_resolved = kernels_for(config, sharding.platform(mesh))
  r = {
    'config': config.get('name', ''),
    'target': target,
    'device_kind': mesh.devices.flat[0].device_kind,
    'chips': n,
    'slices': sharding.slice_count(mesh),
    'axes_across_slices': sharding.axes_across_slices(mesh),
    'mesh': dict(mesh.shape),
    'global_batch': batch,
    'batch_per_chip': batch / n,
    'T': config.model.T,
    'dtype': config.model.dtype,
    'remat': config.model.get('remat', ''),
    'loop': config.model.neuron.loop,
    'bn_scope': config.bn_scope,
    'kernels': kernels,  # model.kernels, and the choice it made for this target
    'kernels_resolved': kernels_resolved,
    'compile_s': compile_s,
    'hbm_capacity_bytes_per_chip': chip.hbm_bytes if chip else None,
  }
  if isinstance(compiled, BaseException):
    sizes = _compiler_sizes(str(compiled))
    need = max(sizes.values()) if sizes else None
    r.update(
      fits=False, error=_first_line(compiled), compiler_figures=sizes, hbm_peak_bytes_per_chip=need
    )
    available = sizes.get('available HBM', sizes.get('capacity'))
    if available:
      r['hbm_available_bytes_per_chip'] = available
      r['hbm_peak_bytes_per_chip'] = max(
        v for k, v in sizes.items() if k not in ('available HBM', 'capacity')
      )
    return r
  ma = compiled.memory_analysis()
  args, outs = ma.argument_size_in_bytes, ma.output_size_in_bytes
  temps, alias = ma.temp_size_in_bytes, ma.alias_size_in_bytes
  peak = args + outs - alias + temps
  cost = _cost(compiled)
  flops, hbm = cost.get('flops', 0.0), cost.get('bytes accessed', 0.0)
  r.update(
    hbm_argument_bytes_per_chip=args,
    hbm_output_bytes_per_chip=outs,
    hbm_alias_bytes_per_chip=alias,
    hbm_temp_bytes_per_chip=temps,
    hbm_code_bytes_per_chip=ma.generated_code_size_in_bytes,
    hbm_peak_bytes_per_chip=peak,
    fits=chip is None or peak <= chip.hbm_bytes,
    flops_per_chip_step=flops,
    hbm_bytes_per_chip_step=hbm,
    flops_per_image=flops * n / batch,
    hbm_bytes_per_image=hbm * n / batch,
    arithmetic_intensity=flops / hbm if hbm else None,
  )
  if chip is not None:
    t_flops, t_bytes = flops / chip.peak_flops, hbm / chip.hbm_bytes_per_s
    step_s = max(t_flops, t_bytes)
    r.update(
      roofline_step_s=step_s,
      roofline_images_per_s=batch / step_s if step_s else None,
      roofline_bound='memory' if t_bytes >= t_flops else 'compute',
      ridge_flops_per_byte=chip.peak_flops / chip.hbm_bytes_per_s,
    )
  else:
    r.update(roofline_step_s=None, roofline_images_per_s=None, roofline_bound=None)
  return r


_DTYPE_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  'bf16': 2,
  'f16': 2,
  's16': 2,
  'u16': 2,
  'f32': 4,
  's32': 4,
  'u32': 4,
  'f64': 8,
  's64': 8,
  'u64': 8,
}
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')
_NOT_TRAFFIC = (
  'parameter',
  'get-tuple-element',
  'tuple',
  'constant',
  'bitcast',
  'while',
  'call',
  'conditional',
  'partition-id',
  'replica-id',
  'after-all',
)


def _array_bytes(text: str) -> int:
  return sum(
    math.prod(int(d) for d in dims.split(',') if d) * _DTYPE_BYTES[dt]
    for dt, dims in _ARRAY.findall(text)
  )


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """The HLO text's computations -> their instructions, and the entry's name."""
  comps: dict[str, list[str]] = {}
  entry, cur = None, None
  for line in hlo_text.splitlines():
    m = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if m and not line.startswith(' '):
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
    elif cur and line.startswith('  '):
      comps[cur].append(line.strip())
  return comps, entry


_CALLEES = re.compile(r'(?:body|condition|to_apply|branch_computations|calls)=\{?%?([\w.\-]+)')


def largest_traffic(hlo_text: str, top: int = 20) -> list[dict]:
  """The compiled program's `top` largest HBM consumers: each top-level
  instruction (of the entry computation and of loop bodies) with the bytes of
  its operands and result, its HLO op and the JAX operation it came from.
  An estimate from the HLO text for finding what to cut; the totals of
  cost_analysis() are the compiler's own."""
  comps, entry = _computations(hlo_text)
  toplevel = {entry} if entry is not None else set()
  for lines in comps.values():
    for ln in lines:
      if ' while(' in ln or ' call(' in ln or 'conditional(' in ln:
        toplevel.update(
          m.group(1)
          for m in re.finditer(
            r'(?:body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)', ln
          )
        )
  rows: list[dict[str, Any]] = []
  for name in toplevel:
    shapes = {}
    for ln in comps.get(name, []):
      m = re.match(r'(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$', ln)
      if not m:
        continue
      var, shape, op, rest = m.groups()
      shapes[var] = shape
      if op in _NOT_TRAFFIC or op.endswith('-done'):  # async pairs: counted at the start
        continue
      operands = rest.split('), ')[0]
      nbytes = _array_bytes(shape) + sum(
        _array_bytes(shapes[a]) for a in re.findall(r'%([\w.\-]+)', operands) if a in shapes
      )
      kind = re.search(r'kind=(\w+)', ln)
      source = re.search(r'op_name="([^"]*)"', ln)
      rows.append(
        {
          'bytes': nbytes,
          'op': op + (f' ({kind.group(1)})' if kind else ''),
          'shape': re.sub(r'\{[^}]*\}', '', shape)[:80],
          'source': source.group(1) if source else '',
        }
      )
  rows.sort(key=lambda r: -r['bytes'])
  return rows[:top]


# How DCN shows in a compiled multi-slice TPU program (libtpu 0.0.42, checked
# on its compile-only devices): the compiler splits each collective over
# slices into a part within the slice (all-reduce, reduce-scatter, all-gather
# over ICI, replica groups of one slice's partitions) and a transfer over the
# data-centre network, a host-transfer `send` / `recv` pair handed to the
# megascale runtime, e.g.
#   send(%x, ...), is_host_transfer=true, frontend_attributes={
#     _xla_host_transfer_handler_name="xla_megascale_runtime",
#     _xla_megascale_transfer_type="ALL_REDUCE", ...}
# with one chip's share of the array as its operand. The program is the same
# on every chip (SPMD), so each chip hands those bytes to DCN once per
# execution of the instruction.
_MEGASCALE = '_xla_host_transfer_handler_name="xla_megascale_runtime"'


def dcn_traffic(hlo_text: str, chips: int) -> dict:
  """The bytes each chip hands to the data-centre network per step: the
  operands of the compiled program's megascale `send`s (see above), counted
  as often as they run (x the known trip count of each loop around them),
  by transfer type (ALL_REDUCE: the gradients and global BatchNorm
  statistics; ONE_TO_ONE: a permutation, e.g. mixup's flipped batch; ...).
  What crosses the wire is these payloads as the megascale runtime's
  algorithm moves them: for an all-reduce over k slices a ring sends about
  2 (k - 1) / k of its payload; the planner reports the payloads.
  `dcn_bytes_per_chip_step` is None where the program shows no such
  transfer (not a zero: a compiler that represents DCN otherwise)."""
  comps, entry = _computations(hlo_text)
  runs: dict[str, int] = {}  # computation -> executions per step
  loose: set[str] = set()  # inside a loop of unknown trip count (counted once a trip)

  def visit(name: str, times: int, in_loose: bool):
    runs[name] = runs.get(name, 0) + times
    if in_loose:
      loose.add(name)
    for ln in comps[name]:
      trips, lo = 1, in_loose
      if ' while(' in ln:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ln)
        trips, lo = (int(m.group(1)), lo) if m else (1, True)
      for callee in _CALLEES.findall(ln):
        if callee in comps:
          visit(callee, times * trips, lo)

  if entry is not None:
    visit(entry, 1, False)
  by_type: dict[str, int] = {}
  transfers = unknown = 0
  for name, times in runs.items():
    for ln in comps[name]:
      if _MEGASCALE not in ln or ' send(' not in ln:
        continue
      payload = _ARRAY.search(ln.split(' = ', 1)[-1])  # the result tuple's first array
      kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', ln)
      key = kind.group(1) if kind else 'OTHER'
      nbytes = _array_bytes(payload.group(0)) if payload else 0
      by_type[key] = by_type.get(key, 0) + nbytes * times
      transfers += times
      unknown += name in loose
  total = sum(by_type.values()) if transfers else None
  return {
    'dcn_bytes_per_chip_step': total,
    'dcn_bytes_per_step': None if total is None else total * chips,
    'dcn_bytes_by_type_per_chip_step': by_type,
    'dcn_transfers_per_step': transfers,
    'dcn_transfers_in_loops_of_unknown_count': unknown,
  }


def run_steps(compiled, state, batch, steps: int, warmup: int = 1):
  """Runs a compiled train step `warmup` times, then `steps` timed times,
  device-synchronised: (median step seconds, the last state, its metrics)."""
  import jax  # pylint: disable=import-outside-toplevel

  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  return statistics.median(times), state, metrics


def time_step(compiled, exp, mesh, config, batch: int, steps: int) -> dict:
  """Runs the compiled step on the local devices: median step time, images/s
  and the allocator's peak where the device reports one."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import sharding  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  local = {
    'image': rng.standard_normal((batch,) + input_shape(config)).astype(np.float32),
    'label': rng.integers(0, config.model.num_classes, batch).astype(np.int32),
  }
  gbatch = sharding.global_batch(local, mesh)
  step_s, _, metrics = run_steps(compiled, exp.init_state(), gbatch, steps)
  stats = mesh.devices.flat[0].memory_stats() or {}
  return {
    'measured_step_s': step_s,
    'measured_images_per_s': batch / step_s,
    'measured_peak_bytes_per_chip': stats.get('peak_bytes_in_use'),
    'measured_loss': float(metrics['loss']),
  }


def plan(
  config,
  topology: str = 'local',
  batch: int | None = None,
  steps: int | None = None,
  log=None,
  top: int = 0,
  num_slices: int = 1,
) -> dict:
  """Compiles config's train step for `topology` ('local' or a TPU slice,
  `num_slices` of them) at global `batch` (default config.batch_size) and
  returns report()'s dict; on local accelerators also the measured step
  (`steps` timed steps, default 5 on GPU / TPU, none on CPU)."""
  check_options(config, topology, batch, steps, top, num_slices=num_slices)
  batch = config.batch_size if batch is None else batch
  if topology == 'local':
    devices, chip, target = local_chip()
  else:
    topo = parse_topology(topology)
    config = with_slices(config, num_slices)
    devices = tpu_devices(topo, num_slices)
    chip = CHIPS[topo.generation]
    target = topo.name if num_slices == 1 else f'{num_slices} x {topo.name}'
  if log:
    log(
      f'compiling the train step of {config.get("name", "")} for {target}, global batch {batch} ...'
    )
  compiled, mesh, exp, compile_s = compile_step(config, devices, batch)
  r = report(config, compiled, mesh, batch, chip, compile_s, target)
  if not isinstance(compiled, BaseException):
    hlo = compiled.as_text() if top or r['slices'] > 1 else ''
    if top:
      r['largest_traffic'] = largest_traffic(hlo, top)
    if r['slices'] > 1:
      r.update(dcn_traffic(hlo, r['chips']))
      sent, bw = r['dcn_bytes_per_chip_step'], chip.dcn_bytes_per_s if chip else None
      # The payloads at the chip's published DCN share: a floor for the step's
      # DCN time (overlap with compute and the runtime's algorithm aside).
      r['dcn_s_per_step_at_published_bandwidth'] = sent / bw if sent is not None and bw else None
  if topology == 'local' and not isinstance(compiled, BaseException):
    steps = steps if steps is not None else (0 if devices[0].platform == 'cpu' else 5)
    if steps:
      r.update(time_step(compiled, exp, mesh, config, batch, steps))
  return r


def max_batch(
  config,
  topology: str = 'local',
  start: int | None = None,
  multiple: int = 0,
  log=None,
  limit: int = 2**24,
  num_slices: int = 1,
) -> tuple[int | None, list[dict]]:
  """The largest global batch, a multiple of `multiple` (default: the chips),
  whose step fits: doubling (or halving) from `start` (default: one image
  per chip), then bisection. Returns (that batch, or None if the smallest
  does not fit; every compile's report)."""
  check_options(config, topology, start, 0, 0, multiple, search=True, num_slices=num_slices)
  unit = multiple or data_parallel(config, topology, num_slices)
  reports = []

  def fits(b):
    r = plan(config, topology, b, steps=0, num_slices=num_slices)
    reports.append(r)
    if log:
      log(
        f'  global batch {b}: {"fits" if r["fits"] else "does not fit"} '
        f'(peak {_gib(r.get("hbm_peak_bytes_per_chip"))} per chip, '
        f'compiled in {r["compile_s"]:.0f} s)'
      )
    return r['fits']

  b = start or unit  # check_options: a multiple of unit
  if fits(b):
    lo, hi = b, None
    while hi is None:
      if lo * 2 > limit:
        return lo, reports
      if fits(lo * 2):
        lo *= 2
      else:
        hi = lo * 2
  else:
    lo, hi = None, b
    while lo is None:
      if hi == unit:
        return None, reports
      b = max(unit, hi // 2 // unit * unit)
      if fits(b):
        lo = b
      else:
        hi = b
  assert lo is not None and hi is not None  # each loop above ends with both set
  while hi - lo > unit:  # lo fits, hi does not
    mid = (lo + hi) // 2 // unit * unit
    if mid <= lo:
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo, reports


def _gib(x) -> str:
  return '?' if x is None else f'{x / GiB:.2f} GiB'


def format_report(r: dict) -> str:
  """The report as aligned text rows."""

  def num(x, unit='', scale=1.0, fmt='.3g'):
    return '-' if x is None else f'{x / scale:{fmt}}{unit}'

  rows = [
    ('config', r['config']),
    (
      'target',
      f"{r['target']} ({r['chips']} chips, mesh {'x'.join(map(str, r['mesh'].values()))}"
      + (
        f", {'/'.join(r['axes_across_slices'])} across {r['slices']} slices)"
        if r.get('slices', 1) > 1
        else ')'
      ),
    ),
    (
      'global batch',
      f"{r['global_batch']} ({r['batch_per_chip']:g} per chip), T={r['T']}, "
      f"{r['dtype']}, remat {r['remat'] or 'none'}, loop {r['loop']}",
    ),
  ]
  if 'kernels' in r:  # reports of older planners lack it
    k, res = r['kernels'], r['kernels_resolved']
    rows += [('kernels', k if k == res else f'{k} -> {res}')]
  rows += [('compile', f"{r['compile_s']:.1f} s")]
  cap = r.get('hbm_capacity_bytes_per_chip')
  if not r['fits'] and 'error' in r:
    rows += [('fits', f"NO: {r['error']}")]
    rows += [(f'  {k}', _gib(v)) for k, v in r.get('compiler_figures', {}).items()]
  else:
    rows += [
      (
        'HBM per chip: peak',
        f"{_gib(r['hbm_peak_bytes_per_chip'])} of "
        f"{_gib(cap) if cap else 'unknown'}: "
        f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
      ),
      (
        '  arguments / outputs',
        f"{_gib(r['hbm_argument_bytes_per_chip'])} / "
        f"{_gib(r['hbm_output_bytes_per_chip'])} "
        f"({_gib(r['hbm_alias_bytes_per_chip'])} aliased)",
      ),
      ('  temporaries', _gib(r['hbm_temp_bytes_per_chip'])),
      ('FLOPs per image', num(r['flops_per_image'], ' GFLOP', 1e9)),
      ('HBM bytes per image', num(r['hbm_bytes_per_image'], ' GB', 1e9)),
      (
        'per chip-step',
        f"{num(r['flops_per_chip_step'], ' TFLOP', 1e12)}, "
        f"{num(r['hbm_bytes_per_chip_step'], ' GB', 1e9)}",
      ),
      (
        'arithmetic intensity',
        num(r['arithmetic_intensity'], ' FLOP/byte', 1, '.1f')
        + (f" (ridge {r['ridge_flops_per_byte']:.0f})" if r.get('ridge_flops_per_byte') else ''),
      ),
    ]
    if r.get('roofline_step_s'):
      rows += [
        (
          'roofline step',
          f"{r['roofline_step_s'] * 1e3:.1f} ms, "
          f"{r['roofline_images_per_s']:,.0f} images/s "
          f"({r['roofline_bound']}-bound)",
        )
      ]
  if r.get('slices', 1) > 1:
    sent, secs = r.get('dcn_bytes_per_chip_step'), r.get('dcn_s_per_step_at_published_bandwidth')
    by_type = ', '.join(
      f'{k.lower()} {v / 1e6:.3g} MB'
      for k, v in r.get('dcn_bytes_by_type_per_chip_step', {}).items()
    )
    rows += [
      (
        'DCN per chip-step',
        'not shown in the compiled program'
        if sent is None
        else f'{sent / 1e6:.3g} MB sent over {r["slices"]} slices ({by_type}; '
        f'{r["dcn_transfers_per_step"]} transfers)'
        + (f', {secs * 1e3:.2f} ms at the published DCN bandwidth' if secs else ''),
      )
    ]
  if r.get('measured_step_s'):
    peak = r.get('measured_peak_bytes_per_chip')
    rows += [
      (
        'measured step',
        f"{r['measured_step_s'] * 1e3:.1f} ms, "
        f"{r['measured_images_per_s']:,.1f} images/s"
        + (f', allocator peak {_gib(peak)}' if peak else ''),
      )
    ]
  w = max(len(k) for k, _ in rows)
  text = '\n'.join(f'{k:<{w}}  {v}' for k, v in rows)
  if r.get('largest_traffic'):
    text += (
      '\n\nlargest HBM consumers per chip-step (operands + result of each '
      'top-level op; an estimate from the HLO):\n'
    )
    text += '\n'.join(
      f"  {t['bytes'] / 1e9:7.3f} GB  {t['op']:<16} {t['shape']:<40} {t['source'][-90:]}"
      for t in r['largest_traffic']
    )
  return text


def main(argv):
  """python -m spikeformer_jax.aot: see the module docstring."""
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel

  f = flags.FLAGS
  config = f.config

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  # Errors: errors.report (cli.run). The options first, before anything loads or compiles.
  check_options(
    config, f.topology, f.batch, f.steps, f.top, f.batch_multiple, f.max_batch, f.num_slices
  )
  if f.max_batch:
    best, reports = max_batch(
      config,
      f.topology,
      f.batch,
      f.batch_multiple,
      log=None if f.json else log,
      num_slices=f.num_slices,
    )
    fitting = [r for r in reports if r['fits']]
    r = max(fitting, key=lambda r: r['global_batch']) if fitting else reports[-1]
    r = dict(r, max_global_batch=best, searched_batches=[x['global_batch'] for x in reports])
  else:
    r = plan(
      config,
      f.topology,
      f.batch,
      f.steps,
      log=None if f.json else log,
      top=f.top,
      num_slices=f.num_slices,
    )
  if f.json:
    print(json.dumps(r))
  else:
    print(format_report(r))
    if f.max_batch:
      print(
        f'largest global batch that fits: {r["max_global_batch"]}'
        if r['max_global_batch']
        else 'no batch fits: even one image per chip exceeds the HBM.'
      )
  return 0 if r['fits'] or f.max_batch else 3


def _define_flags():  # checked by check_options
  from absl import flags  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import cli  # pylint: disable=import-outside-toplevel

  cli.define_config_file(
    'config',
    os.path.join(cli.PACKAGED_CONFIGS, 'spikformer.py') + ':digits',
    'Config file (path.py:VARIANT); --config.x=y overrides as in train.py.',
  )
  flags.DEFINE_string(
    'topology',
    'local',
    'local (this machine\'s devices), a TPU slice '
    'GEN:SHAPE (v5e:2x2, v4:2x2x2, v5p:4x4x4, v6e:4x4) or a Cloud '
    'accelerator type (v5litepod-16, v5p-128, v4-8, v6e-8).',
  )
  flags.DEFINE_integer(
    'num_slices',
    1,
    'Slices of --topology joined by the data-centre network (multi-slice): the '
    "mesh's data axis spans them (mesh.dcn_data follows); the report adds the "
    'bytes each chip sends over DCN per step.',
  )
  flags.DEFINE_integer(
    'batch',
    None,
    'Global batch (default: config.batch_size); with --max_batch, where the search starts.',
  )
  flags.DEFINE_bool('max_batch', False, 'Find the largest global batch that fits.')
  flags.DEFINE_integer(
    'batch_multiple',
    0,
    '--max_batch: batches are multiples of this (default: the number of chips).',
  )
  flags.DEFINE_integer(
    'steps', None, 'Local devices: timed steps (default 5 on GPU / TPU, 0 on CPU).'
  )
  flags.DEFINE_bool('json', False, 'Print one JSON object.')
  flags.DEFINE_integer(
    'top',
    0,
    'Also list the N largest HBM consumers of the compiled '
    'step (op, shape, the JAX operation it came from).',
  )


if __name__ == '__main__':
  _define_flags()
  from spikeformer_jax import cli as _cli  # pylint: disable=g-import-not-at-top

  with _STOP:
    _cli.run(main)
