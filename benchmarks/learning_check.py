r"""Learning check: several configs, one small recipe, one seed, one CPU budget.

  python benchmarks/learning_check.py --data=../shared/data/cifar10_subset.npz \
      --configs=configs/sdt.py:cifar10-2-256,configs/a2os2a.py:cifar10-2-256 \
      --budget_s=600 --T=2 [--augment] [--set model.depth=2 ...] [--json]

Each model trains on the .npz (x_train, y_train, x_test, y_test; uint8 CIFAR
images) for the same wall-clock budget, compilation included: after compiling
and timing a few steps, the number of steps that fit the remaining budget sets
a per-step warmup + cosine schedule of that length. Then top-1 on the test
images. This mirrors A2OS2A's Table 1 (baseline vs A2OS2A on one backbone) at a
budget a CPU affords; it measures, it does not reproduce the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top

from benchmarks.train_step import load_config  # pylint: disable=g-import-not-at-top
from spikeformer_jax import config_lib, data as data_lib, experiment, sharding  # pylint: disable=g-import-not-at-top


def small_recipe(
  config,
  *,
  data_path: str,
  T: int,
  batch: int,
  lr: float,
  augment: bool = False,
  overrides: dict | None = None,
):
  """The shared small recipe; augment keeps the config's augmentation and
  mixup (the official recipe's), else both are off."""
  config.data.name, config.data.path = 'npz', data_path
  config.data.mean, config.data.std = config_lib.NORM['cifar10']
  config.model.T = T
  config.batch_size = config.eval_batch_size = batch
  o = config.optimizer
  o.name, o.lr, o.weight_decay, o.min_lr = 'adamw', lr, 0.06, lr / 100
  o.warmup_lr, o.schedule_per_epoch = lr / 100, False
  config.label_smoothing = 0.1
  config.seed = 0
  if not augment:
    config.data.augment = data_lib.augment_config()
    config.mixup.mixup_alpha = config.mixup.cutmix_alpha = 0.0
  return config_lib.apply_overrides(config, overrides or {}, '--set: ')


def run(config, budget_s: float, probe_steps: int = 3) -> dict:
  t0 = time.time()
  mesh = sharding.make_mesh(config.num_devices)
  train_src = data_lib.get_source(config.data, 'train')
  test_src = data_lib.get_source(config.data, 'test')
  loader = data_lib.Loader(
    train_src,
    global_batch=config.batch_size,
    seed=config.seed,
    transform=data_lib.make_transform(config.data, train_src, train=True),
  )
  # The schedule sees 20 "virtual epochs" (1 of warmup) of steps/20 steps each,
  # so warmup + cosine spans exactly the steps that fit; the loader keeps the
  # real epochs.
  o = config.optimizer
  config.epochs, o.warmup_epochs, config.cooldown_epochs = 20, 1, 0

  def compiled(virtual_steps_per_epoch):
    exp = experiment.build(config, mesh, virtual_steps_per_epoch)
    return exp, experiment.make_train_step(exp)

  # Probe: compile and time a few steps (then start again from scratch).
  exp, step = compiled(1)
  state = exp.init_state()
  t_compile = time.time()
  for i in range(probe_steps + 1):
    state, _ = step(state, sharding.global_batch(loader.batch(i), mesh))
    if i == 0:
      jax.block_until_ready(state)
      t_probe = time.time()
  jax.block_until_ready(state)
  step_s = (time.time() - t_probe) / probe_steps
  compile_s = t_probe - t_compile
  left = budget_s - (time.time() - t0) - 2 * compile_s  # train + eval compiles
  steps = max(20, int(left / step_s))
  exp, step = compiled(math.ceil(steps / 20))
  state = exp.init_state()
  for i in range(steps):
    state, m = step(state, sharding.global_batch(loader.batch(i), mesh))
  ev = experiment.evaluate(
    experiment.make_eval_step(exp), state, test_src, mesh, config.eval_batch_size
  )
  return {
    'config': config.get('name', ''),
    'attention': config.model.attention,
    'augment': bool(config.data.augment.rand_augment or config.mixup.mixup_alpha),
    'T': config.model.T,
    'batch': config.batch_size,
    'steps': steps,
    'epochs_seen': round(steps / loader.steps_per_epoch, 2),
    'step_s': round(step_s, 3),
    'wall_s': round(time.time() - t0, 1),
    'train_loss_last': float(m['loss']),
    'test_top1': ev['top1'],
    'test_loss': ev['loss'],
    'test_examples': ev['count'],
    'num_params': exp.num_params,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--data', required=True)
  p.add_argument(
    '--configs', default='configs/sdt.py:cifar10-2-256,configs/a2os2a.py:cifar10-2-256'
  )
  p.add_argument('--budget_s', type=float, default=600)
  p.add_argument('--T', type=int, default=2)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument(
    '--augment',
    action='store_true',
    help="keep the configs' augmentation and mixup (default: none)",
  )
  p.add_argument(
    '--set',
    nargs='*',
    default=[],
    metavar='KEY=VALUE',
    help='config overrides for every config, e.g. model.depth=2',
  )
  p.add_argument('--json', action='store_true')
  a = p.parse_args(argv)
  overrides = config_lib.parse_set(a.set)
  if not os.path.exists(a.data):
    sys.exit(f'--data={a.data} not found (the CIFAR-10 subset lives in ../shared/data).')
  results = []
  for spec in a.configs.split(','):
    config = small_recipe(
      load_config(spec),
      data_path=a.data,
      T=a.T,
      batch=a.batch,
      lr=a.lr,
      augment=a.augment,
      overrides=overrides,
    )
    r = run(config, a.budget_s)
    results.append(r)
    print(
      json.dumps(r)
      if a.json
      else f"{r['config']:<32} top1 {r['test_top1']:.2%}  loss {r['test_loss']:.3f}  "
      f"{r['steps']} steps ({r['epochs_seen']} epochs) in {r['wall_s']} s",
      flush=True,
    )


if __name__ == '__main__':
  main()
