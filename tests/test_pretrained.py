"""Starting from trained weights: config.init_from / config.init_skip."""

import json

import jax
import numpy as np
import pytest

from spikeformer_jax import checkpointing, config_lib, errors, pretrained, recordings
from spikeformer_jax import experiment, restore, sharding, train_lib, validation
from test_models import cfgs


def _tiny(**over):
  base = {'total_steps': 2, 'ckpt_every_steps': 2, 'eval_every_epochs': 0, 'log_every_steps': 1}
  return config_lib.apply_overrides(cfgs.get_config('cifar10-4-384,runlocal'), {**base, **over})


def _tensorboard_tags(directory) -> set:
  """Tags in the event files of `directory` (TFRecord framing, read by hand)."""
  import struct  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  tags = set()
  for path in directory.glob('events.out.tfevents.*'):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      tags |= {v.tag for v in event.summary.value}
      i += 12 + n + 4
  return tags


def _restored(config, workdir):
  exp = experiment.build(config, sharding.make_mesh(8), 4)
  state, _ = checkpointing.Checkpointer(str(workdir / 'checkpoints')).restore(exp.abstract_state)
  return jax.device_get(state)


@pytest.mark.slow
def test_fine_tuning_starts_from_a_run_of_ours_with_a_fresh_head_and_optimizer(
  tmp_path, monkeypatch, capsys
):
  src = tmp_path / 'pretrained'
  train_lib.train_and_evaluate(_tiny(profile_steps=(1, 2)), str(src))
  trained = checkpointing.flatten(_restored(_tiny(), src))
  # The run's parameter overview and its profile of steps 1-2 (JAX conventions).
  out = capsys.readouterr().out
  assert 'parameters: block ' in out and 'profile of steps 1-2 ->' in out
  table = (src / 'params.txt').read_text().splitlines()
  assert table[-1].split()[-1] == '29,038' and any(line.startswith('head/kernel') for line in table)
  (xplane,) = (src / 'profile').rglob('*.xplane.pb')
  # XProf's step boundaries: a StepTraceAnnotation around each traced step.
  marked = [
    dict(event.stats).get('step_num')
    for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes
    for line in plane.lines
    for event in line.events
    if event.name == 'train'
  ]
  assert sorted(marked) == [1, 2], marked
  # TensorBoard (tensorboardX, no TensorFlow): the metrics and the config.
  tags = _tensorboard_tags(src / 'tb')
  assert {'train/loss', 'train/lr', 'images_per_s', 'test/top1', 'test/loss'} <= tags, tags
  assert '_hparams_/experiment' in tags
  assert 'firing_rate/block.0.attn.q_lif' in tags, sorted(tags)  # per layer, at evaluation

  five = {'model.num_classes': 5, 'data.num_classes': 5}
  # Another class count: the head does not fit, and nothing is written.
  with pytest.raises(errors.UserError) as e:
    train_lib.train_and_evaluate(_tiny(init_from=str(src), **five), str(tmp_path / 'bad'))
  assert 'params/head/kernel (32, 10) vs ours (32, 5)' in str(e.value)
  assert """--config.init_skip="('head',)" """ in str(e.value)
  assert not (tmp_path / 'bad').exists()

  seen = {}
  real = pretrained.apply
  monkeypatch.setattr(
    pretrained, 'apply', lambda state, take: seen.setdefault('s', jax.device_get(real(state, take)))
  )
  config = _tiny(init_from=str(src), init_skip=('head',), ema_decay=0.9, **five)
  train_lib.train_and_evaluate(config, str(tmp_path / 'tuned'))
  start = checkpointing.flatten(seen['s'])
  for name, value in start.items():
    if name.startswith(('params/', 'batch_stats/')) and 'head' not in name:
      np.testing.assert_array_equal(value, trained[name], err_msg=name)
      np.testing.assert_array_equal(start['ema/' + name], trained[name], err_msg=name)
  assert start['params/head/kernel'].shape == (32, 5)
  assert int(start['step']) == 0 and not any(  # a fresh optimizer: zero moments
    np.any(v) for k, v in start.items() if k.startswith('opt_state/') and v.ndim
  )
  out = capsys.readouterr().out
  assert 'kept fresh (init_skip): params/head/bias, params/head/kernel.' in out, out[-3000:]

  # Resuming its own checkpoint ignores init_from (here gone).
  import shutil  # pylint: disable=import-outside-toplevel

  shutil.rmtree(src)
  config.total_steps = 4
  assert train_lib.train_and_evaluate(config, str(tmp_path / 'tuned'))['steps'] == 4


def test_bad_sources_are_one_line_and_write_nothing(tmp_path):
  cases = {
    tmp_path / 'missing': 'does not exist',
    tmp_path / 'weights.txt': 'neither a directory of ours nor',
    tmp_path / 'empty_dir': 'holds no checkpoint of ours',
    tmp_path / 'broken': 'is unreadable',
    tmp_path / 'garbage.npz': 'is unreadable',
  }
  (tmp_path / 'weights.txt').write_text('x')
  (tmp_path / 'empty_dir').mkdir()
  (tmp_path / 'broken' / 'checkpoints' / '4' / 'state').mkdir(parents=True)
  (tmp_path / 'broken' / 'checkpoints' / '4' / 'state' / '_METADATA').write_text('{not json')
  (tmp_path / 'garbage.npz').write_bytes(b'not a zip file')
  for path, message in cases.items():
    wd = tmp_path / f'wd_{path.name}'
    with pytest.raises(errors.UserError, match=message):
      train_lib.train_and_evaluate(_tiny(init_from=str(path)), str(wd))
    assert not wd.exists(), path


def test_an_official_state_dict_initialises_the_model(shared_dir, tmp_path):
  """An .npz of an official state_dict (a fidelity recording's weights) gives
  the parameters convert.load_state_dict gives."""
  d, rec = recordings.read_recording(str(shared_dir / 'fixtures' / 'spikformer_cifar.npz'))
  state_dict = recordings.state_dict(d)
  np.savez(tmp_path / 'official.npz', **state_dict)
  config = _tiny(init_from=str(tmp_path / 'official.npz'))
  mc = recordings.model_config_from_fixture(rec)
  mc.dtype = 'float32'
  config.model = mc
  config.data.shape = (mc.img_size, mc.img_size, 3)
  take, notes = train_lib.initial_weights(config, str(tmp_path / 'wd'))
  model, _ = recordings.model_holding(mc, state_dict)
  from flax import nnx  # pylint: disable=import-outside-toplevel

  want = checkpointing.flatten(
    {'params': nnx.state(model, nnx.Param), 'batch_stats': nnx.state(model, nnx.BatchStat)}
  )
  assert set(take) == set(want) and 'Initialised' in notes[0]
  for name, value in want.items():
    np.testing.assert_allclose(take[name], np.asarray(value), rtol=1e-6, err_msg=name)
  assert json.dumps(sorted(take))  # names are plain strings


def _fixture_config(shared_dir, tmp_path, edit=None):
  """A config of the Spikformer CIFAR recording's model whose init_from is its
  official state_dict (as .npz), after `edit(state_dict)`."""
  d, rec = recordings.read_recording(str(shared_dir / 'fixtures' / 'spikformer_cifar.npz'))
  state_dict = recordings.state_dict(d)
  if edit:
    edit(state_dict)
  np.savez(tmp_path / 'official.npz', **state_dict)
  config = _tiny(init_from=str(tmp_path / 'official.npz'))
  mc = recordings.model_config_from_fixture(rec)
  mc.dtype = 'float32'
  config.model = mc
  config.data.shape = (mc.img_size, mc.img_size, 3)
  return config


def test_an_official_array_of_another_layout_is_named_before_anything_is_written(
  shared_dir, tmp_path
):
  """fc1 given as [in, out] has as many elements as PyTorch's [out, in]: it
  used to load ("74 of 74 arrays"). init_from and convert name it, with the
  other arrays no weight can be, and write nothing."""
  fc1 = 'block.0.mlp.fc1_linear.weight'

  def edit(sd):
    sd[fc1] = np.ascontiguousarray(sd[fc1].T)  # (64, 256): [in, out]
    sd['head.bias'][3] = np.nan
    sd['block.0.attn.q_bn.running_var'] = sd['block.0.attn.q_bn.running_var'].astype(np.int32)

  config = _fixture_config(shared_dir, tmp_path, edit)
  from spikeformer_jax import convert  # pylint: disable=import-outside-toplevel

  for attempt in (
    lambda: train_lib.initial_weights(config, str(tmp_path / 'wd')),
    lambda: convert.write_workdir(config, config.init_from, str(tmp_path / 'out')),
  ):
    with pytest.raises(errors.UserError) as e:
      attempt()
    msg = str(e.value)
    assert msg.startswith(
      f'init_from={config.init_from} does not fit this model: 1 of '
      'another shape (params/block/0/mlp/fc1_linear/kernel '
      f'({fc1} is (64, 256), officially (256, 64))); 2 of unusable values '
      '(batch_stats/block/0/attn/q_bn/var holds int32, not floats, '
      'params/head/bias has 1 of 10 values NaN or infinite). '
    ), msg
    assert msg.endswith('or fix the config or the source.') and '\n' not in msg, msg
  assert not (tmp_path / 'wd').exists() and not (tmp_path / 'out').exists()


def test_convert_writes_a_new_workdir_only_and_holds_its_lock(shared_dir, tmp_path, monkeypatch):
  """convert never writes into a live run, a run (finished, converted) or a
  directory of other files; it holds the workdir's lock while it writes, and
  removes what it wrote if writing fails."""
  import os  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import convert, workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  config = _fixture_config(shared_dir, tmp_path)
  src = config.init_from
  (tmp_path / 'live').mkdir()
  (tmp_path / 'run' / 'checkpoints' / '7').mkdir(parents=True)
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'todo.txt').write_text('x')
  (tmp_path / 'file').write_text('x')
  cases = {
    'run': 'already holds a run (its config.json or checkpoints/); give a new directory',
    'notes': 'is not empty (it holds todo.txt); convert writes a new workdir',
    'file': 'is a file; give a new directory',
  }
  with workdir_lib.WorkdirLock(str(tmp_path / 'live'), command='train.py --workdir=live'):
    with pytest.raises(
      errors.UserError,
      match=r'--out=.*live is in use by process \d+ on .*'
      r'train.py --workdir=live\); give a new directory',
    ):
      convert.write_workdir(config, src, str(tmp_path / 'live'))
    for name, message in cases.items():
      with pytest.raises(errors.UserError) as e:
        convert.write_workdir(config, src, str(tmp_path / name))
      assert str(e.value).startswith(f'--out={tmp_path / name} {message}'), str(e.value)
  assert os.listdir(tmp_path / 'live') == [] and os.listdir(tmp_path / 'run') == ['checkpoints']

  # A failed write leaves nothing that would pass for a run.
  real_save = checkpointing.Checkpointer.save

  def failing(self, *a, **k):
    raise errors.CheckpointError('disk full (simulated)')

  monkeypatch.setattr(checkpointing.Checkpointer, 'save', failing)
  with pytest.raises(errors.CheckpointError, match='simulated'):
    convert.write_workdir(config, src, str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()
  # An empty directory is converted into, and a training is refused while it is.
  seen = []

  def save(self, *a, **k):
    with pytest.raises(errors.WorkdirBusy, match='is in use by process'):
      workdir_lib.WorkdirLock(str(tmp_path / 'live')).acquire()
    seen.append(workdir_lib.holder(str(tmp_path / 'live'))['command'])
    return real_save(self, *a, **k)

  monkeypatch.setattr(checkpointing.Checkpointer, 'save', save)
  convert.write_workdir(config, src, str(tmp_path / 'live'))
  assert seen and sorted(os.listdir(tmp_path / 'live')) == ['checkpoints', 'config.json']


@pytest.mark.parametrize(
  'transfer,imagenet',
  [
    ('cifar10-transfer-8-512', 'imagenet-8-512'),
    ('cifar100-transfer-8-384', 'imagenet-8-384'),
    ('cifar10-transfer-4-384', 'imagenet-4-384'),
  ],
)
def test_table7_rows_take_the_imagenet_models_weights(transfer, imagenet):
  """Spikformer's Table 7 rows are the ImageNet model but for the class count
  (the head stays fresh), at 224x224, for 60 epochs (50 + 10 cooldown) of the
  CIFAR recipe. imagenet-4-384 (no Table 2 row) is the 4-384 rows' source."""
  t, i = cfgs.get_config(transfer), cfgs.get_config(imagenet)
  a, b = t.model.to_dict(), i.model.to_dict()
  assert a.pop('num_classes') != b.pop('num_classes') and a == b
  assert t.init_skip == ('head',) and t.data.image_size == 224
  assert (t.epochs, t.epochs + t.cooldown_epochs) == (50, 60)  # "finetuned with 60 epochs"
  assert t.init_required and not i.init_required
  assert i.optimizer == cfgs.get_config('imagenet-8-384').optimizer
  cifar = cfgs.get_config(transfer.split('-')[0] + '-4-384')
  assert t.optimizer.to_dict() == cifar.optimizer.to_dict() and t.mixup == cifar.mixup


def test_table7_rows_refuse_to_start_without_init_from(tmp_path, monkeypatch):
  """A transfer row without init_from would train from scratch unnoticed: one
  line before anything is written; init_from=none says so on purpose."""
  monkeypatch.setattr(experiment, 'make_train_step', lambda *a: pytest.fail('compiled'))
  workdir = tmp_path / 'wd'
  c = cfgs.get_config('cifar100-transfer-8-384')
  with pytest.raises(ValueError) as e:
    train_lib.train_and_evaluate(c, str(workdir))
  assert str(e.value) == (
    'spikformer:cifar100-transfer-8-384 fine-tunes trained weights but init_from is not '
    'set: give --config.init_from=WORKDIR of the run to start from (Table 7: the ImageNet '
    'run), or --config.init_from=none to train it from scratch.'
  )
  assert not workdir.exists()
  c.init_from = 'none'
  validation.validate_start(c)
  assert train_lib.initial_weights(c, str(workdir)) is None  # nothing to load
  assert not pretrained.requested(c) and not workdir.exists()
  c.init_from = str(tmp_path / 'in1k')  # a path is a source, checked as always
  validation.validate_start(c)
  assert pretrained.requested(c)
  with pytest.raises(errors.UserError, match='does not exist'):
    train_lib.initial_weights(c, str(workdir))
  # Rows that start fresh, and the seconds-long smoke runs, need no weights.
  for variant in ('cifar10-4-384', 'imagenet-4-384', 'cifar10-transfer-4-384,runlocal'):
    validation.validate_start(cfgs.get_config(variant))


def test_train_py_refuses_a_transfer_row_without_init_from_in_one_line(tmp_path):
  import subprocess
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import ROOT  # pylint: disable=import-outside-toplevel

  p = subprocess.run(
    [
      sys.executable,
      'train.py',
      '--config=configs/spikformer.py:cifar10-transfer-4-384',
      f'--workdir={tmp_path / "wd"}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 1 and 'Traceback' not in p.stderr
  assert (
    p.stderr.strip()
    .splitlines()[-1]
    .startswith(
      'error: spikformer:cifar10-transfer-4-384 fine-tunes trained weights but init_from is not set'
    )
  )
  assert not (tmp_path / 'wd').exists()


@pytest.mark.slow
def test_an_official_checkpoint_becomes_a_workdir_eval_and_init_from_use(shared_dir, tmp_path):
  """python -m spikeformer_jax.convert: an official state_dict (here a fidelity
  recording's, as .npz) -> a workdir whose step 0 holds exactly its weights."""
  import os
  import subprocess
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import ROOT  # pylint: disable=import-outside-toplevel

  d, rec = recordings.read_recording(str(shared_dir / 'fixtures' / 'sdt_cifar.npz'))
  np.savez(tmp_path / 'sdt.npz', **recordings.state_dict(d))
  kw = rec['constructor_args_full']
  over = [
    f'--config.model.{k}={v}'
    for k, v in (
      ('embed_dim', kw['embed_dims']),
      ('depth', kw['depths']),
      ('num_heads', kw['num_heads']),
      ('T', rec['T']),
      ('dead_modules', True),
    )
  ] + ['--config.data.name=synthetic']
  out = tmp_path / 'converted'
  cmd = [
    sys.executable,
    '-m',
    'spikeformer_jax.convert',
    '--config=configs/sdt.py:cifar10-2-512',
    f'--torch={tmp_path / "sdt.npz"}',
    f'--out={out}',
    *over,
  ]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1')
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.strip().endswith(f'-> {out}/checkpoints/0.'), p.stdout
  assert not [line for line in p.stderr.splitlines() if line.startswith('I')], (
    p.stderr
  )  # orbax quiet
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 1 and 'already holds a run' in again.stderr, again.stderr

  saved = json.loads((out / 'config.json').read_text())['config']
  from ml_collections import ConfigDict  # pylint: disable=import-outside-toplevel

  config = ConfigDict(saved)
  config.eval_batch_size = 8
  res = restore.evaluate_checkpoint(config, str(out), num_devices=1)
  assert res['step'] == 0 and 0.0 <= res['top1'] <= 1.0
  config.init_from = str(out)
  take, _ = train_lib.initial_weights(config, str(tmp_path / 'new'))
  model, _ = recordings.model_holding(config.model, recordings.state_dict(d))
  from flax import nnx  # pylint: disable=import-outside-toplevel

  want = checkpointing.flatten(
    {'params': nnx.state(model, nnx.Param), 'batch_stats': nnx.state(model, nnx.BatchStat)}
  )
  for name, value in want.items():
    np.testing.assert_array_equal(take[name], np.asarray(value), err_msg=name)


def test_convert_checks_an_empty_out_before_reading_the_checkpoint(tmp_path):
  from spikeformer_jax import convert  # pylint: disable=import-outside-toplevel

  config = _tiny()
  # The source does not exist: reading it first would name it instead.
  with pytest.raises(errors.UserError, match='^--out is empty: give a new directory'):
    convert.write_workdir(config, str(tmp_path / 'missing.pth'), '')
