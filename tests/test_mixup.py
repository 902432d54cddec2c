"""Mixup / CutMix on device (timm's Mixup, 'batch' mode), EMA, soft targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT  # noqa: F401
from spikeformer_jax import config_lib, experiment, restore, train_lib
from spikeformer_jax.data import mixup

K = 5


def _batch(shape=(6, 8, 8, 3)):
  x = jax.random.uniform(jax.random.key(0), shape)
  return x, jnp.arange(shape[0]) % K


def _mix(cfg, key=1, enabled=True, shape=(6, 8, 8, 3), smoothing=0.1):
  x, y = _batch(shape)
  out, t, lam = mixup.mix_batch(
    jax.random.key(key), x, y, cfg, num_classes=K, smoothing=smoothing, enabled=enabled
  )
  return x, y, np.asarray(out), np.asarray(t), float(lam)


def test_smooth_one_hot_is_timm_mixup_target():
  t = mixup.smooth_one_hot(jnp.asarray([2]), 5, 0.1)
  np.testing.assert_allclose(t, [[0.02, 0.02, 0.92, 0.02, 0.02]], rtol=1e-6)


def test_mixup_blends_with_the_flipped_batch():
  cfg = mixup.mixup_config(mixup_alpha=0.5)
  x, y, out, t, lam = _mix(cfg)
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
  y1 = np.asarray(mixup.smooth_one_hot(y, K, 0.1))
  np.testing.assert_allclose(t, lam * y1 + (1 - lam) * y1[::-1], rtol=1e-5)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_pastes_a_box_and_corrects_lam():
  cfg = mixup.mixup_config(cutmix_alpha=1.0)
  for key in range(8):
    x, _, out, t, lam = _mix(cfg, key=key, shape=(4, 16, 16, 2))
    pasted = ~np.isclose(out, np.asarray(x)).all(axis=(0, 3))  # [H, W]: where any row changed
    frac = pasted.mean()
    assert lam == pytest.approx(1.0 - frac, abs=1e-6)
    if frac:  # a rectangle
      ys, xs = np.nonzero(pasted)
      assert pasted[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()
      np.testing.assert_array_equal(out[:, pasted], np.asarray(x)[::-1][:, pasted])
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_on_event_frames_boxes_every_timestep():
  cfg = mixup.mixup_config(cutmix_alpha=1.0)
  x, _, out, _, lam = _mix(cfg, key=3, shape=(4, 3, 16, 16, 2))
  changed = ~np.isclose(out, np.asarray(x))
  assert (changed.any(axis=(0, 1, 4)) == changed[:, 0].any(axis=(0, 3))).all()  # same box every t
  assert lam < 1.0


def test_switch_prob_picks_both_and_prob_zero_and_off_epoch_leave_images():
  cfg = mixup.mixup_config(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  kinds = set()
  for key in range(12):
    x, _, out, _, lam = _mix(cfg, key=key)
    box = np.isclose(out, np.asarray(x)).all(-1) | np.isclose(out, np.asarray(x)[::-1]).all(-1)
    kinds.add('cutmix' if box.all() else 'mixup')
  assert kinds == {'cutmix', 'mixup'}
  for cfg, enabled in (
    (mixup.mixup_config(mixup_alpha=0.5, prob=0.0), True),
    (mixup.mixup_config(mixup_alpha=0.5), False),
  ):
    x, y, out, t, lam = _mix(cfg, enabled=enabled)
    assert lam == 1.0
    np.testing.assert_array_equal(out, x)
    np.testing.assert_allclose(t, mixup.smooth_one_hot(y, K, 0.1), rtol=1e-6)


def test_mix_prob_is_respected():
  cfg = mixup.mixup_config(mixup_alpha=1.0, prob=0.3)
  lams = [_mix(cfg, key=k)[-1] for k in range(200)]
  assert 0.2 < np.mean(np.asarray(lams) < 1.0) < 0.4


def test_mixing_a_sharded_batch_is_exact():
  from spikeformer_jax import sharding  # pylint: disable=import-outside-toplevel

  cfg = mixup.mixup_config(mixup_alpha=0.5, cutmix_alpha=1.0)
  x = np.random.default_rng(0).standard_normal((16, 8, 8, 3)).astype(np.float32)
  y = np.arange(16) % K
  f = jax.jit(
    lambda b, s: mixup.mix_batch(
      jax.random.fold_in(jax.random.key(0), s),
      b['image'],
      b['label'],
      cfg,
      num_classes=K,
      smoothing=0.1,
    )
  )
  for step in range(4):
    one, eight = (
      f(
        sharding.global_batch({'image': x, 'label': y}, sharding.make_mesh(n, **ax)),
        jnp.int32(step),
      )
      for n, ax in ((1, {}), (8, {'data': 2, 'fsdp': 4}))
    )
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(eight[0]))
    np.testing.assert_allclose(np.asarray(one[1]), np.asarray(eight[1]), atol=1e-7)


def _step_config(**over):
  from test_models import cfgs  # pylint: disable=import-outside-toplevel

  c = cfgs.get_config('cifar10-4-384,runlocal')
  return config_lib.apply_overrides(c, over)


@pytest.mark.slow
def test_train_step_mixup_is_keyed_by_step_and_stops_at_off_epoch():
  """Same step, same mix: a run with an off epoch (another program) repeats
  the losses of one without before it; after it, its steps differ from those
  of the run that still mixes (so mixing changes the step, and it stops)."""
  from test_train import _run_steps  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import sharding  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(1)
  on = {'mixup.mixup_alpha': 0.0, 'mixup.cutmix_alpha': 1.0}
  # runlocal: 64 examples / batch 16 = 4 steps per epoch: steps 0-3 mix, 4-5 do not.
  mixed, _ = _run_steps(_step_config(**on), mesh, 6)
  switched_off, _ = _run_steps(_step_config(**on, **{'mixup.off_epoch': 1, 'epochs': 1}), mesh, 6)
  assert switched_off[:4] == mixed[:4]
  assert switched_off[4] != mixed[4] and switched_off[5] != mixed[5]


@pytest.mark.slow
def test_ema_tracks_weights_and_is_evaluated(tmp_path):
  # One device throughout: the run, its evaluation and the steps by hand below
  # are then the same programs (compiled once, then JAX's compilation cache).
  c = _step_config(ema_decay=0.5, total_steps=2, num_devices=1)
  final = train_lib.train_and_evaluate(c, str(tmp_path))
  assert 'test_ema_top1' in final and 0.0 <= final['test_ema_top1'] <= 1.0
  res = restore.evaluate_checkpoint(c, str(tmp_path), ema=True)
  assert res['top1'] == pytest.approx(final['test_ema_top1'])
  # Two steps by hand: ema = 0.25 p0 + 0.25 p1 + 0.5 p2 (decay 0.5).
  from spikeformer_jax import data as data_lib, sharding  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(1)
  exp = experiment.build(c, mesh, 4)
  step = experiment.make_train_step(exp)
  src = data_lib.get_source(c.data, 'train')
  loader = data_lib.Loader(
    src,
    global_batch=c.batch_size,
    seed=c.seed,
    transform=data_lib.make_transform(c.data, src, train=True),
  )
  state = exp.init_state()
  ps = [jax.device_get(state['params'])]
  for i in range(2):
    state, _ = step(state, sharding.global_batch(loader.batch(i), mesh))
    ps.append(jax.device_get(state['params']))
  want = jax.tree.map(lambda a, b, c_: 0.25 * a + 0.25 * b + 0.5 * c_, *ps)
  for a, b in zip(jax.tree.leaves(jax.device_get(state['ema']['params'])), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='no EMA'):
    experiment.make_eval_step(experiment.build(_step_config(), sharding.make_mesh(1), 4), ema=True)


def test_ema_moves_only_with_optimizer_updates_under_accumulation():
  from spikeformer_jax import data as data_lib, sharding  # pylint: disable=import-outside-toplevel

  c = _step_config(ema_decay=0.5, **{'optimizer.accum_steps': 2})
  mesh = sharding.make_mesh(1)
  exp = experiment.build(c, mesh, 4)
  step = experiment.make_train_step(exp)
  src = data_lib.get_source(c.data, 'train')
  loader = data_lib.Loader(src, global_batch=c.batch_size, seed=c.seed)
  state = exp.init_state()
  p0 = jax.device_get(state['params'])
  state, _ = step(state, sharding.global_batch(loader.batch(0), mesh))  # accumulates only
  for a, b in zip(jax.tree.leaves(jax.device_get(state['ema']['params'])), jax.tree.leaves(p0)):
    np.testing.assert_array_equal(a, b)
  state, _ = step(state, sharding.global_batch(loader.batch(1), mesh))  # the update
  p2 = jax.device_get(state['params'])
  want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, p0, p2)
  for a, b in zip(jax.tree.leaves(jax.device_get(state['ema']['params'])), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
