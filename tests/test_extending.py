"""docs/extending.md, executed: an attention kind defined entirely in this file
and registered through the public API runs everywhere the built-in kinds do,
with no other file changed: on the Spikformer and SDT backbones by config,
trained on 8 devices as on 1, counted by the analysis, drawn by the plots, and
a misspelled name is refused with the registered ones listed. Then the page
itself: its my_lab/ files (the attention kind and the model family) written
into an empty directory and its commands run there, at runlocal sizes."""

import json
import os
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from spikeformer_jax.configs import sdt as sdt_configs
from spikeformer_jax.configs import spikformer as spikformer_configs
from spikeformer_jax import analysis, attention, models, ops, plots, validation
from test_train import assert_eight_devices_equal_one


def linear_spiking_attention(q, k, v, *, gain: float):
  """A toy linear-complexity attention: Q (K^T V) * gain / N."""
  n = q.shape[-2]
  return q @ (jnp.swapaxes(k, -1, -2) @ v) * (gain / n)


class ToyLinear(attention.Kind):
  name = 'toy_linear'
  picture = 'K^T V (d x d)'
  config = {'toy_linear': lambda: ml_collections.ConfigDict({'gain': 2.0})}

  def build(self, attn, ctx):
    attention.build_qkv(attn, ctx)  # q/k/v _linear, _bn, _lif
    attn.attn_lif = ctx.s.lif(v_threshold=ctx.attn_v_threshold)
    attn.toy_gain = float(self.own_config(ctx, 'toy_linear').gain)

  def forward(self, attn, x):
    q, k, v = attention.qkv(attn, x)
    q, k, v = attention.heads(attn, attn.q_lif(q), attn.k_lif(k), attn.v_lif(v))
    attn.record_map(lambda: jnp.swapaxes(k, -1, -2) @ v)
    return attn.attn_lif(ops.merge_heads(linear_spiking_attention(q, k, v, gain=attn.toy_gain)))

  def products(self, attn, *, T, n, c, rate):
    d = c // attn.num_heads
    macs = T * attn.num_heads * n * d * d
    return [('K^T V', macs, rate('k_lif'), rate('v_lif')), ('Q (K^T V)', macs, rate('q_lif'), None)]

  def map_axes(self, rows, cols):
    return 'channel', 'channel', True

  def check(self, model):
    if not model.toy_linear.gain > 0:  # read directly: check gets the kind's fields
      raise ValueError(f'model.toy_linear.gain={model.toy_linear.gain} must be > 0.')


@pytest.fixture(autouse=True, scope='module')
def toy_kind():
  attention.register(ToyLinear())
  yield
  attention.unregister('toy_linear')


def _config(module, variant):
  c = module.get_config(variant + ',runlocal')  # after registering: carries toy_linear
  c.model.attention = 'toy_linear'
  c.model.toy_linear.gain = 3.0
  return c


@pytest.mark.slow
@pytest.mark.parametrize(
  'module,variant', [(spikformer_configs, 'cifar10-4-384'), (sdt_configs, 'cifar10-2-256')]
)
def test_a_kind_from_outside_runs_on_both_backbones(module, variant, tmp_path):
  c = _config(module, variant)
  validation.validate_config(c)
  assert 'toy_linear' in attention.names()
  model = models.build_model(c.model)
  attn = model.block[0].attn
  assert attn.kind == 'toy_linear' and attn.toy_gain == 3.0
  assert {'q_lif', 'k_lif', 'v_lif', 'attn_lif'} <= set(vars(attn))

  # Trained on 8 devices as on 1 (one step: the kind's forward and backward).
  assert_eight_devices_equal_one(c, n_steps=1)

  # Counted by the analysis: its products, as AC where an operand spikes.
  model.eval()
  x = np.random.default_rng(0).normal(0, 1, (2, *c.data.shape)).astype(np.float32)
  rep = analysis.analyze(model, [x], T=c.model.T)
  rows = {r['layer']: r for r in rep['layers'] if r['type'] == 'attention'}
  n, ch, h = (
    (c.model.img_size // models.downsampling(c.model)) ** 2,
    c.model.embed_dim,
    c.model.num_heads,
  )
  kv = rows['block.0.attn.K^T V']
  assert kv['macs'] == c.model.T * h * n * (ch // h) ** 2 and kv['op'] == 'AC'
  rate_k = rep['neurons']['block.0.attn.k_lif']['rate']
  rate_v = rep['neurons']['block.0.attn.v_lif']['rate']
  assert kv['sops'] == pytest.approx(min(rate_k, rate_v) * kv['macs'])
  assert rows['block.0.attn.Q (K^T V)']['op'] == 'AC'

  # Drawn: the picture of what it records.
  path = plots.attention_maps(model, x[:1], str(tmp_path / 'toy.png'))
  assert os.path.getsize(path) > 0


def test_a_misspelled_kind_lists_the_registered_ones():
  c = _config(spikformer_configs, 'cifar10-4-384')
  c.model.attention = 'toy_linaer'
  with pytest.raises(ValueError) as e:
    validation.validate_config(c)
  assert str(e.value) == (
    f"model.attention='toy_linaer'; valid kinds: {', '.join(attention.names())}."
  )
  assert str(e.value).endswith('vsa, vsa_float_v, toy_linear.')
  with pytest.raises(ValueError, match='is registered already'):
    attention.register(ToyLinear())


def test_plugins_are_imported_by_name_and_named_when_missing():
  c = _config(spikformer_configs, 'cifar10-4-384')
  c.plugins = ('test_extending',)  # this module: what a run's config.json records
  validation.validate_config(c)
  # Not my_lab: the package docs/extending.md tells users to create.
  c.plugins = ('no_such_plugin_package.attention',)
  with pytest.raises(
    ValueError,
    match=r"plugins: cannot import "
    r"'no_such_plugin_package.attention' \(No module named "
    r"'no_such_plugin_package'\); make it importable",
  ):
    validation.validate_config(c)


def test_a_kinds_check_sees_its_fields_in_a_config_made_before_it():
  """A config made before the kind was registered (a plug-in named on the
  command line) lacks the kind's fields: its check gets their defaults, and
  the config itself is left as it was."""
  c = _config(spikformer_configs, 'cifar10-4-384')
  del c.model['toy_linear']
  validation.validate_config(c)
  assert 'toy_linear' not in c.model
  c.model.toy_linear = ml_collections.ConfigDict({'gain': -1.0})
  with pytest.raises(ValueError, match=r'^model.toy_linear.gain=-1.0 must be > 0.$'):
    validation.validate_config(c)


PAGE = ROOT / 'docs' / 'extending.md'


def _page_blocks(lang: str) -> list[str]:
  return re.findall(rf'^```{lang}\n(.*?)^```', PAGE.read_text(), flags=re.M | re.S)


def _page_command(command: str, tmp) -> list[str]:
  """A command of the page as run here: this checkout's script, the config's
  variant at runlocal sizes (2 steps), workdirs under tmp."""
  argv = shlex.split(command)
  assert argv[0] == 'python' and argv[1] in ('train.py', 'eval.py'), command
  out = [sys.executable, str(ROOT / argv[1])]
  for a in argv[2:]:
    if a.startswith('--config='):
      path, _, arg = a[len('--config=') :].partition(':')
      assert arg, f'{command}: name the variant, so that ,runlocal can be added'
      a = f'--config={ROOT / path if path.startswith("configs/") else path}:{arg},runlocal'
    elif a.startswith('--workdir=/tmp/'):
      a = f'--workdir={tmp / a[len("--workdir=/tmp/") :]}'
    out.append(a)
  return out + (
    ['--config.total_steps=2']
    if argv[1] == 'train.py'
    else ['--analyze_examples=8']
    if '--analyze' in argv
    else []
  )


@pytest.mark.slow
def test_the_pages_files_and_commands_run(tmp_path):
  """docs/extending.md as a user follows it: every `# my_lab/...` block written
  to my_lab/ of an empty directory, then every command of the page run from
  there (my_lab importable from the working directory, as at the checkout's
  root); the family's run is then analysed by eval.py like a built-in one."""
  files = {}
  for block in _page_blocks('python'):
    m = re.match(r'# (my_lab/\w+\.py)\n', block)
    if m:
      files[m[1]] = block
  assert set(files) == {
    'my_lab/linear_attention.py',
    'my_lab/my_experiment.py',
    'my_lab/toynet.py',
    'my_lab/toynet_config.py',
  }, sorted(files)
  (tmp_path / 'my_lab').mkdir()
  (tmp_path / 'my_lab' / '__init__.py').write_text('')
  for path, code in files.items():
    (tmp_path / path).write_text(code)
  commands = [
    line
    for block in _page_blocks('bash')
    for line in block.replace('\\\n', ' ').splitlines()
    if line.strip()
  ]
  assert len(commands) == 4 and sum('toynet' in c for c in commands) == 2, commands
  env = dict(os.environ, PYTHONPATH=str(tmp_path), JAX_NUM_CPU_DEVICES='1')
  for command in commands:
    p = subprocess.run(
      _page_command(command, tmp_path),
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert p.returncode == 0, (command, p.stderr[-3000:])
  config = json.loads((tmp_path / 'toynet' / 'config.json').read_text())['config']
  assert config['model']['name'] == 'toynet' and config['plugins'] == ['my_lab.toynet']
  (out,) = [d for d in os.listdir(tmp_path / 'toynet') if d.startswith('analysis_')]
  rep = json.loads((tmp_path / 'toynet' / out / 'analysis.json').read_text())
  types = {r['layer']: r['type'] for r in rep['layers']}
  assert types['stem_conv'] == 'Conv' and types['head'] == 'Linear', types
  assert types['block.0.q_linear'] == 'Linear' and 'block.0.attn_lif' in rep['neurons']
