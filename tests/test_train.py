"""Train step sharding, resume, CLI round trip, schedule, loader, learning."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT
from spikeformer_jax import data as data_lib
from spikeformer_jax import config_lib, experiment, optim, sharding, train_lib
from spikeformer_jax import workdir as workdir_lib
from test_models import cfgs


def _tiny(variant='cifar10-4-384', **over):
  return config_lib.apply_overrides(cfgs.get_config(variant + ',runlocal'), over)


def _run_steps(config, mesh, n_steps=3):
  src = data_lib.get_source(config.data, 'train')
  loader = data_lib.Loader(src, global_batch=config.batch_size, seed=config.seed)
  exp = experiment.build(config, mesh, loader.steps_per_epoch)
  step = experiment.make_train_step(exp)
  state = exp.init_state()
  losses = []
  for i in range(n_steps):
    state, m = step(state, sharding.global_batch(loader.batch(i), mesh))
    losses.append(float(m['loss']))
  return losses, jax.device_get(state)


def _bn_cancelled(path) -> bool:
  """Biases of linear layers feeding a train-mode BatchNorm: their gradient is
  mathematically zero, so what they get is float noise, which Adam normalises
  into steps of size ~lr whatever the noise. Such a bias cannot be compared
  across summation orders (in PyTorch neither); it is bounded by Adam's step."""
  return "_linear']['bias']" in jax.tree_util.keystr(path)


_ONE_DEVICE = {}


def _one_device_steps(config, n_steps=3):
  """_run_steps on one device, computed once per config in this process:
  several tests compare against the same run. The mesh settings are left out
  of the key: one device has nothing to shard."""
  key = (
    json.dumps(
      {k: v for k, v in config.to_dict().items() if k != 'mesh'}, sort_keys=True, default=str
    ),
    n_steps,
  )
  if key not in _ONE_DEVICE:
    _ONE_DEVICE[key] = _run_steps(config, sharding.make_mesh(1), n_steps)
  return _ONE_DEVICE[key]


def assert_eight_devices_equal_one(config, n_steps=3, **mesh_axes):
  """Losses, parameters and BatchNorm statistics of n_steps train steps on 8
  devices (a mesh of `mesh_axes`: data / fsdp sizes) equal those on 1
  (float32, 1e-5), but for BN-cancelled biases. Mixup is off: its blend of
  two images is exact on any mesh (test_mixup), but it leaves more membranes
  near the threshold, where the float noise of another summation order flips
  spikes within three steps."""
  config.mixup.mixup_alpha = config.mixup.cutmix_alpha = 0.0
  l1, s1 = _one_device_steps(config, n_steps)
  l8, s8 = _run_steps(config, sharding.make_mesh(8, **mesh_axes), n_steps)
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
  max_adam_move = 2 * n_steps * config.optimizer.warmup_lr  # steps at the warmup lr
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(s8['params'])[0], jax.tree.leaves(s1['params'])
  ):
    if _bn_cancelled(path):
      assert np.abs(a - b).max() <= max_adam_move
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  for a, b in zip(jax.tree.leaves(s8['batch_stats']), jax.tree.leaves(s1['batch_stats'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8
  assert_eight_devices_equal_one(_tiny())


def test_fsdp_mesh_shards_state_and_equals_one_device():
  config = _tiny(**{'mesh.fsdp_min_size': 512})  # runlocal arrays are small
  mesh = sharding.make_mesh(8, data=2, fsdp=-1)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  exp = experiment.build(config, mesh, 4)
  specs = [s.spec for s in jax.tree.leaves(exp.state_sharding['params'])]
  assert sum('fsdp' in tuple(sp) for sp in specs) >= 8  # the kernels are sharded
  opt_specs = [s.spec for s in jax.tree.leaves(exp.state_sharding['opt_state'])]
  assert sum('fsdp' in tuple(sp) for sp in opt_specs) >= 16  # Adam's two moments too
  state = exp.init_state()
  kernel = state['params']['block'][0]['mlp']['fc1_linear']['kernel']
  assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape
  assert_eight_devices_equal_one(config, data=2, fsdp=4)


@pytest.mark.parametrize(
  'axes,message',
  [
    ({'fsdp': 3}, 'mesh.fsdp=3 does not divide the 8 devices'),
    ({'data': 3}, 'mesh.data=3 x mesh.fsdp=1 must equal the 8 devices'),
    ({'data': 2, 'fsdp': 2}, 'mesh.data=2 x mesh.fsdp=2 must equal the 8 devices'),
    ({'data': -1, 'fsdp': -1}, 'at most one axis can take the rest'),
    ({'dcn_data': 3}, 'mesh.dcn_data=3 must be a divisor of the 8 devices'),
    ({'dcn_data': 0}, 'mesh.dcn_data=0 must be a divisor of the 8 devices'),
    ({'data': 2, 'fsdp': 4, 'dcn_data': 4}, 'mesh.dcn_data=4 must divide mesh.data=2: fsdp'),
  ],
)
def test_bad_mesh_is_one_clear_error(axes, message):
  with pytest.raises(ValueError, match=message) as e:
    sharding.make_mesh(8, **axes)
  assert '\n' not in str(e.value)


def test_mesh_follows_the_devices_and_keeps_cpu_order():
  """On CPU, mesh_utils keeps the device order: the same mesh as the reshape
  before it (so every recorded number holds); dcn_data > 1 stacks simulated
  slices of consecutive devices along 'data', fsdp within each."""
  devices = jax.devices()
  for axes, shape in (
    ({}, (8, 1)),
    ({'data': 2, 'fsdp': 4}, (2, 4)),
    ({'data': 4, 'fsdp': -1, 'dcn_data': 2}, (4, 2)),
    ({'dcn_data': 4}, (8, 1)),
  ):
    mesh = sharding.make_mesh(8, **axes)
    assert mesh.axis_names == ('data', 'fsdp') and mesh.devices.shape == shape
    assert list(mesh.devices.flat) == devices, axes
    assert sharding.slice_count(mesh) == 1 and sharding.axes_across_slices(mesh) == []
  assert list(sharding.make_mesh(3).devices.flat) == devices[:3]
  # The config field, and a config saved before it existed (one slice).
  c = _tiny(**{'mesh.data': 4, 'mesh.fsdp': 2, 'mesh.dcn_data': 2})
  assert dict(sharding.mesh_from_config(c).shape) == {'data': 4, 'fsdp': 2}
  del c.mesh['dcn_data']
  assert sharding.mesh_shape_from_config(c, 8) == (4, 2)


def test_gpus_of_several_hosts_form_one_mesh_unless_dcn_data_says():
  """jaxlib gives each GPU host a slice index: dcn_data=1 keeps one mesh by
  id (as before), dcn_data=HOSTS stacks the hosts along 'data'."""

  class Gpu:
    platform, device_kind = 'gpu', 'NVIDIA H100 80GB HBM3'

    def __init__(self, i):
      self.id, self.slice_index = i, i // 4

  gpus = [Gpu(i) for i in (4, 5, 6, 7, 0, 1, 2, 3)]
  ids = np.vectorize(lambda d: d.id)
  assert ids(sharding.device_grid(gpus, 8, 1)).ravel().tolist() == list(range(8))
  grid = sharding.device_grid(gpus, 4, 2, dcn_data=2)
  assert np.vectorize(lambda d: d.slice_index)(grid).tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
  with pytest.raises(ValueError, match='are in 2 slice.s.; set mesh.dcn_data=2'):
    sharding.device_grid(gpus, 8, 1, dcn_data=4)


def test_batch_and_fsdp_shard_over_a_two_slice_mesh():
  """The batch is split over data x fsdp in mesh order (each device its own
  rows) and the large parameters over 'fsdp' within a slice."""
  mesh = sharding.make_mesh(8, data=4, fsdp=2, dcn_data=2)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = sharding.global_batch({'x': x}, mesh)['x']
  rows = {s.device: np.asarray(s.data) for s in g.addressable_shards}
  for i, d in enumerate(mesh.devices.flat):
    np.testing.assert_array_equal(rows[d], x[2 * i : 2 * i + 2])
  config = _tiny(**{'mesh.fsdp_min_size': 512, 'mesh.data': 4, 'mesh.fsdp': 2, 'mesh.dcn_data': 2})
  exp = experiment.build(config, sharding.mesh_from_config(config), 4)
  specs = [s.spec for s in jax.tree.leaves(exp.state_sharding['params'])]
  assert sum('fsdp' in tuple(sp) for sp in specs) >= 8
  assert experiment.bn_groups_for(_tiny(bn_scope='device'), mesh) == 8


def test_per_device_batchnorm_does_not_depend_on_device_count():
  """bn_scope='device' on 8 devices == 8 BN groups computed on one device."""
  no_mixup = {'mixup.mixup_alpha': 0.0, 'mixup.cutmix_alpha': 0.0}  # as the tests above:
  config = _tiny(bn_scope='device', **no_mixup)  # their global-BN run is the reference below
  l8, _ = _run_steps(config, sharding.make_mesh(8), n_steps=2)
  mesh1 = sharding.make_mesh(1)
  orig = experiment.bn_groups_for
  try:
    experiment.bn_groups_for = lambda c, m: 8
    l1, _ = _run_steps(config, mesh1, n_steps=2)
  finally:
    experiment.bn_groups_for = orig
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
  lg, _ = _one_device_steps(_tiny(**no_mixup))
  assert abs(lg[0] - l8[0]) > 1e-6  # and it is a different model from global BN


def test_resume_after_crash_is_bit_identical(tmp_path, monkeypatch):
  config = _tiny(**{'total_steps': 6, 'ckpt_every_steps': 2, 'log_every_steps': 1})
  ref = train_lib.train_and_evaluate(config, str(tmp_path / 'ref'))

  real = experiment.make_train_step

  def crashing(exp):
    fn, calls = real(exp), []

    def step(state, batch):
      calls.append(1)
      if len(calls) == 5:
        raise KeyboardInterrupt('simulated crash at step 5')
      return fn(state, batch)

    return step

  monkeypatch.setattr(experiment, 'make_train_step', crashing)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  monkeypatch.setattr(experiment, 'make_train_step', real)
  resumed = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert resumed['steps_this_run'] == 2  # resumed from the step-4 checkpoint
  assert resumed['test_loss'] == ref['test_loss']

  from spikeformer_jax import checkpointing

  mesh = sharding.make_mesh(8)
  exp = experiment.build(config, mesh, 4)
  a, _ = checkpointing.Checkpointer(str(tmp_path / 'ref' / 'checkpoints')).restore(
    exp.abstract_state
  )
  b, _ = checkpointing.Checkpointer(str(tmp_path / 'run' / 'checkpoints')).restore(
    exp.abstract_state
  )
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_train_and_eval_cli_round_trip(tmp_path):
  wd = tmp_path / 'wd'
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2')
  cmd = [
    sys.executable,
    'train.py',
    '--config=configs/spikformer.py:cifar10dvs-2-256,runlocal',
    f'--workdir={wd}',
    '--config.total_steps=2',
  ]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.strip().splitlines()[-1].startswith('final: test_top1')
  final = json.loads((wd / 'final_metrics.json').read_text())
  assert {'test_top1', 'test_loss', 'wall_time_s', 'steps'} <= set(final)
  assert final['steps'] == 2
  lines = [json.loads(line) for line in (wd / 'metrics.jsonl').read_text().splitlines()]
  assert lines and all('step' in row for row in lines)

  # A rerun of the finished run changes nothing; a longer one resumes.
  before = (wd / 'final_metrics.json').read_text()
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0 and 'holds a finished run (2 steps): nothing changed' in p.stdout
  assert (wd / 'final_metrics.json').read_text() == before
  p = subprocess.run(
    cmd[:-1] + ['--config.total_steps=3'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0 and f'Resuming from {wd}/checkpoints/2' in p.stdout, p.stderr[-3000:]
  assert json.loads((wd / 'final_metrics.json').read_text())['steps_this_run'] == 1

  p = subprocess.run(
    [
      sys.executable,
      'eval.py',
      f'--workdir={wd}',
      '--num_devices=1',
      '--jax_log_compiles',
    ],  # JAX's options are flags too
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'Compiling' in p.stderr, p.stderr[-3000:]
  res = json.loads((wd / 'eval_test_3.json').read_text())
  assert res['top1'] == pytest.approx(
    json.loads((wd / 'final_metrics.json').read_text())['test_top1']
  )
  assert res['count'] == 32

  bad = subprocess.run(
    cmd[:3] + [f'--workdir={tmp_path / "x"}', '--config.model.T=3'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert bad.returncode == 1 and 'frames but model.T=3' in bad.stderr


def test_timm_schedule_values():
  kw = dict(
    base_lr=5e-4, steps_per_epoch=10, epochs=300, warmup_epochs=20, warmup_lr=1e-5, min_lr=1e-5
  )
  lr = lambda step, **k: float(optim.timm_cosine_lr(step, **kw, **k))
  assert lr(0) == pytest.approx(1e-5)
  assert lr(9) == pytest.approx(1e-5)  # constant within an epoch
  assert lr(10) == pytest.approx(1e-5 + (5e-4 - 1e-5) / 20)
  t = 150
  assert lr(t * 10) == pytest.approx(1e-5 + 0.5 * (5e-4 - 1e-5) * (1 + np.cos(np.pi * t / 300)))
  assert lr(305 * 10) == pytest.approx(1e-5)  # cooldown
  assert lr(15, per_epoch=False) == pytest.approx(1e-5 + 1.5 * (5e-4 - 1e-5) / 20)


def test_weight_decay_mask_skips_1d_params():
  config = _tiny()
  exp = experiment.build(config, sharding.make_mesh(1), 4)
  mask = optim.decay_mask(exp.abstract_state['params'])
  flat = {'/'.join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert any(v for k, v in flat.items() if 'kernel' in k)
  assert not any(v for k, v in flat.items() if 'bias' in k or 'scale' in k)


def _timm_lamb_reference(params, grads_seq, *, lr, wd, b1=0.9, b2=0.999, eps=1e-6, max_norm=1.0):
  """timm 0.6.12 Lamb.step, line by line in NumPy (weight decay on ndim > 1 only)."""
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for step, grads in enumerate(grads_seq, 1):
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
    clip = norm / max_norm if norm > max_norm else 1.0
    for k in p:
      g = grads[k] / clip
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      denom = np.sqrt(v[k]) / np.sqrt(1 - b2**step) + eps
      update = (m[k] / (1 - b1**step)) / denom
      decay = wd if p[k].ndim > 1 else 0.0
      if decay:
        update = update + decay * p[k]
        w_norm, g_norm = np.linalg.norm(p[k]), np.linalg.norm(update)
        update = update * (w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0)
      p[k] = p[k] - lr * update
  return p


def test_lamb_is_timms():
  rng = np.random.default_rng(0)
  params = {'kernel': rng.standard_normal((4, 3)), 'bias': rng.standard_normal(3)}
  grads = [{k: 3 * rng.standard_normal(x.shape) for k, x in params.items()} for _ in range(3)]
  tx = optim.timm_lamb(0.01, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.05, mask=optim.decay_mask)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  want = _timm_lamb_reference(params, grads, lr=0.01, wd=0.05)
  for k in params:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6)


def test_runs_saved_before_new_fields_resume(tmp_path):
  """A config.json without data.norm_from / ema_decay (older runs) is the same
  model; an EMA decay change is not a model change, EMA on / off is."""
  config = _tiny()
  saved = json.loads(json.dumps(config.to_dict()))
  del saved['data']['norm_from'], saved['ema_decay']
  (tmp_path / 'config.json').write_text(json.dumps({'config': saved}))
  workdir_lib.check_resume_config(config, str(tmp_path))
  saved['ema_decay'] = 0.999
  (tmp_path / 'config.json').write_text(json.dumps({'config': saved}))
  workdir_lib.check_resume_config(_tiny(ema_decay=0.9999), str(tmp_path))
  with pytest.raises(ValueError, match='ema_decay'):
    workdir_lib.check_resume_config(config, str(tmp_path))


def test_loader_is_deterministic_and_splits_over_processes():
  src = data_lib.get_source(_tiny().data, 'train')
  a = data_lib.Loader(src, global_batch=8, seed=3)
  assert np.array_equal(
    a.batch(5)['image'], data_lib.Loader(src, global_batch=8, seed=3).batch(5)['image']
  )
  assert not np.array_equal(a.indices(0), a.indices(a.steps_per_epoch))  # reshuffled per epoch
  epoch = np.concatenate([a.indices(i) for i in range(a.steps_per_epoch)])
  assert len(set(epoch)) == len(epoch)  # no repeats within an epoch
  parts = [
    data_lib.Loader(src, global_batch=8, seed=3, process_index=p, process_count=2).batch(5)
    for p in range(2)
  ]
  # The processes' rows assemble into the 1-process batch, in the same order.
  assert np.array_equal(np.concatenate([p['label'] for p in parts]), a.batch(5)['label'])
  assert np.array_equal(a.batch(5)['label'], src.labels[a.indices(5)])
  seen = []
  for b in data_lib.eval_batches(data_lib.get_source(_tiny().data, 'test'), global_batch=24):
    seen.append(b['mask'].sum())
  assert sum(seen) == 32 and len(seen) == 2


def test_missing_dataset_gives_one_clear_message(tmp_path):
  c = cfgs.get_config('cifar10-4-384')
  c.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='python prepare.py --dataset=cifar10'):
    data_lib.get_source(c.data, 'train')
  c.data.name, c.data.path = 'npz', '/nonexistent/cifar.npz'
  with pytest.raises(FileNotFoundError, match='data.path'):
    data_lib.get_source(c.data, 'train')


@pytest.mark.slow
def test_learns_handwritten_digits(tmp_path):
  """Bounded learning check: the default digits run (train.py's default
  config), stopped at half of its schedule (10 of 20 epochs), is already past
  90% (the full run reaches >= 97%). As a user runs it: in a subprocess, on one
  device."""
  p = subprocess.run(
    [
      sys.executable,
      'train.py',
      f'--workdir={tmp_path}',
      f'--config.total_steps={10 * 22}',
      '--config.eval_every_epochs=0',
      '--config.num_devices=1',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  final = json.loads((tmp_path / 'final_metrics.json').read_text())
  assert final['steps'] == 220 and final['test_top1'] >= 0.90, final


def assert_no_gather_on_eight_devices(config):
  """The compiled 8-device train step all-reduces (gradients, BatchNorm
  statistics) but never all-gathers or all-to-alls."""
  mesh = sharding.make_mesh(8)
  exp = experiment.build(config, mesh, 4)
  state = exp.init_state()
  src = data_lib.get_source(config.data, 'train')
  batch = sharding.global_batch(data_lib.Loader(src, global_batch=16).batch(0), mesh)
  hlo = experiment.make_train_step(exp).lower(state, batch).compile().as_text()
  assert 'all-reduce' in hlo
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo


def test_train_step_needs_no_all_gather_on_eight_devices():
  """Batch-first folding of time keeps activations local."""
  assert_no_gather_on_eight_devices(_tiny())


def test_bfloat16_train_steps():
  config = _tiny(**{'model.dtype': 'bfloat16'})
  losses, state = _run_steps(config, sharding.make_mesh(8), n_steps=2)
  assert np.isfinite(losses).all()
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {np.dtype('float32')}


@pytest.mark.slow
@pytest.mark.parametrize('key,what', [('loss', 'training loss'), ('grad_norm', 'gradient')])
def test_non_finite_loss_stops_before_a_bad_checkpoint(tmp_path, monkeypatch, key, what):
  config = _tiny(**{'total_steps': 6, 'ckpt_every_steps': 2, 'log_every_steps': 3})
  real = experiment.make_train_step

  def poisoned(exp):
    fn, calls = real(exp), []

    def step(state, batch):
      calls.append(1)
      state, m = fn(state, batch)
      if len(calls) == 4:  # between the step-2 checkpoint and the step-4 one
        m = dict(m, **{key: m[key] * jnp.nan})
      return state, m

    return step

  monkeypatch.setattr(experiment, 'make_train_step', poisoned)
  with pytest.raises(
    FloatingPointError, match=f'non-finite {what} by step 4; .* last good checkpoint is step 2'
  ):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


@pytest.mark.slow
def test_a_failed_background_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
  """At once, not at the next save: the trainer polls the save in flight after
  every step (how long a real failing save takes is the filesystem's business;
  test_preemption fills a real disk)."""
  from spikeformer_jax import checkpointing, errors

  config = _tiny(**{'total_steps': 6, 'ckpt_every_steps': 2, 'log_every_steps': 3})
  real, steps = experiment.make_train_step, []

  def counted(exp):
    fn = real(exp)

    def step(state, batch):
      steps.append(1)
      return fn(state, batch)

    return step

  real_poll = checkpointing.Checkpointer.poll

  def poll(self):
    if self._saving == 2:  # pylint: disable=protected-access
      self._fail(OSError(28, 'No space left on device'))  # pylint: disable=protected-access
    real_poll(self)

  monkeypatch.setattr(experiment, 'make_train_step', counted)
  monkeypatch.setattr(checkpointing.Checkpointer, 'poll', poll)
  with pytest.raises(
    errors.CheckpointError,
    match=r'^saving checkpoint 2 failed \(no space left on device\); stopped',
  ):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert len(steps) == 3


@pytest.mark.slow
def test_failed_resume_keeps_the_runs_config(tmp_path):
  config = _tiny(**{'total_steps': 2})
  train_lib.train_and_evaluate(config, str(tmp_path))
  other = _tiny(**{'total_steps': 2, 'model.embed_dim': 64})
  with pytest.raises(
    ValueError,
    match=r'holds a run of another model: model.embed_dim '
    r'\(32 -> 64\)\. Use another --workdir, or '
    r'--config.allow_config_change=True',
  ):
    train_lib.train_and_evaluate(other, str(tmp_path))
  # Told to resume anyway, the checkpoint's own shape check still refuses.
  forced = _tiny(**{'total_steps': 2, 'model.embed_dim': 64, 'allow_config_change': True})
  with pytest.raises(ValueError, match='does not fit'):
    train_lib.train_and_evaluate(forced, str(tmp_path))
  # Same shapes, other dynamics: refused too (a silent mix of two experiments).
  with pytest.raises(ValueError, match=r"model.neuron.tau \(2.0 -> 3.0\)"):
    train_lib.train_and_evaluate(
      _tiny(**{'total_steps': 2, 'model.neuron.tau': 3.0}), str(tmp_path)
    )
  assert workdir_lib.load_run_config(str(tmp_path)).model.embed_dim == 32
  longer_ago = _tiny(**{'total_steps': 1})
  with pytest.raises(ValueError, match='beyond'):
    train_lib.train_and_evaluate(longer_ago, str(tmp_path))


def test_npz_images_and_raw_event_frames(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'ev.npz'
  np.savez(
    path,
    x_train=rng.poisson(1.0, (6, 2, 4, 4, 2)).astype(np.float32),
    y_train=np.arange(6) % 3,
    x_test=np.zeros((2, 2, 4, 4, 2), np.float32),
    y_test=np.array([0, 2]),
  )
  c = cfgs.get_config('cifar10dvs-2-256')
  c.data.name, c.data.path, c.data.num_classes = 'npz', str(path), 3
  src = data_lib.get_source(c.data, 'train')
  b = data_lib.Loader(src, global_batch=2).batch(0)
  assert b['image'].dtype == np.float32 and b['image'].shape == (2, 2, 4, 4, 2)
  assert set(np.unique(b['image'])) <= set(range(20))  # raw counts, not normalised
  c.data.mean, c.data.std = (0.5,), (0.25,)
  with pytest.raises(ValueError, match='uint8'):
    data_lib.get_source(c.data, 'train')
  np.savez(path, x_train=np.zeros((2, 4, 4, 1), np.uint8), y_train=np.array([0, 1]))
  with pytest.raises(ValueError, match='lacks'):
    data_lib.get_source(c.data, 'test')


@pytest.mark.parametrize(
  'over',
  [{'model.neuron.kind': 'if'}, {'model.neuron.charge_form': 'paper', 'model.neuron.beta': 0.25}],
)
def test_network_neuron_fields_reach_every_neuron(over):
  """model.neuron.kind (Spikformer Table 6's IF rows) and charge_form / beta
  (A2OS2A's eqs. 1-3) set every binary neuron of the network and change its
  function; invalid combinations fail in validation, in one line. (They train
  in test_spikformer_rows, IF, and test_a2os2a_rows, the paper's charge.)"""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import layers, models, validation  # pylint: disable=import-outside-toplevel

  config = _tiny(**over)
  model = models.build_model(config.model)
  kinds = {
    (m.neuron.kind, m.neuron.charge_form, m.neuron.beta)
    for _, m in nnx.iter_modules(model)
    if isinstance(m, layers.SpikingNeuron)
  }
  want = (
    over.get('model.neuron.kind', 'lif'),
    over.get('model.neuron.charge_form', 'spikingjelly'),
    over.get('model.neuron.beta', 0.5),
  )
  assert kinds == {want}
  x = np.random.default_rng(0).normal(0, 2, (2, 32, 32, 3)).astype(np.float32)
  base = models.build_model(_tiny().model)
  nnx.update(base, nnx.state(model))

  def spikes(m):  # every neuron's spike counts per timestep
    m.eval()
    m.set_attributes(record_spikes=True, raise_if_not_found=False)
    inter = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x)[1])(m, x)
    return {
      p: np.asarray(v.get_value()[0]) for p, v in nnx.to_flat_state(inter) if p[-1] == 'spike_count'
    }

  ours, lif = spikes(model), spikes(base)  # the same weights, another function
  assert ours.keys() == lif.keys() and any(not np.array_equal(ours[k], lif[k]) for k in ours)
  for bad, msg in [
    ({'model.neuron.kind': 'ternary'}, "model.neuron.kind='ternary' is not valid"),
    (
      {'model.neuron.kind': 'if', 'model.neuron.charge_form': 'paper'},
      "IF neurons .kind='if'. have no leak",
    ),
  ]:
    with pytest.raises(ValueError, match=msg):
      validation.validate_config(_tiny(**bad))
