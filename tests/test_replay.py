"""Our training against recorded runs of the official recipes (issue 17).

The replay itself runs in `python -m spikeformer_jax.fidelity` (64-bit JAX,
hence one subprocess for every recording in ../shared/fixtures/trajectory and
two altered copies, which must fail). The other tests check the pieces the
replay is built from against the official formulas with other arguments than
the recordings', so that nothing is tuned to those files.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import run_fidelity
from spikeformer_jax.configs import msvit as msvit_cfgs
from spikeformer_jax.configs import sdt as sdt_cfgs
from spikeformer_jax.configs import spikformer as spikformer_cfgs
from spikeformer_jax import optim
from spikeformer_jax import recordings
from spikeformer_jax import replay
from spikeformer_jax import experiment, losses

RECORDINGS = [
  'traj_spikformer_cifar.npz',
  'traj_sdt_cifar.npz',
  'traj_sdt_lamb.npz',
  'traj_msvit_accum.npz',
  'traj_ema.npz',
]


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
  if (folder / 'traj_sdt_lamb.npz').exists():  # 1.01x Lamb's weight decay
    args = json.loads(str(np.load(folder / 'traj_sdt_lamb.npz')['config']))['args_used']
    _altered(
      folder / 'traj_sdt_lamb.npz', tmp / 'lamb_wd.npz', weight_decay=args['weight_decay'] * 1.01
    )
    altered.append(tmp / 'lamb_wd.npz')
  if (folder / 'traj_ema.npz').exists():  # another EMA decay
    _altered(folder / 'traj_ema.npz', tmp / 'ema_decay.npz', model_ema_decay=0.95)
    altered.append(tmp / 'ema_decay.npz')
  reports, proc = run_fidelity(files + altered, tmp / 'reports.json', 900)
  print(proc.stdout[-6000:], proc.stderr[-3000:])
  return reports, proc


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
  for name, quantity in (
    ('sdt_wd.npz', 'parameters'),
    ('lamb_wd.npz', 'loss'),
    ('ema_decay.npz', 'ema'),
  ):
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
    1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs))
  )


def _rec(args, *, family='spikformer', batch=4, steps_per_epoch=3):
  kw = dict(
    img_size_h=32,
    img_size_w=32,
    patch_size=4,
    embed_dims=32,
    num_heads=2,
    mlp_ratios=4,
    in_channels=3,
    num_classes=10,
    depths=1,
    T=2,
  )
  files = {'spikformer': 'cifar10/model.py', 'msvit': 'imagenet/msformer.py'}
  return {
    'family': family,
    'model_file': files[family],
    'constructor_kwargs': kw,
    'input_shape': [batch, 3, 32, 32],
    'num_classes': 10,
    'batch_size': batch,
    'steps_per_epoch': steps_per_epoch,
    'args_used': args,
    'seed': 3,
  }


TIMM = dict(
  opt='adamw',
  lr=8e-4,
  weight_decay=0.03,
  opt_eps=None,
  opt_betas=None,
  warmup_lr=2e-6,
  warmup_epochs=2,
  min_lr=3e-6,
  epochs=5,
  cooldown_epochs=2,
  sched='cosine',
  clip_grad=None,
  smoothing=0.2,
  model_ema=True,
  model_ema_decay=0.99,
)


@pytest.mark.parametrize(
  'args',
  [
    TIMM,
    dict(
      TIMM,
      opt='lamb',
      warmup_epochs=0,
      cooldown_epochs=0,
      model_ema=False,
      clip_grad=2.0,
      opt_eps=1e-7,
    ),
  ],
)
def test_a_timm_recipe_becomes_our_fields_and_its_schedule(args):
  c = replay.recipe_config(_rec(args))
  o = c.optimizer
  assert (o.name, o.lr, o.weight_decay, o.b1, o.b2) == (
    args['opt'],
    args['lr'],
    args['weight_decay'],
    0.9,
    0.999,
  )
  assert o.eps == (args['opt_eps'] or {'adamw': 1e-8, 'lamb': 1e-6}[args['opt']])
  assert (o.warmup_lr, o.warmup_epochs, o.min_lr) == (
    args['warmup_lr'],
    args['warmup_epochs'],
    args['min_lr'],
  )
  assert (c.epochs, c.cooldown_epochs, c.label_smoothing) == (
    args['epochs'],
    args['cooldown_epochs'],
    0.2,
  )
  assert c.ema_decay == (0.99 if args['model_ema'] else 0.0)
  assert o.grad_clip_norm == (args['clip_grad'] or 0.0) and o.schedule == 'timm_cosine'
  _, schedule = optim.make_optimizer(c, steps_per_epoch=3)
  for step in range(3 * (args['epochs'] + args['cooldown_epochs'])):
    want = _timm_cosine(
      step // 3, **{k: args[k] for k in ('lr', 'warmup_lr', 'warmup_epochs', 'epochs', 'min_lr')}
    )
    assert float(schedule(jnp.int32(step))) == pytest.approx(want, rel=1e-6), step


@pytest.mark.parametrize('accum,steps_per_epoch', [(1, 5), (3, 6), (2, 4)])
def test_the_mae_recipe_sets_each_updates_lr_at_its_first_micro_step(accum, steps_per_epoch):
  args = dict(
    blr=1e-3,
    lr=None,
    weight_decay=0.05,
    layer_decay=1.0,
    min_lr=1e-6,
    warmup_epochs=2,
    epochs=6,
    accum_iter=accum,
    smoothing=0.1,
    clip_grad=None,
  )
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
PAPER_CONFIGS = {
  'traj_spikformer_cifar.npz': (spikformer_cfgs, 'cifar10-4-384'),
  'traj_sdt_cifar.npz': (sdt_cfgs, 'cifar10-2-512'),
  'traj_sdt_lamb.npz': (sdt_cfgs, 'imagenet-8-512'),
  'traj_msvit_accum.npz': (msvit_cfgs, 'imagenet-10-384'),
}


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
  fields = [
    'name',
    'lr',
    'weight_decay',
    'b1',
    'b2',
    'eps',
    'min_lr',
    'schedule',
    'lr_scale_batch',
    'grad_clip_norm',
  ]
  if restored or not rec['overrides_vs_official']:  # the yml has the full-length values
    fields += ['warmup_epochs', 'warmup_lr']
  for f in fields:
    assert (
      paper.optimizer[f] == pytest.approx(ours.optimizer[f], rel=1e-12)
      if isinstance(ours.optimizer[f], float)
      else paper.optimizer[f] == ours.optimizer[f]
    ), f
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
    replay.recipe_config(
      _rec(
        dict(blr=1e-3, accum_iter=3, weight_decay=0.05, min_lr=0, warmup_epochs=1, epochs=2),
        family='msvit',
        steps_per_epoch=4,
      )
    )
  with pytest.raises(NotImplementedError, match='layer_decay=0.75'):
    replay.recipe_config(
      _rec(
        dict(blr=1e-3, layer_decay=0.75, weight_decay=0.05, min_lr=0, warmup_epochs=1, epochs=2),
        family='msvit',
      )
    )


def test_ema_truncates_integer_counters_as_timm():
  ema = {'w': jnp.ones(3), 'count': jnp.zeros((), jnp.int32)}
  want = 0
  for k in range(1, 13):
    ema = losses.ema_update(ema, {'w': jnp.zeros(3), 'count': jnp.int32(k)}, 0.9)
    # timm: the int64 buffer <- 0.9 * ema + 0.1 * count in float32, truncated
    want = int(np.float32(0.9) * np.float32(want) + np.float32(0.1) * np.float32(k))
    assert ema['count'].dtype == jnp.int32 and int(ema['count']) == want, k
    assert want == 0 or k >= 10  # 0.1 * k < 1: stays 0, as in the recordings
  np.testing.assert_allclose(ema['w'], 0.9**12, rtol=1e-6)


def test_parameters_the_loss_never_reaches_get_no_weight_decay():
  """SDT's official talking_heads is built (dead_modules) but never called:
  PyTorch gives it no gradient, so AdamW skips it, decay included."""
  from spikeformer_jax import models  # pylint: disable=import-outside-toplevel
  from spikeformer_jax.models import sdt  # pylint: disable=import-outside-toplevel

  mc = sdt.model_config(
    'cifar', embed_dim=32, depth=1, num_heads=2, T=1, num_classes=10, img_size=16
  )
  mc.dead_modules = True
  model = models.build_model(mc)
  reached = experiment.params_the_loss_reaches(model, (16, 16, 3))
  flat = {
    '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(reached)[0]
  }
  unreached = sorted(k for k, v in flat.items() if not v)
  assert unreached and all('talking_heads' in k for k in unreached), unreached
  from flax import nnx  # pylint: disable=import-outside-toplevel

  params = nnx.state(model, nnx.Param)
  mask = optim.decay_mask(params, reached)
  flat_mask = {
    '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
  }
  assert not any(v for k, v in flat_mask.items() if 'talking_heads' in k)
  assert any(v for k, v in flat_mask.items() if 'kernel' in k)


def _timm_lamb_clip(grads: dict, order: dict, max_norm: float):
  """timm 0.6.12 Lamb.step's clip in numpy: `torch.zeros(1)`, a float32
  accumulator, += each float64 `grad.pow(2).sum()` in the optimizer's order;
  its sqrt over float32(max_norm) where larger divides the float64 gradients."""
  acc = np.zeros(1, np.float32)
  for k in sorted(grads, key=lambda k: order[k]):  # stable, as the optimizer's groups
    acc += np.float32(math.fsum(np.square(grads[k]).ravel()))
  norm, limit = np.sqrt(acc), np.float32(max_norm)
  factor = norm / limit if norm[0] > limit else np.ones(1, np.float32)
  return {k: g / factor.astype(np.float64) for k, g in grads.items()}, float(factor[0])


@pytest.mark.parametrize('order_kind', ['positions', 'groups'])
@pytest.mark.parametrize('max_norm', [1.0, 0.3])
def test_lamb_clips_as_timm_a_float32_sum_in_the_optimizers_order(order_kind, max_norm):
  # Seed 24: the float32 sum in the reversed order (and of the other group
  # first) rounds to another value here, as it does for many other seeds.
  rng = np.random.default_rng(24)
  shapes = [
    (5,),
    (3, 4),
    (4, 3, 3, 2),
    (1,),
    (64,),
    (8, 9),
    (4, 4, 1),
    (128,),
    (7,),
    (12, 5),
    (16,),
    (2, 8, 3),
    (33,),
    (6, 6),
    (96,),
    (3,),
  ]
  grads = {
    f'p{i:02d}': rng.standard_normal(s) * 10.0 ** rng.uniform(-1.5, 0.3)
    for i, s in enumerate(shapes)
  }
  if order_kind == 'positions':  # the recording's param_groups, flattened
    order = dict(zip(grads, rng.permutation(len(grads)).tolist()))
    arg, reversed_order = order, {k: -v for k, v in order.items()}
  else:  # group ids (timm_lamb's default: no-decay group first, tree order within)
    order = {k: int(g.ndim > 1) for k, g in grads.items()}
    arg = lambda updates: jax.tree.map(lambda g: int(g.ndim > 1), updates)
    reversed_order = {k: 1 - v for k, v in order.items()}
  want, factor = _timm_lamb_clip(grads, order, max_norm)
  assert factor > 1  # the clip is on

  devices = jax.devices()[:4]
  mesh = jax.sharding.Mesh(np.array(devices), ('fsdp',))

  def run(tx, shard=False):
    with jax.enable_x64(True):
      g = {k: jnp.asarray(v) for k, v in grads.items()}
      if shard:  # FSDP-style: leaves whose first axis divides, split over the devices
        g = {
          k: jax.device_put(
            v,
            jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec('fsdp' if v.shape[0] % len(devices) == 0 else None)
            ),
          )
          for k, v in g.items()
        }
      out = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(g)
      return {k: np.asarray(v) for k, v in out.items()}

  # The same float32 divisor: the float64 quotients agree to their last bit
  # (XLA divides by a scalar through its reciprocal).
  for ours in (
    run(optim.timm_clip_by_global_norm(max_norm, arg)),
    run(optim.timm_clip_by_global_norm(max_norm, arg), shard=True),
  ):
    for k in grads:
      assert ours[k].dtype == np.float64
      np.testing.assert_allclose(ours[k], want[k], rtol=1e-15, atol=0, err_msg=k)
  # The test's power: a float64 sum, and another order of the float32 sum,
  # each give another divisor (1e-8 apart, not 1e-16).
  for other in (
    run(optax.clip_by_global_norm(max_norm)),
    run(optim.timm_clip_by_global_norm(max_norm, reversed_order)),
  ):
    assert not all(np.allclose(other[k], want[k], rtol=1e-12, atol=0) for k in grads)


@pytest.mark.parametrize('max_norm', [0.5, 100.0])
def test_grad_clip_norm_is_torchs_clip_grad_norm(max_norm):
  """optimizer.grad_clip_norm: torch.nn.utils.clip_grad_norm_ (timm's
  --clip-grad, MAE's loss scaler): g * min(max / (norm + 1e-6), 1), the norm
  of the per-parameter norms; optax's max / norm is 1e-7 apart."""
  rng = np.random.default_rng(3)
  grads = {f'p{i}': rng.standard_normal(s) for i, s in enumerate([(4, 3), (7,), (2, 2, 5)])}
  total = np.linalg.norm([np.linalg.norm(g) for g in grads.values()])
  coef = min(max_norm / (total + 1e-6), 1.0)
  tx = optim.torch_clip_grad_norm(max_norm)
  with jax.enable_x64(True):
    ours = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(
      {k: jnp.asarray(v) for k, v in grads.items()}
    )
    theirs = optax.clip_by_global_norm(max_norm).update(
      {k: jnp.asarray(v) for k, v in grads.items()}, None
    )[0]
  for k, g in grads.items():
    np.testing.assert_allclose(np.asarray(ours[k]), g * coef, rtol=1e-14, atol=0, err_msg=k)
  if max_norm < total:  # the test's power: optax's clip is measurably another function
    assert not np.allclose(np.asarray(theirs['p0']), grads['p0'] * coef, rtol=1e-9, atol=0)


def test_lamb_clip_divisor_is_the_float32_quotient():
  """norm / float32(max_norm) rounded as float32 division rounds, over many
  norms (XLA's product with a rounded reciprocal misses about one in four)."""
  norms = np.random.default_rng(5).uniform(1.0, 50.0, 400)
  tx = optim.timm_clip_by_global_norm(0.3)
  with jax.enable_x64(True):
    got = jax.jit(jax.vmap(lambda n: tx.update({'g': n[None]}, tx.init(None))[0]['g'][0]))(norms)
  norm32 = np.sqrt(np.float32(norms**2))  # one float64 square, rounded, then float32 sqrt
  want = norms / (norm32 / np.float32(0.3)).astype(np.float64)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-15, atol=0)


def test_lamb_replay_sums_in_the_recordings_param_group_order(shared_dir):
  """The recording's param_groups (no-decay, then decay, each in
  named_parameters() order) give the clip's order; without them, timm's
  grouping of the state_dict order gives the same."""
  path = shared_dir / 'fixtures' / 'trajectory' / 'traj_sdt_lamb.npz'
  if not path.exists():
    pytest.skip('traj_sdt_lamb.npz absent')
  d, rec = recordings.read_recording(str(path))
  initial = recordings.state_dict(d)
  with jax.enable_x64(True):  # the recipe's float64 model
    model, entries = recordings.model_holding(replay.recipe_config(rec).model, initial)
  paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  key_of = {e.path: e.torch_key for e in entries}
  names = [n for g in rec['param_groups'] for n in g['param_names']]
  lamb_order = replay._lamb_order  # pylint: disable=protected-access
  ranks = jax.tree.leaves(lamb_order(model, entries, rec, initial))
  assert [key_of[p] for _, p in sorted(zip(ranks, paths))] == [
    n for n in names if n in set(key_of.values())
  ]
  no_groups = {k: v for k, v in rec.items() if k != 'param_groups'}
  assert jax.tree.leaves(lamb_order(model, entries, no_groups, initial)) == ranks
