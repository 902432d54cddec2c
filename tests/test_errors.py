"""Bad input gives one clear line naming the field, the value and what is
valid, raised before anything is compiled (train.py and train_lib)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from spikeformer_jax.configs import a2os2a as a2os2a_configs
from spikeformer_jax.configs import msvit as msvit_configs
from spikeformer_jax.configs import sdt as sdt_configs
from spikeformer_jax.configs import spikformer as spikformer_configs
from spikeformer_jax import config_lib, errors, experiment, sharding, train_lib


def _config(module, variant, **over):
  return config_lib.apply_overrides(module.get_config(variant + ',runlocal'), over)


S, D, M, A = spikformer_configs, sdt_configs, msvit_configs, a2os2a_configs
CASES = {
  'model name': (
    S,
    'cifar10-4-384',
    {'model.name': 'vit'},
    "model.name='vit'; valid: msvit, sdt, spikformer.",
  ),
  'attention': (
    S,
    'cifar10-4-384',
    {'model.attention': 'softmax'},
    "model.attention='softmax'; valid kinds: ssa, sdsa, a2os2a, mssa",
  ),
  'msvit attention': (
    M,
    'cifar10-4-384',
    {'model.attention': ('mssa', 'mssa', 'x')},
    "model.attention=('mssa', 'mssa', 'x'); valid kinds: ssa",
  ),
  'dataset': (
    S,
    'cifar10-4-384',
    {'data.name': 'cifar11'},
    "data.name='cifar11'; valid: 'digits', 'synthetic', 'synthetic_events', 'npz', 'cifar10'",
  ),
  'rand augment': (
    S,
    'cifar10-4-384',
    {'data.augment.rand_augment': 'rand-m9-x3'},
    "data.augment.rand_augment='rand-m9-x3' / rand_augment_ops="
    "'spikformer_cifar': unknown RandAugment spec section 'x3'",
  ),
  'random interpolation at evaluation': (
    S,
    'cifar10-4-384',
    {'data.augment.interpolation': 'random', 'data.augment.eval_crop_pct': 0.9},
    "data.augment.interpolation='random' is for training only, and eval_crop_pct=0.9",
  ),
  'rand augment ops': (
    S,
    'cifar10-4-384',
    {'data.augment.rand_augment_ops': 'cifar'},
    "unknown op_set 'cifar'; valid: ['spikformer_cifar', 'timm']",
  ),
  'dvs policy': (
    S,
    'cifar10dvs-2-256',
    {'data.augment.dvs_policy': 'autoaugment'},
    "data.augment.dvs_policy='autoaugment'; valid: ('', 'snn_augment_wide').",
  ),
  'norm from': (
    M,
    'cifar100-4-384',
    {'data.norm_from': 'svhn'},
    "data.norm_from='svhn'; valid: cifar10, cifar100, imagenet2012 or \"\".",
  ),
  'heads': (
    S,
    'cifar10-4-384',
    {'model.num_heads': 3},
    'model.embed_dim=32 is not divisible by model.num_heads=3; valid heads: 1, 2, 4, 8, 16, 32.',
  ),
  'msvit heads': (
    M,
    'cifar10-4-384',
    {'model.num_heads': 3},
    'is not divisible by model.num_heads=3',
  ),
  'stem pooling': (
    D,
    'cifar10-2-256',
    {'model.img_size': 30, 'data.shape': (30, 30, 3)},
    'model.img_size=30 is not a multiple of 4, the factor by which the '
    'patch stem of sdt sdsa 1-32 downsamples; use e.g. 28.',
  ),
  'msvit stem': (
    M,
    'imagenet-10-384',
    {'model.img_size': 40, 'data.shape': (40, 40, 3)},
    'model.img_size=40 is not a multiple of 16',
  ),
  'image size': (
    S,
    'cifar10-4-384',
    {'data.shape': (24, 24, 3)},
    "data 'synthetic' has 24x24 images but model.img_size=32; set both",
  ),
  'timesteps': (
    S,
    'cifar10-4-384',
    {'model.T': 0},
    'model.T=0: the number of timesteps must be >= 1.',
  ),
  'remat stem': (
    D,
    'cifar10-2-256',
    {'model.remat_stem': 'some'},
    "model.remat_stem='some'; valid: '', 'full', 'dots', 'dots_no_batch'.",
  ),
  'weight grad': (
    S,
    'cifar10-4-384',
    {'model.weight_grad': 'im2col'},
    "model.weight_grad='im2col'; valid: auto, xla, gemm.",
  ),
  'event frames': (
    S,
    'cifar10dvs-2-256',
    {'model.T': 3},
    'event data has T=2 frames but model.T=3.',
  ),
  'batch': (
    S,
    'cifar10-4-384',
    {'batch_size': 12},
    'batch_size=12 must be divisible by the 8 data-parallel devices; use a multiple of 8.',
  ),
  'missing data': (
    S,
    'cifar10-4-384',
    {'data.name': 'npz', 'data.path': '/nowhere/c10.npz'},
    "data.path='/nowhere/c10.npz' does not exist; point --config.data.path",
  ),
  'unprepared tfds data': (
    S,
    'cifar10-4-384',
    {'data.name': 'cifar10', 'data.data_dir': '/nowhere/tfds'},
    'cifar10 is not prepared as ArrayRecord in /nowhere/tfds',
  ),
  'unprepared event data': (
    S,
    'cifar10dvs-2-256',
    {'data.name': 'cifar10_dvs', 'data.data_dir': '/nowhere/tfds'},
    'python prepare.py --dataset=cifar10_dvs --data_dir=/nowhere/tfds '
    '--frames=2 --split_by=number --manual_dir=DOWNLOADS',
  ),
  # Every field a user sets: sizes, counts, rates and probabilities.
  'negative lr': (S, 'cifar10-4-384', {'optimizer.lr': -1e-3}, 'optimizer.lr=-0.001 must be > 0.'),
  'infinite lr': (
    S,
    'cifar10-4-384',
    {'optimizer.lr': float('inf')},
    'optimizer.lr=inf must be finite.',
  ),
  'ignored data path': (
    S,
    'cifar10-4-384',
    {'data.path': '/data/c10.npz'},
    "data.path='/data/c10.npz' is read only with data.name='npz' (now "
    "'synthetic'): set --config.data.name=npz, or drop data.path.",
  ),
  'batch 0': (S, 'cifar10-4-384', {'batch_size': 0}, 'batch_size=0 must be >= 1.'),
  'eval batch 0': (S, 'cifar10-4-384', {'eval_batch_size': 0}, 'eval_batch_size=0 must be >= 1.'),
  'keep no checkpoint': (
    S,
    'cifar10-4-384',
    {'ckpt_keep': 0},
    'ckpt_keep=0 would keep no checkpoint; use ckpt_keep >= 1.',
  ),
  'checkpoint period': (
    S,
    'cifar10-4-384',
    {'ckpt_every_steps': -1},
    'ckpt_every_steps=-1 must be >= 0 (0: every epoch).',
  ),
  'eval period': (
    S,
    'cifar10-4-384',
    {'eval_every_epochs': -1},
    'eval_every_epochs=-1 must be >= 0 (0: only at the end).',
  ),
  'log period': (S, 'cifar10-4-384', {'log_every_steps': 0}, 'log_every_steps=0 must be >= 1.'),
  'steps': (
    S,
    'cifar10-4-384',
    {'total_steps': -5},
    'total_steps=-5 must be >= 0 (0: from epochs).',
  ),
  'label smoothing': (
    S,
    'cifar10-4-384',
    {'label_smoothing': 1.0},
    'label_smoothing=1.0 must be in [0, 1) (0: none).',
  ),
  'ema decay': (
    S,
    'cifar10-4-384',
    {'ema_decay': 1.0},
    'ema_decay=1.0 must be in [0, 1) (0: no EMA of the weights).',
  ),
  'weight decay': (
    S,
    'cifar10-4-384',
    {'optimizer.weight_decay': -0.05},
    'optimizer.weight_decay=-0.05 must be >= 0.',
  ),
  'warmup': (
    S,
    'cifar10-4-384',
    {'optimizer.warmup_epochs': -1},
    'optimizer.warmup_epochs=-1 must be >= 0.',
  ),
  'accumulation': (
    S,
    'cifar10-4-384',
    {'optimizer.accum_steps': 0},
    'optimizer.accum_steps=0 must be >= 1 (1: no gradient accumulation).',
  ),
  'grad clip': (
    S,
    'cifar10-4-384',
    {'optimizer.grad_clip_norm': -1.0},
    'optimizer.grad_clip_norm=-1.0 must be >= 0 (0: none).',
  ),
  'optimizer': (
    S,
    'cifar10-4-384',
    {'optimizer.name': 'sgd'},
    "optimizer.name='sgd'; valid: ('adamw', 'lamb').",
  ),
  'mixup prob': (
    S,
    'cifar10-4-384',
    {'mixup.prob': 1.5},
    'mixup.prob=1.5 is a probability: use a value in [0, 1].',
  ),
  'mixup alpha': (
    S,
    'cifar10-4-384',
    {'mixup.mixup_alpha': -0.5},
    'mixup.mixup_alpha=-0.5 must be >= 0 (0: off).',
  ),
  'flip prob': (
    S,
    'cifar10-4-384',
    {'data.augment.hflip': 2.0},
    'data.augment.hflip=2.0 is a probability: use a value in [0, 1].',
  ),
  'devices': (
    S,
    'cifar10-4-384',
    {'num_devices': -2},
    'num_devices=-2: use -1 (all visible devices) or a count >= 1.',
  ),
  'target as percent': (
    S,
    'cifar10-4-384',
    {'target_top1': 97.0},
    'target_top1=97.0 is a fraction: use a value in [0, 1], e.g. 0.97.',
  ),
  'bn scope': (S, 'cifar10-4-384', {'bn_scope': 'local'}, "bn_scope='local'; valid: "),
  'image size 0': (S, 'cifar10-4-384', {'model.img_size': 0}, 'model.img_size=0 must be >= 1.'),
  'neuron tau': (
    S,
    'cifar10-4-384',
    {'model.neuron.tau': 0.0},
    'model.neuron.tau=0.0 must be > 0.',
  ),
  # A leak outside (0, 1) of the membrane, a reset at the threshold: trains, to nothing.
  'tau below one': (
    S,
    'cifar10-4-384',
    {'model.neuron.tau': 0.5},
    'model.neuron.tau=0.5 must be > 1: the LIF keeps 1 - 1/tau',
  ),
  'tau one': (S, 'cifar10-4-384', {'model.neuron.tau': 1.0}, 'model.neuron.tau=1.0 must be > 1'),
  'tiny tau': (
    S,
    'cifar10-4-384',
    {'model.neuron.tau': 1e-300},
    'model.neuron.tau=1e-300 must be > 1',
  ),
  # The ternary V neuron charges with model.neuron.tau even when the network's does not.
  'ternary tau': (
    A,
    'cifar10-2-256',
    {'model.neuron.charge_form': 'paper', 'model.neuron.tau': 0.5},
    'model.neuron.tau=0.5 must be > 1',
  ),
  'paper beta': (
    S,
    'cifar10-4-384',
    {'model.neuron.charge_form': 'paper', 'model.neuron.beta': 1.5},
    "model.neuron.beta=1.5 is the fraction of the membrane kept "
    "(charge_form='paper'): use a value in [0, 1].",
  ),
  'ternary beta': (
    A,
    'cifar10-2-256',
    {'model.ternary.beta': -0.1},
    'model.ternary.beta=-0.1 is the fraction of the membrane kept',
  ),
  'reset at threshold': (
    D,
    'cifar10-2-256',
    {'model.neuron.v_reset': 1.0},
    'model.neuron.v_reset=1.0 must be below model.neuron.v_threshold=1.0',
  ),
  'reset above the attention threshold': (
    S,
    'cifar10-4-384',
    {'model.neuron.v_reset': 0.7},
    'model.neuron.v_reset=0.7 must be below model.attn_v_threshold=0.5',
  ),
  'ternary reset': (
    A,
    'cifar10-2-256',
    {'model.ternary.v_reset': -1.0},
    'model.ternary.v_reset=-1.0 must be in (-1.0, 1.0), within model.ternary.v_threshold',
  ),
  'warmup beyond epochs': (
    S,
    'cifar10-4-384',
    {'total_steps': 0, 'epochs': 5, 'optimizer.warmup_epochs': 5},
    'optimizer.warmup_epochs=5 must be below epochs=5: the lr would never reach optimizer.lr',
  ),
  'huge seed': (
    S,
    'cifar10-4-384',
    {'seed': 99999999999999999999},
    'seed=99999999999999999999 must be in [0, 9223372036854775808)',
  ),
  'mesh axis 0': (
    S,
    'cifar10-4-384',
    {'mesh.data': 0},
    'mesh.data=0: use a device count >= 1, or -1 for the rest.',
  ),
  'npz without path': (
    S,
    'cifar10-4-384',
    {'data.name': 'npz', 'data.path': ''},
    "data.name='npz' reads data.path, which is not set",
  ),
  'rand augment grammar': (
    S,
    'cifar10-4-384',
    {'data.augment.rand_augment': 'bogus'},
    "got 'bogus'; e.g. 'rand-m9-n1-mstd0.4-inc1' (sections m, n, "
    "mstd, mmax, inc, w, p, each followed by a number), or '' for none",
  ),
  'neuron surrogate': (
    S,
    'cifar10-4-384',
    {'model.neuron.surrogate': 'tanh'},
    "model.neuron.surrogate='tanh' is not valid; choose one of",
  ),
  'pooling': (
    S,
    'cifar10-4-384',
    {'model.pooling': '001'},
    "model.pooling='001': four '0'/'1' characters, one per stage",
  ),
  'msvit graph': (
    M,
    'cifar10-4-384',
    {'model.graph': 'resnet'},
    "model.graph='resnet'; valid: ['cifar', 'dvs', 'imagenet'].",
  ),
  'data shape': (
    S,
    'cifar10-4-384',
    {'data.shape': (32, 32)},
    'data.shape=(32, 32): expected (H, W, C) images or (T, H, W, 2) event frames',
  ),
  'synthetic test split': (
    S,
    'cifar10-4-384',
    {'data.num_test': 0},
    'data.num_test=0 must be >= 1 (synthetic test examples).',
  ),
  'normalisation': (
    S,
    'cifar10-4-384',
    {'data.std': (0.2, 0.0, 0.2)},
    'data.std=(0.2, 0.0, 0.2) must be > 0.',
  ),
  # Every float field is finite (NaN fails no `x < 0` check), named in one line.
  'nan tau': (
    S,
    'cifar10-4-384',
    {'model.neuron.tau': float('nan')},
    'model.neuron.tau=nan must be finite.',
  ),
  'nan threshold': (
    D,
    'cifar10-2-256',
    {'model.neuron.v_threshold': float('nan')},
    'model.neuron.v_threshold=nan must be finite.',
  ),
  'infinite weight decay': (
    M,
    'cifar10-4-384',
    {'optimizer.weight_decay': float('inf')},
    'optimizer.weight_decay=inf must be finite.',
  ),
  'nan in a tuple': (
    S,
    'cifar10-4-384',
    {'data.mean': (0.5, float('nan'), 0.5)},
    'data.mean=(0.5, nan, 0.5) must be finite.',
  ),
  'zero threshold': (
    S,
    'cifar10-4-384',
    {'model.attn_v_threshold': 0.0},
    'model.attn_v_threshold=0.0 must be > 0.',
  ),
  'init_skip of numbers': (
    S,
    'cifar10-4-384',
    {'init_skip': (3,)},
    'init_skip=(3,): a tuple of regular expressions (strings)',
  ),
  'init_skip regex': (
    S,
    'cifar10-4-384',
    {'init_skip': ('head[',)},
    "init_skip=('head[',): 'head[' is not a regular expression",
  ),
  # Sizes whose edges crashed in the model (division by zero, empty layers).
  'mlp ratio': (
    S,
    'cifar10-4-384',
    {'model.mlp_ratio': 0.001},
    'model.mlp_ratio=0.001 makes the MLP of a width-32 block int(32 * 0.001) = 0 '
    'wide; use mlp_ratio > 1/32.',
  ),
  'msvit mlp ratio': (
    M,
    'cifar10-4-384',
    {'model.mlp_ratio': 0.04},
    'makes the MLP of a width-16 block',
  ),
  'no heads': (S, 'cifar10-4-384', {'model.num_heads': 0}, 'model.num_heads=0 must be >= 1.'),
  'negative heads': (
    M,
    'cifar10-4-384',
    {'model.num_heads': -2},
    'model.num_heads=-2 must be >= 1.',
  ),
  'no width': (
    D,
    'cifar10-2-256',
    {'model.embed_dim': 0},
    'model.embed_dim=0 must be a positive multiple of 8',
  ),
  'msvit stage width': (
    M,
    'cifar10-4-384',
    {'model.dims': (0, 16, 32)},
    'stage widths must be >= 1 and block counts >= 0.',
  ),
  'msvit even kernel': (
    M,
    'cifar10-4-384',
    {'model.mssa_kernels': ((2, 3), (1, 3), (1, 3))},
    'each 0 (drops the branch) or odd',
  ),
  'profile beyond the run': (
    S,
    'cifar10-4-384',
    {'profile_steps': (2, 1000)},
    "profile_steps=(2, 1000) ends beyond this run's 4 steps; choose "
    '(first, last) with last <= 4, or () for none.',
  ),
}


@pytest.mark.parametrize('case', list(CASES))
def test_one_clear_error_before_compiling(case, tmp_path, monkeypatch):
  module, variant, over, message = CASES[case]
  # Nothing may be traced: the errors come from the config alone.
  monkeypatch.setattr(experiment, 'make_train_step', lambda *a: pytest.fail('compiled'))
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    train_lib.train_and_evaluate(_config(module, variant, **over), str(tmp_path))
  assert message in str(e.value)
  assert '\n' not in str(e.value)
  assert isinstance(e.value, errors.USER_ERRORS)  # one line, no traceback (errors.report)
  written = {'config.json', 'metrics.jsonl', 'tb', 'checkpoints'} & set(os.listdir(tmp_path))
  assert not written  # refused before the run writes anything


@pytest.mark.parametrize('case', list(CASES))
def test_config_errors_come_before_the_workdir(case, tmp_path):
  """What the config alone shows is refused before train.py creates --workdir."""
  from spikeformer_jax import validation  # pylint: disable=import-outside-toplevel

  module, variant, over, message = CASES[case]
  c = _config(module, variant, **over)
  if message in _error(lambda: (validation.validate_config(c), validation.validate_start(c))):
    return
  # The rest need the data or the devices: the run removes the workdir it made.
  workdir = tmp_path / 'new' / 'run'
  assert message in _error(lambda: train_lib.train_and_evaluate(c, str(workdir)))
  assert not os.listdir(tmp_path)


def _error(fn) -> str:
  try:
    fn()
  except (ValueError, FileNotFoundError) as e:
    return str(e)
  return ''


# Found only with the data or the devices, after the workdir exists.
LATE_CASES = {
  'batch beyond the split': (
    {'batch_size': 128},
    'batch_size=128 exceeds the 64 training examples',
  ),
  'too many devices': ({'num_devices': 64}, 'num_devices=64: use -1 (all) or 1..'),
  'mesh': ({'mesh.fsdp': 3}, 'mesh.fsdp=3 does not divide'),
}


@pytest.mark.parametrize('case', list(LATE_CASES))
def test_refused_runs_remove_only_the_workdir_they_created(case, tmp_path):
  over, message = LATE_CASES[case]
  c = _config(S, 'cifar10-4-384', **over)
  for workdir in (tmp_path / 'new' / 'run', tmp_path / 'empty', tmp_path / 'mine'):
    if workdir.name != 'run':
      workdir.mkdir()
    if workdir.name == 'mine':
      (workdir / 'notes.txt').write_text('kept')
    with pytest.raises(errors.UserError, match=re.escape(message)):
      train_lib.train_and_evaluate(c, str(workdir))
  # new/ and new/run were this run's, empty: gone; the others were there before.
  assert sorted(os.listdir(tmp_path)) == ['empty', 'mine']
  assert not os.listdir(tmp_path / 'empty')
  assert os.listdir(tmp_path / 'mine') == ['notes.txt']


def test_eval_batch_is_at_most_the_test_split():
  """eval_batch_size beyond the test split only spends memory (OOM at the first
  evaluation): evaluation runs in batches of the split, rounded up to the
  devices, and says so."""
  lines = []
  one, eight = sharding.make_mesh(1), sharding.make_mesh(-1)
  assert experiment.fit_eval_batch(100000, 359, one, lines.append) == 359
  assert lines == [
    'eval_batch_size=100000 is larger than the 359 test examples: evaluating in batches of 359.'
  ]
  d = sharding.data_size(eight)
  assert experiment.fit_eval_batch(100000, 359, eight) == -(-359 // d) * d
  assert experiment.fit_eval_batch(64, 359, one, lines.append) == 64  # the digits default
  assert len(lines) == 1


def test_train_py_prints_one_line(tmp_path):
  argv = [
    sys.executable,
    'train.py',
    '--config=configs/spikformer.py:digits',
    f'--workdir={tmp_path}',
    '--config.model.T=0',
  ]
  line = 'error: model.T=0: the number of timesteps must be >= 1.'
  p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1] == line
  assert 'Traceback' not in p.stderr
  # --traceback: where it was raised, then the same line.
  p = subprocess.run([*argv, '--traceback'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == line
  assert 'Traceback (most recent call last):' in p.stderr and 'validation.py", line ' in p.stderr


# A plug-in kind with a bug: SSA whose forward broadcasts shapes that do not fit.
_BUGGY_PLUGIN = """
import jax.numpy as jnp
from spikeformer_jax import attention
from spikeformer_jax.attention import ssa

class Buggy(ssa.SSA):
  name = 'buggy'
  def forward(self, attn, x):
    return x + jnp.zeros((3,) + x.shape)[:, :2]  # Incompatible shapes for broadcasting

attention.register(Buggy())
"""


def test_a_bug_in_a_plugin_keeps_its_traceback(tmp_path):
  """A plain ValueError from JAX or a plug-in is a bug: the traceback names the
  file and line, then the one line says what and that it is a bug."""
  (tmp_path / 'buggy_plugin_kind.py').write_text(_BUGGY_PLUGIN)
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get('PYTHONPATH', '')]),
  )
  p = subprocess.run(
    [
      sys.executable,
      'train.py',
      '--config=configs/spikformer.py:digits',
      f'--workdir={tmp_path / "run"}',
      "--config.plugins=('buggy_plugin_kind',)",
      '--config.model.attention=buggy',
      '--config.total_steps=1',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert p.returncode == 1, p.stderr[-3000:]
  assert 'Traceback (most recent call last):' in p.stderr
  assert f'{tmp_path / "buggy_plugin_kind.py"}", line 9, in forward' in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ValueError: ') and 'Incompatible shapes' in last, last
  assert last.endswith('(a bug, not a problem with the input: the traceback above shows where)')


def test_a_plugin_check_may_raise_value_error():
  """A kind's or family's check(model) rejects configs: its plain ValueError
  is a user error (errors.py)."""
  from spikeformer_jax import attention, validation  # pylint: disable=import-outside-toplevel
  from spikeformer_jax.attention import ssa  # pylint: disable=import-outside-toplevel

  class Picky(ssa.SSA):
    name = 'picky'

    def check(self, model):
      raise ValueError('model.picky.level=7\n must be <= 3.')

  attention.register(Picky())
  try:
    with pytest.raises(errors.ConfigError, match=r'^model.picky.level=7 must be <= 3.$'):
      validation.validate_config(_config(S, 'cifar10-4-384', **{'model.attention': 'picky'}))
  finally:
    attention.unregister('picky')


# Command-line mistakes are found while the flags are parsed: one line, exit
# status 2 (cli.USAGE_EXIT), before JAX is imported (a subprocess is ~2 s).
COMMAND_LINES = {
  # The default config takes its overrides while train.py defines its flags.
  'field typo': (
    ['train.py', '--config.model.TT=3'],
    "error: --config.model.TT: model has no field 'TT'; did you mean model.T?",
  ),
  # An explicit --config takes them while app.run parses the flags.
  'section typo': (
    ['eval.py', '--config=configs/sdt.py:cifar10-2-256', '--config.optimiser.lr=1'],
    "error: --config.optimiser.lr: the config has no field 'optimiser'; did you mean optimizer?",
  ),
  'value type': (
    ['train.py', '--config=configs/spikformer.py:digits', '--config.model.T=abc'],
    "error: --config.model.T=abc: invalid literal for int() with base 10: 'abc'; "
    'model.T takes int values (now 4).',
  ),
}


@pytest.mark.parametrize('case', list(COMMAND_LINES))
def test_command_line_mistakes_are_one_line(case, tmp_path):
  argv, line = COMMAND_LINES[case]
  p = subprocess.run(
    [sys.executable, *argv, f'--workdir={tmp_path}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert (p.returncode, p.stderr.strip()) == (2, line)
  assert not any(tmp_path.iterdir())  # nothing started


def test_prepare_flag_mistakes_are_one_line(monkeypatch, capsys):
  from spikeformer_jax import prepare  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(sys, 'argv', ['prepare.py', '--dataset=bogus'])
  with pytest.raises(SystemExit) as e:
    prepare.run()  # absl would print 'FATAL Flags parsing error' and exit 1
  assert e.value.code == 2
  assert capsys.readouterr().err.strip() == (
    'error: flag --dataset=bogus: value should be one of <cifar10|cifar100|imagenet2012|'
    'nmnist|cifar10_dvs|dvs128_gesture>'
  )


def test_a_nested_errors_last_line_drops_a_dotted_class_name():
  """A config file's error reaches the command line inside absl's message, its
  class written with its module: the one line keeps only what went wrong."""
  from spikeformer_jax import cli  # pylint: disable=import-outside-toplevel

  nested = ValueError(
    'Error whilst parsing config file:\nTraceback (most recent call last):\n'
    "spikeformer_jax.errors.ConfigError: unknown variant 'nosuch'; valid: digits"
  )
  assert cli._last_line(nested) == "unknown variant 'nosuch'; valid: digits"  # pylint: disable=protected-access
