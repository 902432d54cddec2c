r"""Input pipeline throughput with the full CIFAR augmentation, beside the train step.

  python benchmarks/input_pipeline.py [--data=../shared/data/cifar10_subset.npz] \
      [--config=configs/spikformer.py:cifar10-4-384] [--batch=16] [--steps=40] \
      [--workers=0,1,2] [--repeats=3] [--no_train_step] [--json]

CIFAR-shaped uint8 images (the real subset if --data exists, else synthetic
32x32x3) go through the config's training transform. For the Spikformer CIFAR
recipe that is the flip, RandAugment rand-m9-n1-mstd0.4-inc1 over Spikformer's
op set, normalisation and random erasing 0.25. Mixup runs on device, inside the
step. The benchmark measures the images/s of:
  * `batch`:   Loader.batch in the main thread, one step after another;
  * `workers=0`: Loader.iterate, with a background thread preparing batches ahead;
  * `workers=N`: Loader.iterate with N grain worker processes.
Rates count the batches after the first; the time to the first batch (the
workers' start-up) is reported apart.
The variants are interleaved and repeated, and each reports its median and
range. In the same run it measures the train step of `--config` at `--batch`
(benchmarks/train_step.py). The ratio pipeline / train step must be well
above 1 for the pipeline not to be the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.train_step import load_config  # pylint: disable=g-import-not-at-top
from spikeformer_jax import config_lib, data as data_lib  # pylint: disable=g-import-not-at-top
from spikeformer_jax.data import sources  # pylint: disable=g-import-not-at-top


def cifar_source(path: str):
  mean, std = config_lib.NORM['cifar10']
  if path and os.path.exists(path):
    return sources.npz('train', path=path, num_classes=10, mean=mean, std=std), 'cifar10_subset'
  src = sources.synthetic('train', shape=(32, 32, 3), num_classes=10, num_examples=5000)
  src.mean, src.std = mean, std
  return src, 'synthetic 32x32x3'


def measure(loader, how: str, steps: int, start: int) -> tuple[float, float]:
  """(images/s of `steps` local batches after the first, seconds to the first)."""
  t0 = time.perf_counter()
  if how == 'batch':
    batches = (loader.batch(s) for s in range(start, start + steps + 1))
  else:
    batches = loader.iterate(start, start + steps + 1)
  next(batches)
  t1 = time.perf_counter()
  for _ in batches:
    pass
  return steps * loader.local_batch / (time.perf_counter() - t1), t1 - t0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--data', default=os.path.join(ROOT, '..', 'shared', 'data', 'cifar10_subset.npz'))
  p.add_argument('--config', default='configs/spikformer.py:cifar10-4-384')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=40)
  p.add_argument('--workers', default='0,1,2')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--no_train_step', action='store_true')
  p.add_argument('--json', action='store_true')
  a = p.parse_args(argv)

  config = load_config(a.config)
  src, what = cifar_source(a.data)
  tf = data_lib.make_transform(config.data, src, train=True)
  variants = ['batch'] + [f'workers={w}' for w in a.workers.split(',')]
  loaders = {
    v: data_lib.Loader(
      src,
      global_batch=a.batch,
      seed=0,
      transform=tf,
      workers=0 if v == 'batch' else int(v.split('=')[1]),
    )
    for v in variants
  }
  rates = {v: [] for v in variants}
  startup = {v: [] for v in variants}
  for r in range(a.repeats):  # interleaved: each repeat runs every variant once
    for v in variants:
      ips, first_s = measure(
        loaders[v], 'batch' if v == 'batch' else 'iterate', a.steps, start=r * (a.steps + 1)
      )
      rates[v].append(ips)
      startup[v].append(first_s)
  result = {
    'data': what,
    'augment': config.data.augment.to_dict(),
    'batch': a.batch,
    'steps': a.steps,
    'cpu_count': os.cpu_count(),
    'pipeline': {},
  }
  for v in variants:
    xs = rates[v]
    result['pipeline'][v] = {
      'median_images_per_s': statistics.median(xs),
      'min': min(xs),
      'max': max(xs),
      'runs': len(xs),
      'seconds_to_first_batch': statistics.median(startup[v]),
    }
  if not a.no_train_step:
    from benchmarks import train_step  # pylint: disable=import-outside-toplevel

    config.batch_size = a.batch
    ts = train_step.run(config, batch=a.batch, steps=5, warmup=2)
    result['train_step'] = {
      k: ts[k] for k in ('config', 'device', 'images_per_s', 'step_time_s', 'compile_s')
    }
    for v in variants:
      result['pipeline'][v]['ratio_to_train_step'] = (
        result['pipeline'][v]['median_images_per_s'] / ts['images_per_s']
      )
  if a.json:
    print(json.dumps(result))
    return
  print(
    f'{what}, batch {a.batch}, {a.steps} steps x {a.repeats} repeats, '
    f'{os.cpu_count()} CPUs; transform of {config.get("name", a.config)}'
  )
  for v, r in result['pipeline'].items():
    ratio = (
      f" | {r['ratio_to_train_step']:.0f}x the train step" if 'ratio_to_train_step' in r else ''
    )
    print(
      f"  {v:<10} {r['median_images_per_s']:8.0f} images/s "
      f"(range {r['min']:.0f}-{r['max']:.0f}; first batch after "
      f"{r['seconds_to_first_batch']:.2f} s){ratio}"
    )
  if 'train_step' in result:
    t = result['train_step']
    print(f"  train step {t['images_per_s']:.2f} images/s ({t['config']}, {t['device']})")


if __name__ == '__main__':
  main()
