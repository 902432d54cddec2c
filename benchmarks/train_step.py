r"""Train-step throughput, compile time and memory, beside a GEMM baseline.

  python benchmarks/train_step.py --config=configs/spikformer.py:cifar10-4-384 \
      --batch=16 --T=4 [--dtype=bfloat16] [--loop=scan --unroll=4] [--set K=V ...] \
      [--compile_only] [--json] [--target=v5e:2x2]

Measures in one run on one device kind: the compile time of the jitted train
step, its steady-state time (median of --steps timed steps after warm-up,
device-synchronised), peak memory (the compiled program's memory analysis and,
where the device reports it, its allocator peak), and the model FLOPs per image
(counted analytically from the forward jaxpr, training = 3 x forward) as a
fraction of a float32 GEMM rate measured in the same process. Data is
synthetic and device-resident, so the input pipeline is not measured.
With --target (a TPU topology, libtpu installed) the step is compiled for that
TPU instead and the planner's figures are reported (spikeformer_jax/aot.py:
per-chip HBM, FLOPs and HBM bytes per image, roofline images/s).

--kernels=xla,pallas measures each model.kernels setting side by side in one
run: each compiled and warmed up, then their timed steps interleaved (one of
each in turn), with the speed ratio pallas / xla (with --target: each
setting's planner report and the ratios of its figures). On CPU the Pallas
kernels run in Pallas' interpret mode: a check that they run, not a speed
measure. Without --kernels the config's own setting runs, as before.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from spikeformer_jax import aot, config_lib, experiment, flops, kernels, models, sharding  # pylint: disable=g-import-not-at-top


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  mod_spec = importlib.util.spec_from_file_location(
    'bench_cfg', os.path.join(ROOT, path) if not os.path.isabs(path) else path
  )
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def gemm_rate(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
  """FLOP/s of an n x n x n matmul on the default device (median)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


def peak_memory(compiled) -> tuple[int, int | None]:
  """(compiled program's bytes: arguments + outputs + temporaries - aliased,
  the device allocator's peak if it reports one)."""
  ma = compiled.memory_analysis()
  program = None
  if ma is not None:
    program = (
      ma.argument_size_in_bytes
      + ma.output_size_in_bytes
      + ma.temp_size_in_bytes
      - ma.alias_size_in_bytes
    )
  stats = jax.devices()[0].memory_stats() or {}
  return program, stats.get('peak_bytes_in_use')


def _input_shape(m) -> tuple:
  return ((m.T,) if m.flavour == 'dvs' else ()) + (m.img_size, m.img_size, m.in_channels)


def _compile(config, batch: int):
  """(compiled train step, its initial state, the device-resident batch,
  compile seconds)."""
  mesh = sharding.make_mesh(config.num_devices)
  m = config.model
  exp = experiment.build(config, mesh, steps_per_epoch=100)
  train_step = experiment.make_train_step(exp)
  rng = np.random.default_rng(0)
  batch_np = {
    'image': rng.standard_normal((batch,) + _input_shape(m)).astype(np.float32),
    'label': rng.integers(0, m.num_classes, batch).astype(np.int32),
  }
  gbatch = sharding.global_batch(batch_np, mesh)
  state = exp.init_state()

  t = time.perf_counter()
  compiled = train_step.lower(state, gbatch).compile()
  return compiled, state, gbatch, time.perf_counter() - t


def _model_flops(config) -> int:
  """Forward FLOPs of one image (flops.py: from the forward jaxpr), counted
  on the pure-JAX path: a property of the model, whatever its kernels."""
  m = config_lib.apply_overrides(config.copy_and_resolve_references(), {'model.kernels': 'xla'})
  model = models.build_model(m.model)
  model.eval()
  return flops.forward_flops(
    lambda x: model(x), jnp.zeros((1,) + _input_shape(m.model), jnp.float32)
  )


def run(config, *, batch: int, steps: int, warmup: int, compile_only: bool = False) -> dict:
  m = config.model
  shape = _input_shape(m)
  compiled, state, gbatch, compile_s = _compile(config, batch)
  program_bytes, device_peak = peak_memory(compiled)
  if compile_only:
    return {
      'config': config.get('name', ''),
      'batch': batch,
      'T': m.T,
      'dtype': m.dtype,
      'device': f'{jax.devices()[0].device_kind} x{jax.device_count()}',
      'compile_s': compile_s,
      'program_memory_bytes': program_bytes,
    }

  step_s, state, metrics = aot.run_steps(compiled, state, gbatch, steps, warmup)
  if device_peak is None:
    _, device_peak = peak_memory(compiled)

  model = models.build_model(m)
  model.eval()
  fwd = flops.forward_flops(lambda x: model(x), jnp.zeros((1,) + shape, jnp.float32))
  train_flops = 3 * fwd
  gemm = gemm_rate()
  ips = batch / step_s
  return {
    'config': config.get('name', ''),
    'batch': batch,
    'T': m.T,
    'dtype': m.dtype,
    'loop': m.neuron.loop,
    'unroll': m.neuron.unroll,
    'device': f'{jax.devices()[0].device_kind} x{jax.device_count()}',
    'images_per_s': ips,
    'step_time_s': step_s,
    'compile_s': compile_s,
    'peak_memory_bytes': device_peak or program_bytes,
    'program_memory_bytes': program_bytes,
    'device_peak_bytes': device_peak,
    'model_flops_per_image': train_flops,
    'forward_flops_per_image': fwd,
    'model_flops_per_s': train_flops * ips,
    'gemm_flops_per_s': gemm,
    'fraction_of_gemm': train_flops * ips / gemm,
    'final_loss': float(metrics['loss']),
  }


INTERPRET_NOTE = (
  "on CPU the Pallas kernels run in Pallas' interpret mode (XLA ops, for "
  'the exactness tests): not a speed measure'
)


def kernels_config(config, setting: str):
  """`config` with model.kernels = `setting`."""
  return config_lib.apply_overrides(
    config.copy_and_resolve_references(), {'model.kernels': setting}
  )


def speed_ratio(results: list[dict], key: str = 'images_per_s') -> float | None:
  """`key` of the first result whose kernels resolved to pallas over that of
  the first that resolved to xla (None unless both were measured)."""
  by = {}
  for r in results:
    by.setdefault(r['kernels_resolved'], r.get(key))
  p, x = by.get('pallas'), by.get('xla')
  return p / x if p and x else None


def compare(
  config, settings: list[str], *, batch: int, steps: int, warmup: int, compile_only: bool = False
) -> dict:
  """The train step under each model.kernels of `settings`, side by side in
  one run: each compiled and warmed up, then their timed steps interleaved
  (one step of each in turn), so that noise hits them alike. A dict:
  'results' (one of run()'s dicts per setting, with 'kernels' and
  'kernels_resolved'), 'pallas_over_xla' (images/s ratio) and a 'note' where
  the numbers are no speed measure."""
  platform = jax.devices()[0].platform
  m = config.model
  entries = []
  for k in settings:
    c = kernels_config(config, k)
    compiled, state, gbatch, compile_s = _compile(c, batch)
    program_bytes, _ = peak_memory(compiled)
    _, resolved = aot.kernels_for(c, platform)
    entries.append(
      dict(
        kernels=k,
        resolved=resolved,
        compiled=compiled,
        state=state,
        batch=gbatch,
        compile_s=compile_s,
        program=program_bytes,
        times=[],
      )
    )
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  results = []
  if not compile_only:
    for e in entries:
      for _ in range(warmup):
        e['state'], e['metrics'] = e['compiled'](e['state'], e['batch'])
      jax.block_until_ready(e['state'])
    for _ in range(steps):  # interleaved: one step of each setting in turn
      for e in entries:
        t = time.perf_counter()
        e['state'], e['metrics'] = e['compiled'](e['state'], e['batch'])
        jax.block_until_ready((e['state'], e['metrics']))
        e['times'].append(time.perf_counter() - t)
    fwd = _model_flops(config)
    gemm = gemm_rate()
  # The allocator's peak is the process's, over every setting: one figure.
  _, device_peak = peak_memory(entries[0]['compiled'])
  for e in entries:
    r = {
      'config': config.get('name', ''),
      'kernels': e['kernels'],
      'kernels_resolved': e['resolved'],
      'batch': batch,
      'T': m.T,
      'dtype': m.dtype,
      'loop': m.neuron.loop,
      'unroll': m.neuron.unroll,
      'device': device,
      'compile_s': e['compile_s'],
      'program_memory_bytes': e['program'],
    }
    if not compile_only:
      step_s = statistics.median(e['times'])
      ips = batch / step_s
      r.update(
        images_per_s=ips,
        step_time_s=step_s,
        step_time_min_s=min(e['times']),
        step_time_max_s=max(e['times']),
        device_peak_bytes_all_settings=device_peak,
        model_flops_per_image=3 * fwd,
        forward_flops_per_image=fwd,
        model_flops_per_s=3 * fwd * ips,
        gemm_flops_per_s=gemm,
        fraction_of_gemm=3 * fwd * ips / gemm,
        final_loss=float(e['metrics']['loss']),
      )
    results.append(r)
    e.clear()
  out: dict = {'results': results}
  if not compile_only:
    out['pallas_over_xla'] = speed_ratio(results)
  if platform == 'cpu' and any(r['kernels_resolved'] == 'pallas' for r in results):
    out['note'] = INTERPRET_NOTE
  return out


def comparison_text(out: dict) -> str:
  """compare()'s dict as aligned rows, one column per setting."""
  rs = out['results']
  r0 = rs[0]

  def row(name, fmt):
    return (name, [fmt(r) for r in rs])

  rows = [
    ('config', [r0['config']]),
    ('device', [r0['device']]),
    (
      'batch x T',
      [f"{r0['batch']} x {r0['T']} ({r0['dtype']}, {r0['loop']}/unroll {r0['unroll']})"],
    ),
    row(
      'kernels',
      lambda r: (
        r['kernels']
        if r['kernels'] == r['kernels_resolved']
        else f"{r['kernels']} -> {r['kernels_resolved']}"
      ),
    ),
    row('compile', lambda r: f"{r['compile_s']:.1f} s"),
    row('program memory', lambda r: f"{(r['program_memory_bytes'] or 0) / 2**20:.0f} MiB"),
  ]
  if 'step_time_s' in r0:
    peak = r0['device_peak_bytes_all_settings']
    rows += [
      row(
        'step time (median, min-max)',
        lambda r: (
          f"{r['step_time_s'] * 1e3:.1f} ms ({r['step_time_min_s'] * 1e3:.1f}-"
          f"{r['step_time_max_s'] * 1e3:.1f})"
        ),
      ),
      row('throughput', lambda r: f"{r['images_per_s']:.2f} images/s"),
      row('model FLOP/s / GEMM rate', lambda r: f"{r['fraction_of_gemm']:.1%}"),
      row('final loss', lambda r: f"{r['final_loss']:.6g}"),
      ('model FLOPs / image (train)', [f"{r0['model_flops_per_image'] / 1e9:.2f} GFLOP"]),
      ('float32 GEMM rate (same run)', [f"{r0['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s"]),
    ]
    if peak:
      rows += [('allocator peak (all settings)', [f'{peak / 2**20:.0f} MiB'])]
    ratio = out.get('pallas_over_xla')
    if ratio is not None:
      rows += [('speed pallas / xla', [f'{ratio:.3g}x'])]
  if out.get('note'):
    rows += [('note', [out['note']])]
  w = max(len(k) for k, _ in rows)
  cw = max((len(v) for _, vs in rows if len(vs) > 1 for v in vs), default=0)
  return '\n'.join(f'{k:<{w}}  ' + '  '.join(f'{v:<{cw}}' for v in vs).rstrip() for k, vs in rows)


def target_comparison(reports: list[dict]) -> str:
  """The planner's reports of each setting, then pallas / xla of its figures."""
  text = '\n\n'.join(aot.format_report(r) for r in reports)
  ratios = [
    (what, speed_ratio(reports, key))
    for what, key in (
      ('HBM bytes per image', 'hbm_bytes_per_image'),
      ('HBM peak per chip', 'hbm_peak_bytes_per_chip'),
      ('roofline images/s', 'roofline_images_per_s'),
    )
  ]
  shown = [f'{what} {x:.3g}x' for what, x in ratios if x is not None]
  return text + ('\n\npallas / xla: ' + ', '.join(shown) if shown else '')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', default='configs/spikformer.py:cifar10-4-384')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--T', type=int, default=None)
  p.add_argument('--dtype', default=None, choices=['float32', 'bfloat16'])
  p.add_argument('--loop', default=None, choices=['scan', 'python', 'vjp'])
  p.add_argument('--unroll', type=int, default=None, help='0: all T steps')
  p.add_argument('--bn_scope', default=None, choices=['global', 'device'])
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument(
    '--set',
    nargs='*',
    default=[],
    metavar='KEY=VALUE',
    help='config overrides, e.g. model.compact_spikes=False',
  )
  p.add_argument(
    '--compile_only', action='store_true', help='report compile time and program memory only'
  )
  p.add_argument('--json', action='store_true', help='print one JSON object')
  p.add_argument(
    '--target',
    default='',
    help='compile for this TPU topology instead (e.g. v5e:2x2; --batch is then the global batch)',
  )
  p.add_argument(
    '--kernels',
    default='',
    help='comma list of model.kernels settings (xla, pallas, auto) measured side by '
    "side in one run, e.g. xla,pallas (default: the config's alone). On CPU pallas "
    'runs in interpret mode: no speed measure',
  )
  a = p.parse_args(argv)
  settings = [k for k in a.kernels.split(',') if k] if a.kernels else []
  bad = [k for k in settings if k not in kernels.KERNELS]
  if bad or len(set(settings)) < len(settings):
    p.error(f'--kernels={a.kernels}: a comma list of distinct {", ".join(kernels.KERNELS)}')
  config = config_lib.apply_overrides(load_config(a.config), config_lib.parse_set(a.set), '--set: ')
  for field, value in (('T', a.T), ('dtype', a.dtype)):
    if value is not None:
      config.model[field] = value
  if a.loop:
    config.model.neuron.loop = a.loop
  if a.unroll is not None:
    config.model.neuron.unroll = a.unroll
  if a.bn_scope:
    config.bn_scope = a.bn_scope
  config.batch_size = a.batch
  if a.target and settings:
    config.num_devices = -1
    reports = [aot.plan(kernels_config(config, k), a.target, a.batch) for k in settings]
    print(json.dumps({'results': reports}) if a.json else target_comparison(reports))
    return
  if a.target:
    config.num_devices = -1
    r = aot.plan(config, a.target, a.batch)
    print(json.dumps(r) if a.json else aot.format_report(r))
    return
  if settings:
    out = compare(
      config, settings, batch=a.batch, steps=a.steps, warmup=a.warmup, compile_only=a.compile_only
    )
    print(json.dumps(out) if a.json else comparison_text(out))
    return
  r = run(config, batch=a.batch, steps=a.steps, warmup=a.warmup, compile_only=a.compile_only)
  if a.json or a.compile_only:
    print(json.dumps(r))
    return
  rows = [
    ('config', r['config']),
    ('device', r['device']),
    ('batch x T', f"{r['batch']} x {r['T']} ({r['dtype']}, {r['loop']}/unroll {r['unroll']})"),
    ('compile', f"{r['compile_s']:.1f} s"),
    ('step time (median)', f"{r['step_time_s'] * 1e3:.1f} ms"),
    ('throughput', f"{r['images_per_s']:.2f} images/s"),
    ('peak memory', f"{(r['peak_memory_bytes'] or 0) / 2**20:.0f} MiB"),
    ('model FLOPs / image (train)', f"{r['model_flops_per_image'] / 1e9:.2f} GFLOP"),
    ('model FLOP/s', f"{r['model_flops_per_s'] / 1e9:.1f} GFLOP/s"),
    ('float32 GEMM rate (same run)', f"{r['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s"),
    ('model FLOP/s / GEMM rate', f"{r['fraction_of_gemm']:.1%}"),
  ]
  w = max(len(k) for k, _ in rows)
  print('\n'.join(f'{k:<{w}}  {v}' for k, v in rows))


if __name__ == '__main__':
  main()
