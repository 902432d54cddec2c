"""The ahead-of-time planner (spikeformer_jax/aot.py): topology names, the
report of a compiled step on 8 simulated CPU devices, the batch search, the
command line, and, when libtpu is installed, a real TPU topology."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from spikeformer_jax import aot, config_lib, synapses
from spikeformer_jax.configs import spikformer as spikformer_configs

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


@pytest.mark.parametrize(
  'name,gen,shape',
  [
    ('v5e:2x2', 'v5e', (2, 2)),
    ('v5p:4x4x4', 'v5p', (4, 4, 4)),
    ('v4:2x2x1', 'v4', (2, 2, 1)),
    ('v6e:4x4', 'v6e', (4, 4)),
    ('v5litepod-8', 'v5e', (2, 4)),
    ('v5e-256', 'v5e', (16, 16)),
    ('v5p-128', 'v5p', (4, 4, 4)),
    ('v5p-32', 'v5p', (2, 2, 4)),
    ('v4-8', 'v4', (2, 2, 1)),
    ('v6e-32', 'v6e', (4, 8)),
  ],
)
def test_topology_names_as_cloud_gives_them(name, gen, shape):
  t = aot.parse_topology(name)
  assert (t.generation, t.shape) == (gen, shape)


@pytest.mark.parametrize(
  'name,words',
  [
    ('v5e:2x2x1', 'has 2 dimensions'),
    ('v3:2x2', 'use GEN:SHAPE'),
    ('v5p-127', 'cores per chip'),
    ('v5e-12', 'power of two'),
    ('v5e:0x2', 'dimensions of at least 1 chip'),
    ('v5e-0', '0 chips'),
    ('', 'use GEN:SHAPE'),
    ('v5e:2x2 ', 'use GEN:SHAPE'),
    # beyond any real slice: libtpu aborted (std::bad_alloc, a C++ stack)
    ('v5p:1024x1024x1024', 'the largest v5p slice is 16x16x24 .6144 chips.'),
    ('v5e:32x16', 'the largest v5e slice is 16x16'),
    ('v5e-512', 'the largest v5e slice'),
    ('v4:16x16x32', 'the largest v4 slice is 16x16x16'),
    # off the host layout: libtpu refused it only after loading
    ('v5e:3x3', 'not laid out in hosts of 2x2 chips'),
    ('v5p:2x3x4', 'hosts of 2x2x1'),
  ],
)
def test_bad_topologies_say_what_to_use(name, words):
  with pytest.raises(aot.PlanError, match=words):
    aot.parse_topology(name)


@pytest.mark.parametrize(
  'options,message',
  [
    (
      {'batch': -4},
      '--batch=-4 must be an integer >= 1 (the global batch; default: config.batch_size).',
    ),
    ({'batch': 0}, '--batch=0 must be an integer >= 1'),  # it planned batch 64 silently
    ({'batch': 2.5}, '--batch=2.5 must be an integer >= 1'),
    ({'steps': -1}, '--steps=-1 must be an integer >= 0 (timed steps on the local devices'),
    ({'top': -3}, '--top=-3 must be an integer >= 0'),
    ({'batch_multiple': -8, 'search': True}, '--batch_multiple=-8 must be an integer >= 0'),
    ({'batch_multiple': 8}, '--batch_multiple=8 applies to --max_batch only'),
    (
      {'topology': 'v5e:2x2', 'steps': 5},
      '--steps=5 times steps on the local devices; v5e:2x2 is only compiled for',
    ),
    ({'topology': 'v5e-3'}, '3 chips: TPU slices have a power of two of chips.'),
    ({'config': {'model.neuron.tau': float('nan')}}, 'model.neuron.tau=nan must be finite.'),
    # The mesh and the batch against the chips the topology implies (they ran
    # after libtpu loaded; num_devices=3 was blamed on --batch).
    (
      {'topology': 'v5e:2x2', 'batch': 3},
      '--batch=3 must be divisible by the 4 data-parallel devices; use a multiple of 4.',
    ),
    (
      {'topology': 'v5e:2x2', 'config': {'mesh.fsdp': 3}},
      'mesh.fsdp=3 does not divide the 4 devices; use a divisor of 4',
    ),
    (
      {'topology': 'v5e:2x2', 'config': {'mesh.data': 3}},
      'mesh.data=3 x mesh.fsdp=1 must equal the 4 devices',
    ),
    (
      {'topology': 'v5e:2x2', 'config': {'num_devices': 3}},
      'num_devices=3 but v5e:2x2 has 4 chips: use num_devices=-1',
    ),
    ({'topology': 'v5e:2x2', 'config': {'num_devices': 8}}, 'num_devices=8 but v5e:2x2 has 4'),
    ({'topology': 'v5p:4x4x4'}, 'config.batch_size=16 must be divisible by the 64'),
    ({'config': {'mesh.data': 3}}, 'mesh.data=3 x mesh.fsdp=1 must equal the 8 devices'),
    # --num_slices: copies of a TPU topology, the data axis over them (mesh.dcn_data)
    (
      {'num_slices': 2},
      '--num_slices=2 takes copies of a TPU --topology (e.g. --topology=v5e:2x2)',
    ),
    ({'topology': 'v5e:2x2', 'num_slices': 0}, '--num_slices=0 must be an integer >= 1'),
    (
      {'topology': 'v5e:2x2', 'num_slices': 2, 'config': {'mesh.dcn_data': 4}},
      'mesh.dcn_data=4 but --num_slices=2: the data axis spans every slice',
    ),
    (
      {'topology': 'v5e:2x2', 'config': {'mesh.dcn_data': 2}},
      'mesh.dcn_data=2 spans 2 slices: add --num_slices=2',
    ),
    (
      {'topology': 'v5e:2x2', 'num_slices': 2, 'batch': 4},
      '--batch=4 must be divisible by the 8 data-parallel devices',
    ),
    (
      {'topology': 'v5e:2x2', 'num_slices': 2, 'config': {'mesh.fsdp': 8}},
      'mesh.dcn_data=2 must divide mesh.data=1: fsdp stays within a slice',
    ),
    ({'config': {'mesh.dcn_data': 0}}, 'mesh.dcn_data=0 must be >= 1'),
    # --max_batch: a capacity to search against, and batches it can compile
    (
      {'search': True, 'batch_multiple': 8, 'batch': 8},
      '--max_batch on local: 8 x cpu: its memory capacity is unknown, so every batch would '
      '"fit"; give --topology=GEN:SHAPE',
    ),
    (
      {'topology': 'v5e:2x2', 'search': True, 'batch_multiple': 8, 'batch': 4},
      '--batch=4 (where --max_batch starts) is not a multiple of 8 (--batch_multiple)',
    ),
    (
      {'topology': 'v5e:2x2', 'search': True, 'batch': 6},
      '--batch=6 (where --max_batch starts) is not a multiple of 4',
    ),
    (
      {'topology': 'v5e:2x2', 'search': True, 'batch_multiple': 6},
      '--batch_multiple=6 must be a multiple of the 4 data-parallel devices',
    ),
  ],
)
def test_every_planner_option_is_checked_before_compiling(options, message, monkeypatch):
  """One place (check_options), before libtpu loads or anything compiles."""
  monkeypatch.setattr(aot, 'compile_step', lambda *a: pytest.fail('compiled'))
  monkeypatch.setattr(aot, 'tpu_devices', lambda *a: pytest.fail('loaded libtpu'))
  options = dict(options)
  config = config_lib.apply_overrides(
    spikformer_configs.get_config('cifar10-4-384,runlocal'), options.pop('config', {})
  )
  with pytest.raises(ValueError) as e:
    aot.check_options(config, **options)
  assert message in str(e.value) and '\n' not in str(e.value)
  if 'search' not in options and 'batch_multiple' not in options:  # plan() checks them too
    with pytest.raises(ValueError, match=re.escape(message)):
      aot.plan(config, **options)
  elif options.get('search'):  # and max_batch(), before its first compile
    monkeypatch.setattr(aot, 'plan', lambda *a, **k: pytest.fail('planned'))
    with pytest.raises(ValueError, match=re.escape(message)):
      aot.max_batch(
        config,
        options.get('topology', 'local'),
        options.get('batch'),
        options.get('batch_multiple', 0),
      )


def test_the_mesh_rule_is_sharding_s_own():
  """The planner's check and make_mesh share one pure rule (no drift)."""
  from spikeformer_jax import sharding  # pylint: disable=import-outside-toplevel

  assert sharding.mesh_shape(-1, 2, -1, 16) == (2, 8)
  assert sharding.mesh_shape(8, -1, 2, 16) == (4, 2)
  c = _tiny(**{'mesh.data': 2, 'mesh.fsdp': -1})
  assert aot.data_parallel(c, 'v5p:4x4x4') == 64 and aot.data_parallel(c, 'local') == 8


def test_compiler_figures_of_an_out_of_memory_message():
  # libtpu 0.0.42's message (a runlocal model at 16384 images per v5e chip)
  msg = (
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
    'temporaries (29.20G) exceeds available HBM (15.75G).'
  )
  sizes = aot._compiler_sizes(msg)  # pylint: disable=protected-access
  assert sizes == {'HLO temporaries': int(29.20 * 2**30), 'available HBM': int(15.75 * 2**30)}
  assert aot._compiler_sizes('Used 16.56G of 15.75G hbm.') == {  # pylint: disable=protected-access
    'used': int(16.56 * 2**30),
    'capacity': int(15.75 * 2**30),
  }


def _tiny(**over):
  c = spikformer_configs.get_config('cifar10-4-384,runlocal')
  for k, v in over.items():
    config_lib.apply_overrides(c, {k: v})
  return c


@pytest.mark.slow
def test_local_reports_on_eight_cpu_devices_data_and_fsdp_meshes():
  c = _tiny()
  r = aot.plan(c, 'local', batch=16, top=5)
  assert r['chips'] == 8 and r['mesh'] == {'data': 8, 'fsdp': 1} and r['batch_per_chip'] == 2
  assert r['fits'] and r['hbm_capacity_bytes_per_chip'] is None  # a CPU has no HBM figure
  assert r['hbm_peak_bytes_per_chip'] == (
    r['hbm_argument_bytes_per_chip']
    + r['hbm_output_bytes_per_chip']
    - r['hbm_alias_bytes_per_chip']
    + r['hbm_temp_bytes_per_chip']
  )
  # The whole state is donated: every output but the metrics aliases an argument.
  assert r['hbm_alias_bytes_per_chip'] > 0.9 * r['hbm_argument_bytes_per_chip']
  assert r['flops_per_image'] == pytest.approx(r['flops_per_chip_step'] * 8 / 16)
  assert r['hbm_bytes_per_image'] > 0 and r['roofline_images_per_s'] is None
  assert 'measured_step_s' not in r  # CPU: not timed unless asked
  assert (r['kernels'], r['kernels_resolved']) == ('auto', 'xla')  # auto: xla on a CPU
  top = r['largest_traffic']  # where the bytes go: largest first, with their source
  assert len(top) == 5 and [t['bytes'] for t in top] == sorted(
    (t['bytes'] for t in top), reverse=True
  )
  assert top[0]['bytes'] > 0 and any('jit(train_step)' in t['source'] for t in top)
  text = aot.format_report(r)
  assert 'HBM per chip: peak' in text and 'FLOPs per image' in text
  assert 'largest HBM consumers' in text

  # FSDP shards the state: fewer argument bytes per chip; timed on request.
  f = aot.plan(
    _tiny(**{'mesh.data': 2, 'mesh.fsdp': 4, 'mesh.fsdp_min_size': 256}), 'local', batch=16, steps=1
  )
  assert f['mesh'] == {'data': 2, 'fsdp': 4}
  assert f['hbm_argument_bytes_per_chip'] < r['hbm_argument_bytes_per_chip']
  assert f['measured_step_s'] > 0 and f['measured_loss'] == pytest.approx(f['measured_loss'])


def test_dcn_bytes_are_the_megascale_sends_times_their_loops():
  """The compiled program's DCN transfers (megascale host sends, as libtpu
  emits them for a multi-slice program), counted once per execution: x the
  known trip count of a loop around them; other sends and the recvs are not."""
  ms = 'is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",'
  hlo = f"""HloModule m

%body (p: (s32[])) -> (s32[]) {{
  %s2 = (bf16[4,8]{{1,0}}, u32[], token[]) send(%a, %t), channel_id=2, {ms}_xla_megascale_transfer_type="ALL_REDUCE"}}
  %r2 = (bf16[4,8]{{1,0}}, u32[], token[]) recv(%t), channel_id=3, {ms}_xla_megascale_transfer_type="ALL_REDUCE"}}
}}

%cond (p: (s32[])) -> pred[] {{
  ROOT %c = pred[] constant(true)
}}

ENTRY %main (x: f32[16,32]) -> f32[16,32] {{
  %s1 = (f32[16,32]{{1,0:T(8,128)}}, u32[], token[]) send(%x, %t), channel_id=1, {ms}_xla_megascale_transfer_type="ALL_REDUCE"}}
  %s3 = (f32[2,3]{{1,0}}, u32[], token[]) send(%y, %t), channel_id=4, {ms}_xla_megascale_transfer_type="ONE_TO_ONE"}}
  %h = (f32[100]{{0}}, u32[], token[]) send(%z, %t), channel_id=5, is_host_transfer=true
  %w = (s32[]) while(%i), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"5"}}}}
  %u = (s32[]) while(%i), condition=%cond, body=%body
}}
"""
  r = aot.dcn_traffic(hlo, chips=8)
  # 16x32 f32 once; 4x8 bf16 five times (known) + once (unknown count); 2x3 f32 once
  assert r['dcn_bytes_by_type_per_chip_step'] == {'ALL_REDUCE': 2048 + 6 * 64, 'ONE_TO_ONE': 24}
  assert r['dcn_bytes_per_chip_step'] == 2048 + 384 + 24 and r['dcn_bytes_per_step'] == 8 * 2456
  assert r['dcn_transfers_per_step'] == 8 and r['dcn_transfers_in_loops_of_unknown_count'] == 1
  none = aot.dcn_traffic(
    'HloModule m\n\nENTRY %main () -> f32[] {\n  ROOT %c = f32[] constant(0)\n}\n', 8
  )
  assert none['dcn_bytes_per_chip_step'] is None  # not shown: not a zero


def test_chip_table_has_the_generations_people_train_on():
  for key in ('v4', 'v5e', 'v5p', 'v6e', 'v7', 'a100', 'h100', 'h200', 'b200'):
    chip = aot.CHIPS[key]
    assert chip.hbm_bytes > 0 and chip.peak_flops > 0 and chip.hbm_bytes_per_s > 0, key
  assert aot.CHIPS['v7'].hbm_bytes == 192 * 2**30 and aot.CHIPS['v7'].peak_flops == 2307e12

  class Device:  # what a local device reports
    platform, device_kind = 'gpu', 'NVIDIA B200'

  assert aot.chip_for(Device()) is aot.CHIPS['b200']
  Device.platform, Device.device_kind = 'tpu', 'TPU7x'  # a device per TensorCore, 2 a chip
  core = aot.chip_for(Device())
  assert core.hbm_bytes == 96 * 2**30 and core.peak_flops == pytest.approx(2307e12 / 2)


def test_max_batch_is_the_largest_that_fits(monkeypatch):
  """The search itself, against a fake capacity: batches fit up to 40."""
  calls = []

  def fake_plan(config, topology, batch, steps=None, log=None, num_slices=1):
    del config, topology, steps, log, num_slices
    calls.append(batch)
    return {
      'fits': batch <= 40,
      'global_batch': batch,
      'hbm_peak_bytes_per_chip': batch,
      'compile_s': 0.0,
    }

  monkeypatch.setattr(aot, 'plan', fake_plan)
  monkeypatch.setattr(aot, 'local_chip', lambda: (None, aot.CHIPS['h100'], 'local'))
  c = _tiny()
  best, reports = aot.max_batch(c, 'local')
  assert best == 40 and len(reports) == len(calls)
  assert calls[:4] == [8, 16, 32, 64]  # doubling from one per chip, then bisection
  best, _ = aot.max_batch(c, 'local', start=128)  # halving from a start that does not fit
  assert best == 40
  best, _ = aot.max_batch(c, 'local', multiple=16)
  assert best == 32


def test_auto_weight_grad_follows_the_target_not_this_machine():
  assert synapses.resolve('auto') == 'gemm'  # the CPU here
  with synapses.compiling_for('tpu'):
    assert synapses.resolve('auto') == 'xla'
  with synapses.compiling_for('gpu'):
    assert synapses.resolve('auto') == 'xla'
  assert synapses.resolve('auto') == 'gemm'


def test_the_report_names_the_kernels_for_the_target():
  """model.kernels and its choice for the target: 'auto' is pallas for a
  TPU, xla elsewhere; an override is taken as given. No compile: the
  report of an out-of-memory step on the local CPU devices."""
  import jax  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import sharding  # pylint: disable=import-outside-toplevel

  c = _tiny()
  assert aot.kernels_for(c, 'tpu') == ('auto', 'pallas')
  assert aot.kernels_for(c, 'gpu') == ('auto', 'xla')
  assert aot.kernels_for(_tiny(**{'model.kernels': 'xla'}), 'tpu') == ('xla', 'xla')
  mesh = sharding.mesh_from_config(c, jax.devices())
  oom = RuntimeError('RESOURCE_EXHAUSTED: HLO temporaries (16.56G) exceeds available HBM (15.75G)')
  r = aot.report(c, oom, mesh, 16, None, 1.0, 'local')
  assert (r['kernels'], r['kernels_resolved']) == ('auto', 'xla')
  assert re.search(r'^kernels +auto -> xla$', aot.format_report(r), re.M)
  r = aot.report(_tiny(**{'model.kernels': 'pallas'}), oom, mesh, 16, None, 1.0, 'local')
  assert (r['kernels'], r['kernels_resolved']) == ('pallas', 'pallas')
  assert re.search(r'^kernels +pallas$', aot.format_report(r), re.M)


def _cli(*args):
  return subprocess.run(
    [sys.executable, '-m', 'spikeformer_jax.aot', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )


def test_cli_without_libtpu_says_how_to_install(tmp_path):
  # A site directory that hides libtpu (whether or not it is installed).
  (tmp_path / 'sitecustomize.py').write_text(
    'import importlib.util, sys\n'
    '_find = importlib.util.find_spec\n'
    'importlib.util.find_spec = lambda n, *a: None if n == "libtpu" else _find(n, *a)\n'
  )
  env = dict(__import__('os').environ, PYTHONPATH=str(tmp_path))
  p = subprocess.run(
    [
      sys.executable,
      '-m',
      'spikeformer_jax.aot',
      '--topology=v5e:2x2',
      '--config=configs/spikformer.py:cifar10-4-384,runlocal',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=env,
  )
  assert p.returncode == 1, p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith('error: compiling for v5e:2x2 needs libtpu') and '[tpu]' in last


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install '.[tpu]')")
def test_cli_compiles_for_a_tpu_topology_with_overrides():
  """The real thing, small: an SDT runlocal model on a data x fsdp mesh, in
  bfloat16 with the python loop, compiled for a v5e 2x2 slice from this CPU
  machine; one JSON object."""
  p = _cli(
    '--config=configs/sdt.py:cifar10-2-256,runlocal',
    '--topology=v5e:2x2',
    '--batch=32',
    '--config.mesh.data=2',
    '--config.mesh.fsdp=2',
    '--config.model.neuron.loop=python',
    '--config.model.dtype=bfloat16',
    '--json',
  )
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r['target'] == 'v5e:2x2' and r['chips'] == 4 and r['device_kind'] == 'TPU v5 lite'
  assert r['mesh'] == {'data': 2, 'fsdp': 2} and r['loop'] == 'python'
  assert r['dtype'] == 'bfloat16' and r['fits']
  assert (r['kernels'], r['kernels_resolved']) == ('auto', 'pallas')  # auto: pallas on a TPU
  assert r['hbm_capacity_bytes_per_chip'] == 16 * 2**30
  for key in (
    'hbm_peak_bytes_per_chip',
    'flops_per_image',
    'hbm_bytes_per_image',
    'roofline_images_per_s',
    'compile_s',
  ):
    assert r[key] > 0, key
  assert r['roofline_bound'] in ('memory', 'compute')


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install '.[tpu]')")
def test_a_step_that_does_not_fit_is_reported_not_raised():
  """16384 images per v5e chip: the compiler refuses; the planner reports it
  with the compiler's figures and exits 3."""
  p = _cli(
    '--config=configs/spikformer.py:cifar10-4-384,runlocal',
    '--topology=v5e:2x2',
    '--batch=65536',
    '--json',
  )
  assert p.returncode == 3, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r['fits'] is False and r['error'].startswith('RESOURCE_EXHAUSTED')
  assert r['hbm_peak_bytes_per_chip'] > r['hbm_available_bytes_per_chip'] > 15 * 2**30
  assert 'Traceback' not in p.stderr


def test_cli_bad_option_is_one_line_before_compiling():
  p = _cli('--config=configs/spikformer.py:cifar10-4-384,runlocal', '--batch=-4')
  assert (p.returncode, p.stdout) == (1, '')
  assert p.stderr.strip().splitlines()[-1] == (
    'error: --batch=-4 must be an integer >= 1 (the global batch; default: config.batch_size).'
  )
  assert 'Traceback' not in p.stderr and 'compiling' not in p.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install '.[tpu]')")
def test_sigterm_stops_a_tpu_compile_at_once_with_one_line():
  """A compile runs in C++ for minutes and libtpu takes SIGTERM (its handler
  dumps a stack): the planner exits 143 at once, with one line."""
  p = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'spikeformer_jax.aot',
      '--jax_log_compiles',
      '--config=configs/spikformer.py:cifar10-4-384',
      '--topology=v5e:2x2',
      '--batch=64',
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=''),
  )
  try:
    before = []
    for line in p.stderr:  # JAX's log: lowered, next is XLA's compile (minutes here)
      before.append(line)
      if 'Finished jaxpr to MLIR module conversion jit(train_step)' in line:
        break
    assert p.poll() is None, ''.join(before)[-3000:]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)  # "at once": not after the compile
  finally:
    if p.poll() is None:
      p.kill()
  assert (p.returncode, out) == (143, ''), err[-3000:]
  assert err.strip().splitlines()[-1] == 'stopped (SIGTERM): the planner wrote nothing.'
  assert 'Traceback' not in err and 'stack trace' not in err, err[-3000:]


def test_cli_bad_flag_is_one_line():
  p = _cli('--config=configs/spikformer.py:cifar10-4-384,runlocal', '--config.model.TT=3')
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1].startswith('error: --config.model.TT')


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install '.[tpu]')")
def test_a_two_slice_mesh_stacks_the_slices_along_data():
  """The compile-only devices of 2 x v5e:2x2 (each with its slice_index): the
  hybrid mesh puts slice 0 in the first data rows, slice 1 in the rest, fsdp
  and the ring order within each; dcn_data that does not match is one line.
  In a subprocess: libtpu stays out of the test process."""
  script = (
    'from spikeformer_jax import aot, sharding\n'
    'd = aot.tpu_devices(aot.parse_topology("v5e:2x2"), num_slices=2)\n'
    'm = sharding.make_mesh(devices=d, data=4, fsdp=2, dcn_data=2)\n'
    'print([[x.slice_index for x in row] for row in m.devices])\n'
    'print(sharding.axes_across_slices(m), sorted(x.id for x in m.devices.flat) == sorted(x.id for x in d))\n'
    'print([tuple(x.coords[:2]) for x in sharding.make_mesh(devices=d, dcn_data=2).devices.flat])\n'
    'try:\n'
    '  sharding.make_mesh(devices=d)\n'
    'except ValueError as e:\n'
    '  print(e)\n'
  )
  p = subprocess.run(
    [sys.executable, '-c', script],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=dict(os.environ, PYTHONPATH=str(ROOT)),
  )
  assert p.returncode == 0, p.stderr[-3000:]
  rows, axes, ring, error = p.stdout.strip().splitlines()[-4:]
  assert rows == '[[0, 0], [0, 0], [1, 1], [1, 1]]'
  assert axes == "['data'] True"
  # each slice's 2x2 chips in ring order (neighbours on the torus), then the next slice's
  assert ring == str([(0, 0), (1, 0), (1, 1), (0, 1)] * 2)
  assert error == (
    'mesh.dcn_data=1 but the 8 devices are in 2 slice(s); set mesh.dcn_data=2, or use as '
    'many devices as the slices have (num_devices=-1).'
  )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install '.[tpu]')")
def test_cli_compiles_for_two_slices_and_reports_dcn_bytes():
  """--num_slices=2: the real step for 2 x v5e:1x1 (T=1 keeps the compile
  short); the data axis spans both slices (mesh.dcn_data follows) and the
  gradients' all-reduce shows as bytes sent over DCN."""
  p = _cli(
    '--config=configs/spikformer.py:digits',
    '--topology=v5e:1x1',
    '--num_slices=2',
    '--batch=2',
    '--config.model.T=1',
    '--json',
  )
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r['target'] == '2 x v5e:1x1' and r['chips'] == 2 and r['slices'] == 2
  assert r['mesh'] == {'data': 2, 'fsdp': 1} and r['axes_across_slices'] == ['data']
  assert r['fits'] and r['flops_per_image'] > 0
  by_type = r['dcn_bytes_by_type_per_chip_step']
  # at least the float32 parameters' gradients (113,026 of them: the config's table)
  assert by_type['ALL_REDUCE'] >= 4 * 113_026
  assert r['dcn_bytes_per_chip_step'] == sum(by_type.values())
  assert r['dcn_bytes_per_step'] == 2 * r['dcn_bytes_per_chip_step']
  assert r['dcn_s_per_step_at_published_bandwidth'] > 0
