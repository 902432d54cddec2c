"""MSViT / QKFormer options the released code lacks and the rows built on
them: stochastic depth (model.drop_path_rate), the paper's CIFAR token grid
(stem 'cifar_h4'), the three-channel DVS input (model.event_sum_channel) and
QKFormer's DVS rows, and the -paper rows that turn them on as the paper
describes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spikeformer_jax import config_lib, experiment, models, ops, sharding, validation
from spikeformer_jax.configs import msvit as msvit_cfgs
from spikeformer_jax.models import msvit
from test_train import _run_steps, assert_eight_devices_equal_one


def _count(model_cfg):
  return models.count_params(nnx.eval_shape(lambda: models.build_model(model_cfg)))


def _tiny(variant, **over):
  return config_lib.apply_overrides(msvit_cfgs.get_config(variant + ',runlocal'), over)


def _spikes(rng, shape):
  return jnp.asarray(rng.integers(0, 2, shape), jnp.float32)


# ------------------------------------------------------------------ drop path


def test_drop_path_rates_are_timms_linear_rule():
  np.testing.assert_allclose(msvit.drop_path_rates(0.1, 10), np.linspace(0, 0.1, 10))
  assert msvit.drop_path_rates(0.3, 1) == [0.0]  # torch.linspace(0, r, 1) = [0]


def test_drop_path_masks_drop_whole_examples_with_keep_scaling():
  rate, batch, T = 0.25, 4000, 3
  m = np.asarray(msvit.drop_path_masks(jax.random.key(0), rate, batch, T))
  assert m.shape == (2, batch * T, 1, 1)
  per_t = m.reshape(2, batch, T)
  assert (per_t == per_t[..., :1]).all()  # one draw per example, shared over T
  assert set(np.unique(m)) == {0.0, np.float32(1 / (1 - rate))}
  kept = (per_t[..., 0] > 0).mean(axis=1)  # 8000 draws: std 0.005
  np.testing.assert_allclose(kept, 1 - rate, atol=0.02)
  assert abs(per_t[..., 0].mean() - 1.0) < 0.03  # the branch's expectation is unchanged
  assert not (per_t[0] == per_t[1]).all()  # attention and MLP draw separately


def test_block_drops_each_examples_branch_alone():
  """Block(x, keep) = x + attn(x) k0, then + mlp(.) k1, per example; with k0 = 0
  an example's attention output leaves its stream untouched."""
  blk = models.build_model(_tiny('cifar10-4-384').model).stage1[0]  # MSSA (`tssa`)
  b, T, n, c = 2, 2, 16, blk.mlp.mlp2_linear.kernel.shape[-1]
  x = _spikes(np.random.default_rng(0), (b * T, n, c)) * 2  # spike sums
  s = 1 / (1 - 0.4)
  keep = jnp.asarray([[s, 0.0], [0.0, s]]).repeat(T, axis=1)[:, :, None, None]

  @nnx.jit
  def run(blk, x, keep):
    attn = blk.tssa(x)
    x1 = x + attn * keep[0]
    return blk(x, keep), attn, x1, x1 + blk.mlp(x1) * keep[1], blk(x, jnp.ones_like(keep)), blk(x)

  got, attn, x1, want, ones, plain = (np.asarray(a) for a in run(blk, x, keep))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(ones, plain)  # keep 1: the plain block
  attn, x1, x = (a.reshape(b, T, n, c) for a in (attn, x1, np.asarray(x)))
  assert attn[0].any()  # so that dropping it is visible
  np.testing.assert_array_equal(x1[1], x[1])  # example 1: attention dropped
  np.testing.assert_allclose(x1[0], x[0] + s * attn[0], rtol=1e-6)  # kept, scaled


_forward = nnx.jit(lambda m, x, key: m(x, rngs=nnx.Rngs(dropout=key)))


@pytest.mark.slow
def test_drop_path_is_identity_in_eval_and_at_rate_zero_and_random_in_train():
  base = models.build_model(_tiny('cifar10-4-384').model)  # drop_path_rate 0: the default
  assert base.drop_path == ()
  model = models.build_model(_tiny('cifar10-4-384', **{'model.drop_path_rate': 0.5}).model)
  assert model.drop_path == (0.0, 0.25, 0.5)  # three runlocal blocks
  nnx.update(model, nnx.state(base))  # the rate adds no parameters
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 2
  k1, k2 = jax.random.key(7), jax.random.key(8)
  # Train mode: without drop path the output does not depend on the key
  # (BatchNorm uses the batch's statistics); with it, another key draws other
  # masks and the same key the same ones.
  ref = [np.asarray(_forward(base, x, k)) for k in (k1, k2)]
  outs = [np.asarray(_forward(model, x, k)) for k in (k1, k2, k1)]
  np.testing.assert_array_equal(ref[0], ref[1])
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], ref[0])
  np.testing.assert_array_equal(outs[0], outs[2])
  with pytest.raises(ValueError, match=r'needs rngs=nnx.Rngs\(dropout=key\)'):
    model(x)
  base.eval()
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(_forward(base, x, k1)))


def _drop_path_experiment(seed=0):
  config = _tiny(
    'cifar10-4-384',
    **{
      'model.drop_path_rate': 0.5,
      'seed': seed,
      'mixup.mixup_alpha': 0.0,
      'mixup.cutmix_alpha': 0.0,
    },
  )
  mesh = sharding.make_mesh(1)
  exp = experiment.build(config, mesh, steps_per_epoch=4)
  batch = {
    'image': jax.random.normal(jax.random.key(1), (config.batch_size, 32, 32, 3)),
    'label': jnp.arange(config.batch_size) % 10,
  }
  return exp, sharding.global_batch(jax.device_get(batch), mesh)


def test_the_train_states_rng_stream_keys_drop_path_by_seed():
  """The seed's stream draws the masks: another seed (same weights) other
  updates, the same seed the same ones; each step advances the stream."""
  exp, batch = _drop_path_experiment()
  assert exp.model_takes_rngs
  step = experiment.make_train_step(exp)
  start = exp.init_state()
  np.testing.assert_array_equal(start['rng'], experiment.rng_start(0))
  runs = {}
  for name, seed in (('seed 0', 0), ('again', 0), ('seed 1', 1)):
    state = jax.tree.map(jnp.copy, start)
    state['rng'] = jax.device_put(experiment.rng_start(seed), exp.state_sharding['rng'])
    state, m = step(state, batch)
    runs[name] = (float(m['loss']), jax.device_get(state))
  assert runs['seed 0'][0] == runs['again'][0] != runs['seed 1'][0]
  assert not np.array_equal(runs['seed 0'][1]['rng'], experiment.rng_start(0))
  same = jax.tree.map(np.array_equal, runs['seed 0'][1]['params'], runs['again'][1]['params'])
  assert all(jax.tree.leaves(same))
  other = jax.tree.map(np.array_equal, runs['seed 0'][1]['params'], runs['seed 1'][1]['params'])
  assert not all(jax.tree.leaves(other))


def test_the_rng_stream_resumes_and_old_checkpoints_restore(tmp_path):
  """A checkpoint keeps the stream: the step after a restore is the step
  after the save. One written before the stream existed (no 'rng') restores
  with the stream derived from the seed and its step."""
  from spikeformer_jax import checkpointing  # pylint: disable=import-outside-toplevel

  exp, batch = _drop_path_experiment(seed=3)
  step = experiment.make_train_step(exp)
  state, _ = step(exp.init_state(), batch)
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'new'))
  ckpt.save(1, state, {'step': 1}, force=True)
  ckpt.wait()
  restored, _ = ckpt.restore(exp.abstract_state, backfill=exp.backfill)
  ckpt.close()
  want, _ = step(jax.tree.map(jnp.copy, state), batch)
  got, _ = step(restored, batch)
  want, got = jax.device_get((want, got))
  assert not np.array_equal(want['rng'], jax.device_get(state['rng']))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)

  old = {k: v for k, v in want.items() if k != 'rng'}
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'old'))
  ckpt.save(2, old, {'step': 2}, force=True)
  ckpt.wait()
  with pytest.raises(ValueError, match='does not fit'):
    ckpt.restore(exp.abstract_state)  # the stream is backfilled, never silently dropped
  restored, _ = ckpt.restore(exp.abstract_state, backfill=exp.backfill)
  assert int(restored['step']) == 2
  np.testing.assert_array_equal(restored['rng'], experiment.rng_for_old_checkpoint(3, 2))
  assert restored['rng'].sharding == exp.state_sharding['rng']
  ckpt.close()
  step(restored, batch)  # and it trains on


def test_drop_path_masks_shard_with_the_batch():
  """The stream's key is replicated; each example's masks follow its shard:
  8 devices train as one."""
  assert_eight_devices_equal_one(_tiny('cifar10-4-384', **{'model.drop_path_rate': 0.5}), n_steps=2)


# ------------------------------------------------------------ DVS three channels


def test_event_sum_channel_is_positive_plus_negative():
  x = np.random.default_rng(2).integers(0, 40, (2, 3, 5, 5, 2)).astype(np.float32)
  y = np.asarray(msvit.event_sum_channel(jnp.asarray(x)))
  np.testing.assert_array_equal(y[..., :2], x)
  np.testing.assert_array_equal(y[..., 2], x[..., 0] + x[..., 1])


def test_event_sum_channel_feeds_the_stem_a_third_channel():
  """A stem conv W on (p, n, p + n) is (W0 + W2) p + (W1 + W2) n: the
  three-channel stem equals a two-channel one with the folded kernel."""
  mc3 = _tiny('dvs128gesture-16', **{'model.event_sum_channel': True}).model
  m3 = models.build_model(mc3)
  assert mc3.in_channels == 2 and m3.patch_embed1.proj_conv.kernel.shape[-2] == 3
  m2 = models.build_model(_tiny('dvs128gesture-16').model)
  nnx.update(
    m2.patch_embed1, nnx.filter_state(nnx.state(m3.patch_embed1), lambda p, _: p[0] != 'proj_conv')
  )
  k = m3.patch_embed1.proj_conv.kernel[...]
  m2.patch_embed1.proj_conv.kernel[...] = k[..., :2, :] + k[..., 2:, :]
  x = jnp.asarray(np.random.default_rng(3).integers(0, 4, (2, mc3.T, 32, 32, 2)), jnp.float32)

  @nnx.jit
  def stems(m2, m3, x):
    fold = lambda v: ops.fold_time(v, mc3.T, jnp.float32)
    return m3.patch_embed1(fold(msvit.event_sum_channel(x))), m2.patch_embed1(fold(x))

  a, b = stems(m2, m3, x)
  assert np.asarray(a).any()
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ grid, rows, counts


def test_paper_cifar_grid_is_h4_and_official_grid_stays_default():
  for variant, grid in (('cifar10-4-384', 32), ('cifar10-4-384-h4', 8)):
    mc = _tiny(variant).model
    model = models.build_model(mc)
    x = ops.fold_time(jnp.ones((1, 32, 32, 3)), mc.T, jnp.float32)
    e1, e2 = nnx.eval_shape(
      lambda m, v: (m.patch_embed1(v), m.patch_embed2(m.patch_embed1(v))), model, x
    )
    assert e1.shape[1:3] == (grid, grid) and e2.shape[1:3] == (grid // 2, grid // 2), variant
  assert msvit_cfgs.get_config('cifar10-4-384').model.stem == ''  # the code's grid


@pytest.mark.slow
def test_new_rows_parameter_counts():
  # QKFormer's cifar10-dvs_origin_log.txt prints "number of params: 1504138".
  assert _count(msvit_cfgs.get_config('qkformer-cifar10dvs-16').model) == 1_504_138
  # Gesture: 11 classes (+257) and MLP ratio 4 instead of 1 at widths 128 and
  # 256 (+6 D^2 + 9 D each); Table 2 repeats 1.50M.
  extra = 257 + sum(6 * d * d + 9 * d for d in (128, 256))
  assert _count(msvit_cfgs.get_config('qkformer-dvs128gesture-16').model) == 1_504_138 + extra
  assert _count(msvit_cfgs.get_config('cifar10-4-384-h4').model) == 7_558_762  # pools only
  assert _count(msvit_cfgs.get_config('cifar100-4-384-h4').model) == 7_593_412  # paper 7.59M
  # the sum channel: one more input channel of the first 3x3 stem conv
  for variant, width in (
    ('dvs128gesture-16', 64),
    ('cifar10dvs-16', 32),
    ('qkformer-cifar10dvs-16', 16),
  ):
    mc = msvit_cfgs.get_config(variant).model
    n = _count(mc)
    mc.event_sum_channel = True
    assert _count(mc) - n == 9 * width, variant
  mc = msvit_cfgs.get_config('imagenet-10-384').model
  mc.drop_path_rate = 0.1
  assert _count(mc) == 17_686_216  # no parameters


# -paper rows: what each changes of its row; the stem's first conv width (the
# event sum channel adds 9 x width parameters).
PAPER_ROWS = {
  'imagenet-10-384-paper': ({'model.drop_path_rate': 0.1}, 0),
  'imagenet-10-512-paper': ({'model.drop_path_rate': 0.1}, 0),
  'imagenet-10-768-paper': ({'model.drop_path_rate': 0.1}, 0),
  'dvs128gesture-16-paper': (
    {'data.split_by': 'time', 'model.event_sum_channel': True, 'epochs': 190},
    64,
  ),
  'dvs128gesture-10-paper': (
    {'data.split_by': 'time', 'model.event_sum_channel': True, 'epochs': 190},
    64,
  ),
  'cifar10dvs-16-paper': ({'data.split_by': 'time', 'model.event_sum_channel': True}, 32),
  'cifar10dvs-10-paper': ({'data.split_by': 'time', 'model.event_sum_channel': True}, 32),
}


@pytest.mark.parametrize('variant', sorted(PAPER_ROWS))
def test_paper_rows_change_only_what_the_paper_states(variant):
  """Stochastic depth on ImageNet (section 4.2); frames over time intervals,
  the event-sum channel and Gesture's 200 epochs (190 + 10) on DVS (4.3)."""
  changes, width = PAPER_ROWS[variant]
  c, base = msvit_cfgs.get_config(variant), msvit_cfgs.get_config(variant[: -len('-paper')])
  got = {
    k: config_lib.lookup(c.to_dict(), k)
    for k in config_lib.config_diff(base.to_dict(), c.to_dict())
    if k != 'name'
  }
  assert got == changes
  assert c.paper_top1 == base.paper_top1 > 0
  assert _count(c.model) == _count(base.model) + 9 * width
  assert variant in msvit_cfgs.VARIANTS
  validation.validate_config(msvit_cfgs.get_config(variant + ',runlocal'))


def test_qkformer_dvs_rows_follow_its_files():
  c = msvit_cfgs.get_config('qkformer-dvs128gesture-16')
  m = c.model
  assert (m.dims, m.depths, m.attention, m.num_heads) == ((128, 256), (1, 1), ('mssa', 'ssa'), 16)
  assert m.mssa_kernels == ((1, 0),) * 2 and m.attn_v_threshold == 0.5
  assert m.ssa_proj_lif_batch_as_time and m.stem == 'qkformer_dvs' and m.mlp_ratio == 4
  assert (c.paper_top1, msvit_cfgs.get_config('qkformer-cifar10dvs-16').paper_top1) == (98.6, 84.0)
  assert c.data.augment.dvs_policy == 'snn_augment_wide' and c.mixup.off_epoch == 75


def test_new_fields_fail_clearly():
  for over, msg in [
    ({'model.drop_path_rate': 1.0}, r'model.drop_path_rate=1.0; valid: .*\[0, 1\)'),
    ({'model.drop_path_rate': -0.1}, r'model.drop_path_rate=-0.1'),
    ({'model.event_sum_channel': True}, r'model.in_channels=3; valid: in_channels=2'),
  ]:
    with pytest.raises(ValueError, match=msg):
      validation.validate_config(_tiny('cifar10-4-384', **over))
  old = _tiny('cifar10-4-384').model  # configs saved before the fields existed
  del old['drop_path_rate'], old['event_sum_channel']
  assert models.build_model(old).drop_path == ()


@pytest.mark.parametrize(
  'variant,over',
  [  # one compile: the suite's time is short
    (
      'qkformer-dvs128gesture-16',
      {'model.event_sum_channel': True, 'model.drop_path_rate': 0.1, 'model.remat': 'full'},
    ),
  ],
)
@pytest.mark.slow
def test_new_rows_and_fields_train_one_step(variant, over):
  config = _tiny(variant, **over)
  validation.validate_config(config)
  losses, state = _run_steps(config, sharding.make_mesh(1), n_steps=1)
  assert np.isfinite(losses).all()
  assert int(state['batch_stats']['patch_embed1']['proj_bn']['count']) == 1
