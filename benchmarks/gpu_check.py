r"""The GPU check: one command, under 8 minutes on one H100 / H200.

  bash benchmarks/gpu_check.sh            # installs what the machine lacks from .whl/, then this
  python benchmarks/gpu_check.py [--out=DIR] [--budget_s=420] [--quick]

For Spikformer cifar10-4-384 (batch 128) and imagenet-8-512 (batch 64), T=4 and
T=16, float32 and bfloat16, it compiles the real train step for the local GPU
with the planner (spikeformer_jax/aot.py) and runs it: per case, the
compiler's figures (HBM peak, FLOPs and HBM bytes per image, roofline images/s
at the chip's published figures) beside the measured step time, images/s and
allocator peak, plus a bfloat16 GEMM rate measured in the same run. Each case
runs with model.kernels=xla and then =pallas (--kernels): the Pallas neuron
kernel lowers with Pallas' Triton backend on a GPU (the fused BatchNorm+neuron
kernel is TPU-only: those sites stay XLA's), side by side with the measured
images/s ratio pallas / xla; a setting that fails is recorded as its error
line, beside the other's result. Results go to DIR/gpu_check.json after every
run (a timeout keeps what was done), and a markdown table to DIR/gpu_check.md.
Runs that would start after --budget_s are listed as skipped. Runs on jax
0.10.x and 0.11.x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from benchmarks.train_step import gemm_rate, load_config  # pylint: disable=g-import-not-at-top
from spikeformer_jax import aot  # pylint: disable=g-import-not-at-top

# (config, global batch, T, dtype), most informative first: a timeout cuts the tail.
CASES = [
  ('cifar10-4-384', 128, 4, 'bfloat16'),
  ('cifar10-4-384', 128, 4, 'float32'),
  ('imagenet-8-512', 64, 4, 'bfloat16'),
  ('cifar10-4-384', 128, 16, 'bfloat16'),
  ('imagenet-8-512', 64, 4, 'float32'),
  ('cifar10-4-384', 128, 16, 'float32'),
  ('imagenet-8-512', 64, 16, 'bfloat16'),
  ('imagenet-8-512', 64, 16, 'float32'),
]
QUICK = [('cifar10-4-384,runlocal', 16, 2, 'float32')]
KERNELS = ('xla', 'pallas')  # model.kernels of each case, in this order
NOTE = "On CPU the Pallas kernels run in Pallas' interpret mode: not a speed measure."


def environment() -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  d = jax.devices()[0]
  return {
    'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'flax': flax.__version__,
    'optax': optax.__version__,
    'device_kind': d.device_kind,
    'platform': d.platform,
    'devices': jax.device_count(),
    'memory_limit_bytes': (d.memory_stats() or {}).get('bytes_limit'),
  }


def ratio(results: list[dict], case: str) -> float | None:
  """Measured images/s of `case` with pallas over that with xla (None unless
  both ran)."""
  ips = {r.get('kernels'): r.get('measured_images_per_s') for r in results if r['case'] == case}
  p, x = ips.get('pallas'), ips.get('xla')
  return p / x if p and x else None


def table(results: list[dict]) -> str:
  head = (
    '| config | batch | T | dtype | kernels | compile s | step ms (measured) | '
    'images/s (measured) | pallas / xla | roofline images/s | HBM peak GiB (compiled) | '
    'allocator peak GiB | GB / image | FLOP / byte |\n'
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|'
  )
  rows = []
  for r in results:
    k = r.get('kernels', '')
    if 'error' in r or 'skipped' in r:
      rows.append(
        f"| {r['case']} | | | | {k} | | {r.get('error') or r.get('skipped')} | | | | | | | |"
      )
      continue

    def f(x, scale=1.0, fmt='.1f'):
      return '-' if x is None else f'{x / scale:{fmt}}'

    if k and k != r.get('kernels_resolved', k):
      k = f"{k} -> {r['kernels_resolved']}"
    x = ratio(results, r['case']) if r.get('kernels') == 'pallas' else None
    rows.append(
      f"| {r['config']} | {r['global_batch']} | {r['T']} | {r['dtype']} | {k} | "
      f"{r['compile_s']:.0f} | {f(r.get('measured_step_s'), 1e-3)} | "
      f"{f(r.get('measured_images_per_s'))} | {'' if x is None else f'{x:.2f}x'} | "
      f"{f(r.get('roofline_images_per_s'))} | "
      f"{f(r['hbm_peak_bytes_per_chip'], 2**30, '.2f')} | "
      f"{f(r.get('measured_peak_bytes_per_chip'), 2**30, '.2f')} | "
      f"{f(r['hbm_bytes_per_image'], 1e9, '.3f')} | {f(r.get('arithmetic_intensity'))} |"
    )
  return '\n'.join([head] + rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument(
    '--out', default=os.environ.get('OUT') or os.path.join(ROOT, 'benchmarks', 'results', 'gpu')
  )
  p.add_argument(
    '--budget_s', type=float, default=420.0, help='start no case after this many seconds'
  )
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--quick', action='store_true', help='one tiny case (a smoke test)')
  p.add_argument(
    '--kernels',
    default=','.join(KERNELS),
    help='comma list of model.kernels settings each case runs with, in turn',
  )
  a = p.parse_args(argv)
  settings = a.kernels.split(',')
  if not settings or set(settings) - {'xla', 'pallas', 'auto'}:
    p.error(f'--kernels={a.kernels}: a comma list of xla, pallas, auto')
  os.makedirs(a.out, exist_ok=True)
  t0 = time.perf_counter()
  doc = {'environment': environment(), 'results': []}
  if jax.default_backend() == 'cpu' and not a.quick:
    print('no GPU or TPU here: run with --quick for a smoke test on the CPU', file=sys.stderr)
    return 1
  doc['gemm_bf16_flops_per_s'] = gemm_rate(1024 if a.quick else 8192, dtype=jnp.bfloat16)

  def write():
    with open(os.path.join(a.out, 'gpu_check.json'), 'w', encoding='utf-8') as f:
      json.dump(doc, f, indent=1)
    with open(os.path.join(a.out, 'gpu_check.md'), 'w', encoding='utf-8') as f:
      env = doc['environment']
      f.write(
        f"# GPU check: {env['device_kind']} x{env['devices']}, jax {env['jax']}, "
        f"{env['date']}\n\nbf16 GEMM (8192^3) in the same run: "
        f"{doc['gemm_bf16_flops_per_s'] / 1e12:.0f} TFLOP/s. Each case with "
        f"model.kernels = {', '.join(settings)} in turn; pallas / xla: measured images/s. "
        'Allocator peak: the process\'s so far.'
        + (f" {NOTE}" if env['platform'] == 'cpu' else '')
        + '\n\n'
        + table(doc['results'])
        + '\n'
      )

  for name, batch, T, dtype in QUICK if a.quick else CASES:
    case = f'{name} b{batch} T{T} {dtype}'
    for kernels in settings:
      if time.perf_counter() - t0 > a.budget_s:  # a case's later settings too
        doc['results'].append({'case': case, 'kernels': kernels, 'skipped': 'time budget'})
        continue
      print(f'[{time.perf_counter() - t0:5.0f} s] {case} kernels={kernels}', flush=True)
      try:
        c = load_config(f'configs/spikformer.py:{name}')
        c.model.T, c.model.dtype, c.num_devices = T, dtype, 1
        c.model.kernels = kernels
        r = aot.plan(c, 'local', batch, steps=a.steps)
        r.update(case=case, kernels=kernels)
      except Exception as e:  # pylint: disable=broad-except
        # One setting's failure (e.g. a Triton lowering) is its own row.
        r = {
          'case': case,
          'kernels': kernels,
          'error': aot._first_line(e),  # pylint: disable=protected-access
          'traceback': traceback.format_exc()[-3000:],
        }
      if kernels == 'pallas':
        r['pallas_over_xla'] = ratio(doc['results'] + [r], case)
      doc['results'].append(r)
      write()
      print(aot.format_report(r) if 'error' not in r else r['error'], flush=True)
  doc['wall_s'] = time.perf_counter() - t0
  write()
  print(table(doc['results']))
  return 0


if __name__ == '__main__':
  sys.exit(main())
