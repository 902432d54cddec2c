r"""How to unroll time: every timestep-loop choice of a config, measured side by side.

  python benchmarks/unroll_study.py --config=configs/spikformer.py:cifar10-4-384 \
      --T=1,2,4,8,16 --dtypes=float32,bfloat16 --remat=,full --synapses=autodiff,lean \
      --batch=16 [--loops=scan,python,vjp --unrolls=all|1,T] [--steps=5 --repeats=3] \
      [--recompute=0,1] [--kernels=xla,pallas] \
      [--target=v5e:2x2 --target_batch=256 [--target_only]] \
      [--out=benchmarks/results/unroll_study]

For each T and dtype, the choices are:
  * `scan` with unroll 1, 2, 4, ... up to T;
  * `python`, the loop unrolled at trace time;
  * `vjp`, the whole-sequence custom-gradient neuron that saves only the
    pre-spike membrane;
  * each of these with every rematerialisation policy of --remat
    (model.remat; '' saves what autodiff saves);
  * and with each synapse backward of --synapses: `autodiff` (conv / linear
    under plain autodiff: model.compact_spikes=False, model.weight_grad='xla',
    the pre-study default) or `lean` (spike inputs saved as int8, weight
    gradients as plain GEMMs where that is faster: the defaults, synapses.py);
  * and with each model.kernels of --kernels (default xla, the pure-JAX
    neuron and BatchNorm, as the study's earlier results; pallas: the fused
    Pallas kernels, in interpret mode on a CPU, so its CPU step times are no
    speed measure; auto: pallas when compiling for TPU, xla elsewhere).

Each choice reports:
  * compile time of the jitted train step;
  * steady-state step time: the median of its timed steps, device-synchronised,
    after a warm-up step. The choices of one (T, dtype) are interleaved over
    --repeats rounds, so noise on a shared machine hits them alike; the spread
    is reported too;
  * peak memory: the compiled program's (arguments + outputs + temporaries -
    aliased) and, where the device reports one, its allocator peak;
  * whether the logits and gradients at initialisation equal those of the
    reference choice (scan, unroll 1, no remat, autodiff): the maximum absolute
    differences, and 'exact' when they are bit-identical.
With --target (a TPU topology; libtpu installed), every choice is also
compiled for that TPU from this machine (spikeformer_jax/aot.py) and gains
the target's columns: per-chip HBM peak and temporaries, HBM bytes per
training image, roofline images/s; --target_only skips the local columns.
Writes study.csv, study.md, study.json and study.png (step time and memory
against T) to --out after every (T, dtype) group, and prints the markdown table. Runs unchanged on CPU, GPU or TPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import optax
from flax import nnx

from benchmarks.train_step import load_config, peak_memory  # pylint: disable=g-import-not-at-top
from spikeformer_jax import blocks, config_lib, experiment, sharding  # pylint: disable=g-import-not-at-top
from spikeformer_jax import kernels as kernels_lib  # pylint: disable=g-import-not-at-top


SYNAPSES = {
  'autodiff': {'model.compact_spikes': False, 'model.weight_grad': 'xla'},
  'lean': {'model.compact_spikes': True, 'model.weight_grad': 'auto'},
}


def choices(
  T: int,
  remats,
  synapses=('autodiff',),
  loops=('scan', 'python', 'vjp'),
  unrolls: str = 'all',
  recomputes=(False,),
  membranes=('float32',),
  kernels=('xla',),
) -> list[dict]:
  """The loop choices of T timesteps, each under every remat policy, synapse
  backward, neuron recomputation, membrane dtype and model.kernels; the first
  is the reference. unrolls: 'all' (1, 2, 4, ... up to T) or a comma list of
  numbers and 'T'."""
  if unrolls == 'all':
    unrolls = sorted({min(2**k, T) for k in range(T.bit_length() + 1)})
  else:
    unrolls = sorted({min(T, T if u == 'T' else int(u)) for u in unrolls.split(',')})
  names = ([('scan', u) for u in unrolls] if 'scan' in loops else []) + [
    (loop, 1) for loop in ('python', 'vjp') if loop in loops
  ]
  return [
    {
      'loop': loop,
      'unroll': u,
      'remat': r,
      'synapse': syn,
      'recompute': rc,
      'membrane': mem,
      'kernels': k,
    }
    for k in kernels
    for mem in membranes
    for rc in recomputes
    for r in remats
    for syn in synapses
    for loop, u in names
  ]


def label(c: dict) -> str:
  name = f"scan/unroll {c['unroll']}" if c['loop'] == 'scan' else c['loop']
  return (
    name
    + (f" + remat {c['remat']}" if c['remat'] else '')
    + (' + lean' if c.get('synapse') == 'lean' else '')
    + (' + recompute' if c.get('recompute') else '')
    + (' + compute-dtype membranes' if c.get('membrane', 'float32') != 'float32' else '')
    + (f" + {c['kernels']} kernels" if c.get('kernels', 'xla') != 'xla' else '')
  )


def choice_config(base, c: dict, T: int, dtype: str, batch: int):
  """`base` with choice `c` at (T, dtype, batch)."""
  return config_lib.apply_overrides(
    base.copy_and_resolve_references(),
    {
      'model.T': T,
      'model.dtype': dtype,
      'model.neuron.loop': c['loop'],
      'model.neuron.unroll': c['unroll'],
      'model.remat': c['remat'],
      'batch_size': batch,
      'model.neuron.recompute': bool(c.get('recompute')),
      'model.neuron.membrane': c.get('membrane', 'float32'),
      'model.kernels': c.get('kernels', 'xla'),
      **SYNAPSES[c['synapse']],
    },
  )


def target_columns(config, target: str, batch: int) -> dict:
  """The step compiled for a TPU topology (aot.py): per-chip HBM, bytes and
  FLOPs per image, roofline; 'target_' columns."""
  from spikeformer_jax import aot  # pylint: disable=import-outside-toplevel

  config = config_lib.apply_overrides(
    config.copy_and_resolve_references(), {'num_devices': -1, 'batch_size': batch}
  )
  r = aot.plan(config, target, batch)
  return {
    'target': target,
    'target_batch': batch,
    'target_fits': r['fits'],
    'target_compile_s': round(r['compile_s'], 1),
    'target_kernels': r.get('kernels_resolved'),  # model.kernels as the target resolved it
    'target_hbm_peak_bytes': r.get('hbm_peak_bytes_per_chip'),
    'target_hbm_temp_bytes': r.get('hbm_temp_bytes_per_chip'),
    'target_hbm_bytes_per_image': r.get('hbm_bytes_per_image'),
    'target_flops_per_image': r.get('flops_per_image'),
    'target_roofline_images_per_s': r.get('roofline_images_per_s'),
  }


def _batch(config, batch: int, mesh):
  m = config.model
  shape = ((m.T,) if m.in_channels == 2 else ()) + (m.img_size, m.img_size, m.in_channels)
  rng = np.random.default_rng(0)
  if m.in_channels == 2:  # event counts
    image = rng.poisson(0.5, (batch,) + shape).astype(np.float32)
  else:
    image = rng.standard_normal((batch,) + shape).astype(np.float32)
  b = {'image': image, 'label': rng.integers(0, m.num_classes, batch).astype(np.int32)}
  return sharding.global_batch(b, mesh)


def _logits_and_grads(exp, state, batch):
  def loss(params):
    model = nnx.merge(exp.graphdef_train, params, state['batch_stats'], copy=True)
    logits = model(batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean(), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state['params'])
  return jax.device_get((logits, grads))


def _max_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def study_group(
  base,
  T: int,
  dtype: str,
  remats,
  *,
  batch: int,
  steps: int,
  repeats: int,
  synapses=('autodiff',),
  loops=('scan', 'python', 'vjp'),
  unrolls: str = 'all',
  recomputes=(False,),
  membranes=('float32',),
  kernels=('xla',),
  target: str = '',
  target_batch: int = 0,
  target_only: bool = False,
  log=print,
) -> list[dict]:
  """Every choice at (T, dtype): compiled, checked against the reference, timed;
  with `target` (a TPU topology) also compiled for it (aot.py); with
  `target_only` for it alone."""
  mesh = sharding.make_mesh(base.num_devices)
  entries = []
  for c in choices(T, remats, synapses, loops, unrolls, recomputes, membranes, kernels):
    config = choice_config(base, c, T, dtype, batch)
    e = dict(choice=c, times=[])
    if target:
      log(f'  T={T} {dtype} {label(c)}: compiling for {target} ...')
      e['target'] = target_columns(config, target, target_batch or batch)
    if not target_only:
      exp = experiment.build(config, mesh, steps_per_epoch=100)
      gbatch = _batch(config, batch, mesh)
      state = exp.init_state()
      logits, grads = _logits_and_grads(exp, state, gbatch)
      t = time.perf_counter()
      compiled = experiment.make_train_step(exp).lower(state, gbatch).compile()
      compile_s = time.perf_counter() - t
      program, device_peak = peak_memory(compiled)
      state, _ = compiled(state, gbatch)  # warm-up
      jax.block_until_ready(state)
      e.update(
        compiled=compiled,
        state=state,
        batch=gbatch,
        compile_s=compile_s,
        program=program,
        device_peak=device_peak,
        logits=logits,
        grads=grads,
      )
    entries.append(e)
  if not target_only:
    for _ in range(repeats):  # interleaved rounds
      for e in entries:
        for _ in range(steps):
          t = time.perf_counter()
          e['state'], m = e['compiled'](e['state'], e['batch'])
          jax.block_until_ready((e['state'], m))
          e['times'].append(time.perf_counter() - t)
  rows = []
  for e in entries:
    row = {
      'config': base.get('name', ''),
      'device': f'{jax.devices()[0].device_kind} x{jax.device_count()}',
      'T': T,
      'dtype': dtype,
      'choice': label(e['choice']),
      **e['choice'],
      'batch': batch,
    }
    if not target_only:
      _, peak = peak_memory(e['compiled'])
      dl = _max_diff(e['logits'], entries[0]['logits'])
      dg = _max_diff(e['grads'], entries[0]['grads'])
      ts = e['times']
      row.update(
        {
          'compile_s': round(e['compile_s'], 2),
          'step_s_median': statistics.median(ts),
          'step_s_min': min(ts),
          'step_s_max': max(ts),
          'timed_steps': len(ts),
          'images_per_s': batch / statistics.median(ts),
          'program_memory_bytes': e['program'],
          'device_peak_bytes': peak or e['device_peak'],
          'max_diff_logits': dl,
          'max_diff_grads': dg,
          'equal': 'exact' if dl == 0 and dg == 0 else f'{max(dl, dg):.1e}',
          'kernels_resolved': kernels_lib.resolve(e['choice']['kernels']),  # on these devices
        }
      )
    row.update(e.get('target', {}))
    rows.append(row)
  for e in entries:
    e.clear()
  return rows


def write(rows: list[dict], out: str) -> dict:
  """study.csv, study.md and study.png in `out`; returns their paths."""
  os.makedirs(out, exist_ok=True)
  paths = {k: os.path.join(out, f'study.{k}') for k in ('csv', 'md', 'png', 'json')}
  with open(paths['csv'], 'w', newline='', encoding='utf-8') as f:
    fields = list(dict.fromkeys(k for r in rows for k in r))  # rows of older runs lack some
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  with open(paths['json'], 'w', encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
  with open(paths['md'], 'w', encoding='utf-8') as f:
    f.write(markdown(rows))
  _plot(rows, paths['png'])
  return paths


def markdown(rows: list[dict]) -> str:
  cpu = 'step_s_median' in rows[0]
  tgt = rows[0].get('target')
  intro = [f"{rows[0]['config']}, batch {rows[0]['batch']}"]
  if cpu:
    intro.append(
      f"on {rows[0]['device']}: step time: median (min-max) of the interleaved "
      'timed steps; memory: the compiled program\'s (device peak where reported); '
      'equal: max |difference| of logits and gradients to the first choice at the '
      'same T and dtype'
    )
    if any(r.get('kernels_resolved') == 'pallas' for r in rows) and 'cpu' in rows[0]['device']:
      intro.append(
        "the Pallas kernels run in Pallas' interpret mode on a CPU: their step times are "
        'no speed measure'
      )
  if tgt:
    intro.append(
      f"compiled for {tgt} (global batch {rows[0]['target_batch']}): per-chip "
      'HBM peak and temporaries, HBM bytes per training image and the roofline '
      'images/s of the compiler\'s figures (spikeformer_jax/aot.py)'
    )
  head, sep = ['T', 'dtype', 'choice'], ['---'] * 3
  if cpu:
    head += ['step (ms)', 'images/s', 'compile (s)', 'memory (MiB)', 'equal']
  if tgt:
    head += [
      f'{tgt}: HBM peak (GiB)',
      'temporaries (GiB)',
      'GB / image',
      'roofline images/s',
      'compile (s)',
    ]
  lines = [
    '; '.join(intro) + '.',
    '',
    '| ' + ' | '.join(head) + ' |',
    '|' + '|'.join(sep + ['---'] * (len(head) - 3)) + '|',
  ]
  for r in rows:
    cells = [str(r['T']), r['dtype'], r['choice']]
    if cpu:
      mem = r['device_peak_bytes'] or r['program_memory_bytes'] or 0
      cells += [
        f"{r['step_s_median'] * 1e3:.0f} ({r['step_s_min'] * 1e3:.0f}-{r['step_s_max'] * 1e3:.0f})",
        f"{r['images_per_s']:.2f}",
        f"{r['compile_s']:.1f}",
        f'{mem / 2**20:.0f}',
        r['equal'],
      ]
    if tgt:

      def gib(x):
        return '-' if x is None else f'{x / 2**30:.2f}'

      fits = '' if r['target_fits'] else ' (does not fit)'
      cells += [
        gib(r['target_hbm_peak_bytes']) + fits,
        gib(r['target_hbm_temp_bytes']),
        '-'
        if r['target_hbm_bytes_per_image'] is None
        else f"{r['target_hbm_bytes_per_image'] / 1e9:.3f}",
        '-'
        if r['target_roofline_images_per_s'] is None
        else f"{r['target_roofline_images_per_s']:,.0f}",
        f"{r['target_compile_s']:.0f}",
      ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _plot(rows, path):
  """Step time and memory against T per choice: the CPU's (when measured) and
  the target's bytes per image and HBM peak (when compiled for one)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  panels = []
  if 'step_s_median' in rows[0]:
    panels += [
      ('train step (ms, median)', lambda r: r['step_s_median'] * 1e3),
      (
        'peak memory (MiB)',
        lambda r: (r['device_peak_bytes'] or r['program_memory_bytes'] or 0) / 2**20,
      ),
    ]
  if rows[0].get('target'):
    t = rows[0]['target']
    panels += [
      (
        f'{t}: HBM bytes / image (GB)',
        lambda r: (r['target_hbm_bytes_per_image'] or float('nan')) / 1e9,
      ),
      (
        f'{t}: HBM peak per chip (GiB)',
        lambda r: (r['target_hbm_peak_bytes'] or float('nan')) / 2**30,
      ),
    ]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  axes = axes[0]

  def key_of(r):
    return (
      r['dtype'],
      r['loop'],
      r['unroll'] if r['unroll'] < r['T'] else 'T',
      r['remat'],
      r.get('synapse', 'autodiff'),
      bool(r.get('recompute')),
      r.get('membrane', 'float32') != 'float32',
      r.get('kernels', 'xla'),
    )

  for key in sorted({key_of(r) for r in rows}, key=str):
    pts = sorted(((r['T'], r) for r in rows if key_of(r) == key), key=lambda p: p[0])
    name = (
      f'{key[1]}'
      + (f'/u{key[2]}' if key[1] == 'scan' else '')
      + (f'+{key[3]}' if key[3] else '')
      + ('+lean' if key[4] == 'lean' else '')
      + ('+recompute' if key[5] else '')
      + ('+bf membranes' if key[6] else '')
      + (f'+{key[7]}' if key[7] != 'xla' else '')
      + f' {key[0]}'
    )
    ts = [t for t, _ in pts]
    style = 'o--' if key[3] else 'o-'  # dashed: with remat
    for ax, (_, value) in zip(axes, panels):
      ax.plot(ts, [value(r) for _, r in pts], style, label=name)
  for ax, (what, _) in zip(axes, panels):
    ax.set_xlabel('T (timesteps)')
    ax.set_ylabel(what)
    ax.set_xscale('log', base=2)
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=6, ncol=2)
  fig.suptitle(
    f"{rows[0]['config']}, batch {rows[0]['batch']}"
    + (f" on {rows[0]['device']}" if 'step_s_median' in rows[0] else '')
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', default='configs/spikformer.py:cifar10-4-384')
  p.add_argument('--T', default='1,2,4,8,16')
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--remat', default=',full', help="comma list of model.remat policies ('' none)")
  p.add_argument(
    '--synapses',
    default='autodiff,lean',
    help=f'comma list of synapse backwards: {", ".join(SYNAPSES)}',
  )
  p.add_argument('--loops', default='scan,python,vjp', help='comma list of neuron loops')
  p.add_argument(
    '--unrolls',
    default='all',
    help="scan unrolls: 'all' (1, 2, 4, ... T) or a comma list, e.g. 1,T",
  )
  p.add_argument(
    '--recompute', default='0', help='comma list of model.neuron.recompute values (0, 1)'
  )
  p.add_argument(
    '--membranes',
    default='float32',
    help="comma list of model.neuron.membrane values (float32, compute: "
    "bfloat16 membranes in a bfloat16 network, not exact)",
  )
  p.add_argument(
    '--kernels',
    default='xla',
    help='comma list of model.kernels values (xla, pallas, auto; on a CPU pallas '
    'runs in interpret mode: its step times are no speed measure)',
  )
  p.add_argument(
    '--target',
    default='',
    help='also compile every choice for this TPU topology (e.g. v5e:2x2; '
    'needs libtpu) and report per-chip HBM and bytes per image',
  )
  p.add_argument(
    '--target_batch', type=int, default=0, help='global batch on the target (default --batch)'
  )
  p.add_argument(
    '--target_only',
    action='store_true',
    help='only the target columns (no CPU compile, timing or equality check)',
  )
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=3, help='timed steps per choice per round')
  p.add_argument('--repeats', type=int, default=3, help='interleaved rounds')
  p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE')
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'unroll_study'))
  p.add_argument(
    '--append',
    action='store_true',
    help="add to the rows of --out's study.json (another grid of choices)",
  )
  a = p.parse_args(argv)
  remats = a.remat.split(',')
  bad = [r for r in remats if r not in blocks.REMAT_POLICIES]
  if bad:
    sys.exit(f'--remat: unknown {bad}; valid: {list(blocks.REMAT_POLICIES)}.')
  synapses, loops = a.synapses.split(','), a.loops.split(',')
  if set(synapses) - set(SYNAPSES) or set(loops) - {'scan', 'python', 'vjp'}:
    sys.exit(f'--synapses from {list(SYNAPSES)}, --loops from scan, python, vjp.')
  kernels = a.kernels.split(',')
  if set(kernels) - set(kernels_lib.KERNELS):
    sys.exit(f'--kernels={a.kernels}: a comma list of {", ".join(kernels_lib.KERNELS)}.')
  base = config_lib.apply_overrides(load_config(a.config), config_lib.parse_set(a.set), '--set: ')
  rows = []
  if a.append and os.path.exists(os.path.join(a.out, 'study.json')):
    with open(os.path.join(a.out, 'study.json'), encoding='utf-8') as f:
      rows = json.load(f)
  for T in map(int, a.T.split(',')):
    for dtype in a.dtypes.split(','):
      rows += study_group(
        base,
        T,
        dtype,
        remats,
        batch=a.batch,
        steps=a.steps,
        repeats=a.repeats,
        synapses=synapses,
        loops=loops,
        unrolls=a.unrolls,
        recomputes=[bool(int(v)) for v in a.recompute.split(',')],
        membranes=a.membranes.split(','),
        kernels=kernels,
        target=a.target,
        target_batch=a.target_batch,
        target_only=a.target_only,
      )
      paths = write(rows, a.out)  # after every group: a long study keeps what it measured
      print(f'T={T} {dtype}: {len(rows)} rows -> {paths["csv"]}', flush=True)
  print(markdown(rows))
  print('written: ' + ', '.join(paths.values()))


if __name__ == '__main__':
  main()
