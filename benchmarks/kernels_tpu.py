r"""The fused kernels on TPU, before and after: the planner's figures side by side.

  python benchmarks/kernels_tpu.py [--rows=all|NAME,...] [--out=benchmarks/results/kernels_tpu]

For each row (a config, T, TPU slice and global batch) it compiles train.py's
train step for the slice with the planner (spikeformer_jax/aot.py, libtpu, no
TPU needed) twice, in one process:
  * before: the best exact XLA choice (model.kernels=xla with the python loop,
    model.neuron.recompute and model.bn_recompute: the least HBM traffic and
    peak of the pure-JAX path, benchmarks/results/unroll_study_tpu/);
  * after: the defaults for a TPU target (model.kernels=auto resolves to
    pallas: the fused neuron and BatchNorm+neuron kernels).
Columns: HBM peak per chip, GB of HBM traffic per training image, FLOP per
HBM byte, roofline images/s, compile time; a step that does not fit is
reported as such with the compiler's figures. Writes kernels_tpu.json and
kernels_tpu.md to --out after every compile, so an interrupted run keeps what
it measured. Compiles take minutes each on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.train_step import load_config  # pylint: disable=g-import-not-at-top
from spikeformer_jax import aot, config_lib  # pylint: disable=g-import-not-at-top

GiB = 2**30

# name -> (config, T or None (the config's), topology, global batch)
ROWS = {
  'spikformer-c10-T4': ('spikformer.py:cifar10-4-384', 4, 'v5e:2x2', 256),
  'spikformer-c10-T8': ('spikformer.py:cifar10-4-384', 8, 'v5e:2x2', 256),
  'spikformer-c10-T16': ('spikformer.py:cifar10-4-384', 16, 'v5e:2x2', 256),
  'spikformer-in-8-768': ('spikformer.py:imagenet-8-768', 4, 'v5e:2x2', 256),
  'sdt-in-8-512': ('sdt.py:imagenet-8-512', 4, 'v5e:2x2', 256),
  'msvit-in-10-384': ('msvit.py:imagenet-10-384', None, 'v5e:2x2', 256),
  'a2os2a-c10-2-256': ('a2os2a.py:cifar10-2-256', None, 'v5e:2x2', 256),
  'spikformer-c10-T4-v5p': ('spikformer.py:cifar10-4-384', 4, 'v5p:2x2x1', 256),
  'spikformer-c10-T4-v6e': ('spikformer.py:cifar10-4-384', 4, 'v6e:2x2', 256),
}

SETTINGS = {
  'before': {
    'model.kernels': 'xla',
    'model.neuron.loop': 'python',
    'model.neuron.recompute': True,
    'model.bn_recompute': True,
  },
  'after': {},  # the TPU defaults: model.kernels=auto -> pallas
}
# Each block's and stem stage's activations recomputed in the backward pass:
# what the ImageNet models need to fit a v5e chip.
REMAT = {'model.remat': 'full', 'model.remat_stem': 'full'}
# The kernels on top of the best exact choice: its options still serve the
# layers no kernel covers (MSViT's batch-as-time neuron, a max-pool between a
# BatchNorm and its neuron, SDT's membrane shortcut).
SETTINGS['after_tuned'] = {**SETTINGS['before'], 'model.kernels': 'auto'}
SETTINGS['before_remat'] = {**SETTINGS['before'], **REMAT}
SETTINGS['after_remat'] = {**SETTINGS['after'], **REMAT}
SETTINGS['after_tuned_remat'] = {**SETTINGS['after_tuned'], **REMAT}


def config_for(spec: str, T: int | None, setting: dict):
  config = load_config(os.path.join('configs', spec))
  over = {'model.dtype': 'bfloat16', **setting}
  if T is not None:
    over['model.T'] = T
  return config_lib.apply_overrides(config, over)


def row_of(name: str, setting: str, r: dict) -> dict:
  peak = r.get('hbm_peak_bytes_per_chip')
  return {
    'row': name,
    'setting': setting,
    'config': r.get('config'),
    'T': r.get('T'),
    'target': r.get('target'),
    'global_batch': r.get('global_batch'),
    'batch_per_chip': r.get('batch_per_chip'),
    'fits': r.get('fits'),
    'hbm_peak_gib_per_chip': peak / GiB if peak else None,
    'gb_per_image': (r['hbm_bytes_per_image'] / 1e9) if r.get('hbm_bytes_per_image') else None,
    'flop_per_byte': r.get('arithmetic_intensity'),
    'roofline_images_per_s': r.get('roofline_images_per_s'),
    'compile_s': r.get('compile_s'),
    'error': r.get('error'),
  }


def _num(x, fmt):
  return '-' if x is None else format(x, fmt)


def markdown(rows: list[dict]) -> str:
  lines = [
    'Planner figures (spikeformer_jax/aot.py, deviceless compile with libtpu), bfloat16. '
    '"before": model.kernels=xla with the python loop, neuron.recompute and bn_recompute '
    '(the best exact pure-JAX choice); "after": the TPU defaults (model.kernels=auto -> pallas); '
    '"after_tuned": the kernels with the options of "before" (for the layers no kernel '
    'covers); "_remat": model.remat=full and model.remat_stem=full as well.',
    '',
    '| row | target | batch / chip | setting | HBM peak / chip (GiB) | GB / image '
    '| FLOP / byte | roofline images/s | compile (s) |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    peak = _num(r['hbm_peak_gib_per_chip'], '.2f') + ('' if r['fits'] else ' (does not fit)')
    lines.append(
      f"| {r['config']} T={r['T']} | {r['target']} | {_num(r['batch_per_chip'], '.0f')} "
      f"| {r['setting']} | {peak} | {_num(r['gb_per_image'], '.3f')} "
      f"| {_num(r['flop_per_byte'], '.1f')} | {_num(r['roofline_images_per_s'], ',.0f')} "
      f"| {_num(r['compile_s'], '.0f')} |"
    )
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--rows', default='all', help=f'comma list of {", ".join(ROWS)}, or all')
  p.add_argument('--settings', default='before,after', help=f'comma list of {", ".join(SETTINGS)}')
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'kernels_tpu'))
  a = p.parse_args(argv)
  names = list(ROWS) if a.rows == 'all' else a.rows.split(',')
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    p.error(f'unknown rows {unknown}; valid: {", ".join(ROWS)}')
  os.makedirs(a.out, exist_ok=True)
  path_json = os.path.join(a.out, 'kernels_tpu.json')
  done = json.load(open(path_json)) if os.path.exists(path_json) else []
  for name in names:
    spec, T, topology, batch = ROWS[name]
    for setting in a.settings.split(','):
      done = [d for d in done if (d['row'], d['setting']) != (name, setting)]
      t0 = time.time()
      config = config_for(spec, T, SETTINGS[setting])
      r = aot.plan(config, topology, batch)
      row = row_of(name, setting, r)
      print(json.dumps(row), f'({time.time() - t0:.0f} s)', flush=True)
      done.append(row)
      done.sort(key=lambda d: (list(ROWS).index(d['row']), list(SETTINGS).index(d['setting'])))
      with open(path_json, 'w') as f:
        json.dump(done, f, indent=1)
      with open(os.path.join(a.out, 'kernels_tpu.md'), 'w') as f:
        f.write(markdown(done))
  print(markdown(done))


if __name__ == '__main__':
  main()
