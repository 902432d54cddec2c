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

from spikeformer_jax import aot, config_lib, experiment, flops, models, sharding  # pylint: disable=g-import-not-at-top


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


def run(config, *, batch: int, steps: int, warmup: int, compile_only: bool = False) -> dict:
  mesh = sharding.make_mesh(config.num_devices)
  m = config.model
  exp = experiment.build(config, mesh, steps_per_epoch=100)
  train_step = experiment.make_train_step(exp)
  shape = ((m.T,) if m.flavour == 'dvs' else ()) + (m.img_size, m.img_size, m.in_channels)
  rng = np.random.default_rng(0)
  batch_np = {
    'image': rng.standard_normal((batch,) + shape).astype(np.float32),
    'label': rng.integers(0, m.num_classes, batch).astype(np.int32),
  }
  gbatch = sharding.global_batch(batch_np, mesh)
  state = exp.init_state()

  t = time.perf_counter()
  compiled = train_step.lower(state, gbatch).compile()
  compile_s = time.perf_counter() - t
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
  a = p.parse_args(argv)
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
  if a.target:
    config.num_devices = -1
    r = aot.plan(config, a.target, a.batch)
    print(json.dumps(r) if a.json else aot.format_report(r))
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
