"""Our training against recorded runs of the official recipes (issue 17).

The replay itself runs in `python -m spikeformer_jax.fidelity` (64-bit JAX,
hence one subprocess for every recording in ../shared/fixtures/trajectory and
two altered copies, which must fail). The other tests check the pieces the
replay is built from against the official formulas with other arguments than
the recordings', so that nothing is tuned to those files.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from spikeformer_jax.configs import msvit as msvit_cfgs
from spikeformer_jax.configs import sdt as sdt_cfgs
from spikeformer_jax.configs import spikformer as spikformer_cfgs
from spikeformer_jax import optim
from spikeformer_jax import replay
from spikeformer_jax import train_lib

RECORDINGS = ['traj_spikformer_cifar.npz', 'traj_sdt_cifar.npz', 'traj_sdt_lamb.npz',
              'traj_msvit_accum.npz', 'traj_ema.npz']


def _altered(src, dst, **args):
  """A copy of a recording whose official arguments say something else."""
  d = dict(np.load(src))
  cfg = json.loads(str(d['config']))
  cfg['args_used'].update(args)
  d['config'] = np.asarray(json.dumps(cfg))
  np.savez(dst, **d)


@pytest.fixture(scope='module')
def replays(shared_dir, tmp_path_factory):
  folder = shared_dir / 'fixtures' / 'trajectory'
  files = sorted(folder.glob('*.npz'))
  if not files:
    pytest.skip('no trajectory recordings in ../shared/fixtures/trajectory')
  tmp = tmp_path_factory.mktemp('replay')
  altered = []
  if (folder / 'traj_sdt_cifar.npz').exists():  # twice the official weight decay
    _altered(folder / 'traj_sdt_cifar.npz', tmp / 'sdt_wd.npz', weight_decay=0.12)
    altered.append(tmp / 'sdt_wd.npz')
  if (folder / 'traj_ema.npz').exists():  # another EMA decay
    _altered(folder / 'traj_ema.npz', tmp / 'ema_decay.npz', model_ema_decay=0.95)
    altered.append(tmp / 'ema_decay.npz')
  out = tmp / 'reports.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'spikeformer_jax.fidelity', *map(str, files + altered),
       '--json', str(out)],
      cwd=ROOT, env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'), capture_output=True,
      text=True, timeout=900)
  print(proc.stdout[-6000:], proc.stderr[-3000:])
  return {r['file']: r for r in json.loads(out.read_text())}, proc


@pytest.mark.parametrize('name', RECORDINGS)
def test_the_official_recipe_replays_within_tolerance(replays, name):
  by_file, _ = replays
  if name not in by_file:
    pytest.skip(f'{name} absent')
  r = by_file[name]
  assert r['ok'], json.dumps(r, indent=1, default=str)
  assert r['kind'] == 'trajectory' and r['iterations'] >= 8
  want = {'loss', 'lr', 'parameters', 'bn buffers'} | ({'ema'} if 'ema' in name else set())
  assert set(r['checks']) == want
  assert r['checks']['loss']['error'] <= 1e-10 and r['checks']['lr']['error'] <= 1e-13


def test_a_wrong_recipe_is_caught_and_named(replays):
  by_file, proc = replays
  for name, quantity in (('sdt_wd.npz', 'parameters'), ('ema_decay.npz', 'ema')):
    if name not in by_file:
      continue
    r = by_file[name]
    assert not r['ok'], json.dumps(r, indent=1, default=str)
    assert not r['checks'][quantity]['ok']
    assert r['first_mismatch'].startswith('iteration '), r['first_mismatch']
    assert f'{name} ' in proc.stdout and 'first mismatch: iteration' in proc.stdout
  assert proc.returncode == 1


# --- the pieces, against the official formulas --------------------------------------------


def _timm_cosine(epoch, *, lr, warmup_lr, warmup_epochs, epochs, min_lr):
  """timm 0.5.4 / 0.6.12 CosineLRScheduler(t_initial=epochs, warmup_t, cycle_limit=1)._get_lr."""
  if epoch < warmup_epochs:
    return warmup_lr + epoch * ((lr - warmup_lr) / warmup_epochs)
  if epoch < epochs:
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))
  return min_lr


def _mae(epoch, *, lr, warmup_epochs, epochs, min_lr):
  """MSViT imagenet/util/lr_sched.adjust_learning_rate."""
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (
      1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def _rec(args, *, family='spikformer', batch=4, steps_per_epoch=3):
  kw = dict(img_size_h=32, img_size_w=32, patch_size=4, embed_dims=32, num_heads=2,
            mlp_ratios=4, in_channels=3, num_classes=10, depths=1, T=2)
  files = {'spikformer': 'cifar10/model.py', 'msvit': 'imagenet/msformer.py'}
  return {'family': family, 'model_file': files[family], 'constructor_kwargs': kw,
          'input_shape': [batch, 3, 32, 32], 'num_classes': 10, 'batch_size': batch,
          'steps_per_epoch': steps_per_epoch, 'args_used': args, 'seed': 3}


TIMM = dict(opt='adamw', lr=8e-4, weight_decay=0.03, opt_eps=None, opt_betas=None,
            warmup_lr=2e-6, warmup_epochs=2, min_lr=3e-6, epochs=5, cooldown_epochs=2,
            sched='cosine', clip_grad=None, smoothing=0.2, model_ema=True,
            model_ema_decay=0.99)


@pytest.mark.parametrize('args', [TIMM, dict(TIMM, opt='lamb', warmup_epochs=0, cooldown_epochs=0,
                                             model_ema=False, clip_grad=2.0, opt_eps=1e-7)])
def test_a_timm_recipe_becomes_our_fields_and_its_schedule(args):
  c = replay.recipe_config(_rec(args))
  o = c.optimizer
  assert (o.name, o.lr, o.weight_decay, o.b1, o.b2) == (args['opt'], args['lr'],
                                                         args['weight_decay'], 0.9, 0.999)
  assert o.eps == (args['opt_eps'] or {'adamw': 1e-8, 'lamb': 1e-6}[args['opt']])
  assert (o.warmup_lr, o.warmup_epochs, o.min_lr) == (args['warmup_lr'], args['warmup_epochs'],
                                                      args['min_lr'])
  assert (c.epochs, c.cooldown_epochs, c.label_smoothing) == (args['epochs'],
                                                              args['cooldown_epochs'], 0.2)
  assert c.ema_decay == (0.99 if args['model_ema'] else 0.0)
  assert o.grad_clip_norm == (args['clip_grad'] or 0.0) and o.schedule == 'timm_cosine'
  _, schedule = optim.make_optimizer(c, steps_per_epoch=3)
  for step in range(3 * (args['epochs'] + args['cooldown_epochs'])):
    want = _timm_cosine(step // 3, **{k: args[k] for k in (
        'lr', 'warmup_lr', 'warmup_epochs', 'epochs', 'min_lr')})
    assert float(schedule(jnp.int32(step))) == pytest.approx(want, rel=1e-6), step


@pytest.mark.parametrize('accum,steps_per_epoch', [(1, 5), (3, 6), (2, 4)])
def test_the_mae_recipe_sets_each_updates_lr_at_its_first_micro_step(accum, steps_per_epoch):
  args = dict(blr=1e-3, lr=None, weight_decay=0.05, layer_decay=1.0, min_lr=1e-6,
              warmup_epochs=2, epochs=6, accum_iter=accum, smoothing=0.1, clip_grad=None)
  c = replay.recipe_config(_rec(args, family='msvit', batch=8, steps_per_epoch=steps_per_epoch))
  o = c.optimizer
  assert (o.schedule, o.lr_scale_batch, o.accum_steps) == ('mae_cosine', True, accum)
  lr = 1e-3 * 8 * accum / 256  # blr x batch x accum_iter x world size / 256
  assert optim.base_lr(c) == pytest.approx(lr, rel=1e-15)
  _, schedule = optim.make_optimizer(c, steps_per_epoch=steps_per_epoch)
  for micro in range(steps_per_epoch * 6):
    first = micro - micro % accum  # the official loop sets the lr when step % accum == 0
    epoch = (first % steps_per_epoch) / steps_per_epoch + first // steps_per_epoch
    want = _mae(epoch, lr=lr, warmup_epochs=2, epochs=6, min_lr=1e-6)
    assert float(schedule(jnp.int32(micro))) == pytest.approx(want, rel=1e-6, abs=1e-12), micro


# recording -> the paper config of the same official recipe (full length)
PAPER_CONFIGS = {'traj_spikformer_cifar.npz': (spikformer_cfgs, 'cifar10-4-384'),
                 'traj_sdt_cifar.npz': (sdt_cfgs, 'cifar10-2-512'),
                 'traj_sdt_lamb.npz': (sdt_cfgs, 'imagenet-8-512'),
                 'traj_msvit_accum.npz': (msvit_cfgs, 'imagenet-10-384')}


@pytest.mark.parametrize('name', sorted(PAPER_CONFIGS))
def test_each_paper_config_carries_its_official_recipe(shared_dir, name):
  """The recordings' official arguments with the shrunk epochs put back (the
  yml's values) give the paper config's optimizer, schedule and loss fields."""
  path = shared_dir / 'fixtures' / 'trajectory' / name
  if not path.exists():
    pytest.skip(f'{name} absent')
  rec = json.loads(str(np.load(path)['config']))
  yml = rec.get('yml_values') or {}
  args = dict(rec['args_used'])
  restored = {k: type(args[k])(yml[k]) for k in rec['overrides_vs_official'] if k in yml}
  args.update(restored)
  ours = replay.recipe_config(dict(rec, args_used=args))
  module, variant = PAPER_CONFIGS[name]
  paper = module.get_config(variant)
  fields = ['name', 'lr', 'weight_decay', 'b1', 'b2', 'eps', 'min_lr', 'schedule',
            'lr_scale_batch', 'grad_clip_norm']
  if restored or not rec['overrides_vs_official']:  # the yml has the full-length values
    fields += ['warmup_epochs', 'warmup_lr']
  for f in fields:
    assert paper.optimizer[f] == pytest.approx(ours.optimizer[f], rel=1e-12) \
        if isinstance(ours.optimizer[f], float) else paper.optimizer[f] == ours.optimizer[f], f
  assert paper.label_smoothing == ours.label_smoothing and paper.ema_decay == ours.ema_decay
  if 'epochs' in restored:
    assert (paper.epochs, paper.cooldown_epochs) == (ours.epochs, ours.cooldown_epochs)
  if 'batch_size' in yml and 'cifar' in name:  # one GPU; ImageNet ymls give the per-GPU batch
    assert paper.batch_size == int(yml['batch_size'])


def test_unsupported_official_arguments_are_refused_by_name():
  with pytest.raises(NotImplementedError, match="opt='sgd'"):
    replay.recipe_config(_rec(dict(TIMM, opt='sgd')))
  with pytest.raises(NotImplementedError, match="sched='step'"):
    replay.recipe_config(_rec(dict(TIMM, sched='step')))
  with pytest.raises(NotImplementedError, match='accum_iter=3 not dividing the 4 steps'):
    replay.recipe_config(_rec(dict(blr=1e-3, accum_iter=3, weight_decay=0.05, min_lr=0,
                                   warmup_epochs=1, epochs=2), family='msvit', steps_per_epoch=4))
  with pytest.raises(NotImplementedError, match='layer_decay=0.75'):
    replay.recipe_config(_rec(dict(blr=1e-3, layer_decay=0.75, weight_decay=0.05, min_lr=0,
                                   warmup_epochs=1, epochs=2), family='msvit'))


def test_ema_truncates_integer_counters_as_timm():
  ema = {'w': jnp.ones(3), 'count': jnp.zeros((), jnp.int32)}
  want = 0
  for k in range(1, 13):
    ema = train_lib.ema_update(ema, {'w': jnp.zeros(3), 'count': jnp.int32(k)}, 0.9)
    # timm: the int64 buffer <- 0.9 * ema + 0.1 * count in float32, truncated
    want = int(np.float32(0.9) * np.float32(want) + np.float32(0.1) * np.float32(k))
    assert ema['count'].dtype == jnp.int32 and int(ema['count']) == want, k
    assert want == 0 or k >= 10  # 0.1 * k < 1: stays 0, as in the recordings
  np.testing.assert_allclose(ema['w'], 0.9 ** 12, rtol=1e-6)


def test_parameters_the_loss_never_reaches_get_no_weight_decay():
  """SDT's official talking_heads is built (dead_modules) but never called:
  PyTorch gives it no gradient, so AdamW skips it, decay included."""
  from spikeformer_jax import models  # pylint: disable=import-outside-toplevel
  from spikeformer_jax.models import sdt  # pylint: disable=import-outside-toplevel
  mc = sdt.model_config('cifar', embed_dim=32, depth=1, num_heads=2, T=1, num_classes=10,
                        img_size=16)
  mc.dead_modules = True
  model = models.build_model(mc)
  reached = train_lib.params_the_loss_reaches(model, (16, 16, 3))
  flat = {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(reached)[0]}
  unreached = sorted(k for k, v in flat.items() if not v)
  assert unreached and all('talking_heads' in k for k in unreached), unreached
  from flax import nnx  # pylint: disable=import-outside-toplevel
  params = nnx.state(model, nnx.Param)
  mask = optim.decay_mask(params, reached)
  flat_mask = {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): v
               for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert not any(v for k, v in flat_mask.items() if 'talking_heads' in k)
  assert any(v for k, v in flat_mask.items() if 'kernel' in k)
