"""No private JAX, orbax or tensorboardX APIs: the package reaches JAX only
through its public modules, the weight-decay mask walks the traced forward
itself, and the two private attributes once read have public paths."""

import ast
import pathlib
import struct

import jax
import jax.numpy as jnp
import pytest

from spikeformer_jax import checkpointing, config_lib, errors, experiment, metrics, models

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'spikeformer_jax'
# Private attributes the package once used, now reached through public calls.
PRIVATE_ATTRIBUTES = ('_finalize_thread', '_get_file_writer', 'dce_jaxpr', 'wait_at_barrier')


def _private_imports(source: str) -> list[str]:
  """`import jax._src...`, `from jax._src... import`, `from jax import _src`."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.startswith('jax._src')]
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.startswith('jax._src'):
        found.append(node.module)
      elif node.module == 'jax' and any(a.name == '_src' for a in node.names):
        found.append('jax._src')
    elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
      found.append(node.attr)
    elif isinstance(node, ast.Attribute) and node.attr == '_src':  # jax._src.x without import
      if isinstance(node.value, ast.Name) and node.value.id == 'jax':
        found.append('jax._src')
  return found


def test_the_check_sees_every_spelling():
  for bad in (
    'import jax._src.distributed',
    'from jax._src.interpreters import partial_eval',
    'from jax import _src',
    'import jax\nx = jax._src.core',
    'y = mngr._finalize_thread.get()',
  ):
    assert _private_imports(bad), bad
  assert not _private_imports('import jax\nfrom jax.extend import core\nfrom jax import numpy')


def test_no_module_of_the_package_uses_private_apis():
  files = sorted(PACKAGE.rglob('*.py'))
  assert len(files) > 30, files
  bad = {
    str(f.relative_to(PACKAGE)): hits
    for f in files
    if (hits := _private_imports(f.read_text(encoding='utf-8')))
  }
  assert not bad, bad


def _live(fn, *args, outs=None):
  closed = jax.make_jaxpr(fn)(*args)
  return experiment.live_inputs(closed.jaxpr, outs or [True] * len(closed.jaxpr.outvars))


def test_live_inputs_follows_what_the_outputs_read():
  one = jnp.float32(1.0)
  assert _live(lambda a, b, c: a + b, one, one, one) == [True, True, False]
  # Computed and dropped: not reached (a dead-code pass, not "appears in an eqn").
  assert _live(lambda a, b: (jnp.sin(b), a)[1], one, one) == [True, False]
  # An output that is not asked for.
  assert _live(lambda a, b: (a * 2, b * 2), one, one, outs=[True, False]) == [True, False]

  # Into calls: jit, remat.
  inner = jax.jit(lambda a, b: (a + 1, b + 1))
  assert _live(lambda a, b: inner(a, b)[0], one, one) == [True, False]
  assert _live(lambda a, b: jax.checkpoint(lambda x, y: (x * 2, y))(a, b)[0], one, one) == [
    True,
    False,
  ]

  # cond: the index and what any branch reads.
  def branches(p, a, b, c):
    return jax.lax.cond(p > 0, lambda x, y, z: x, lambda x, y, z: x + y, a, b, c)

  assert _live(branches, one, one, one, one) == [True, True, True, False]

  # scan: a carry the body hands on is live back to its initial value (a fixpoint).
  def shift(a, b, c, d, xs):
    def body(carry, x):
      u, v, w, t = carry
      return (v, w, u * 0, t + x), x * d

    return jax.lax.scan(body, (a, b, c, jnp.float32(0)), xs)[0][0]

  xs = jnp.ones(3)
  assert _live(shift, one, one, one, one, xs) == [True, True, True, False, False]

  # Custom derivatives and while loops: every input counts (what JAX's pass does).
  @jax.custom_vjp
  def first(x, y):
    return x

  first.defvjp(lambda x, y: (x, y), lambda y, g: (g * y, g))
  assert _live(lambda a, b: first(a, b), one, one) == [True, True]

  def loop(a, b):
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1]), (a, b))[0]

  assert _live(loop, one, one) == [True, True]


def test_live_inputs_stops_on_an_inner_program_it_cannot_read():
  @jax.custom_batching.custom_vmap
  def first(x, y):
    return x

  first.def_vmap(lambda size, batched, x, y: (x, batched[0]))
  with pytest.raises(NotImplementedError, match="'custom_vmap_call' primitive with an inner"):
    _live(lambda a, b: first(a, b), jnp.float32(1), jnp.float32(1))


@pytest.mark.parametrize(
  'family, variant, unreached',
  [
    (
      'spikformer',
      'cifar10dvs-2-256',
      [
        'block/0/norm1/bias',
        'block/0/norm1/scale',
        'block/0/norm2/bias',
        'block/0/norm2/scale',
        'norm/bias',
        'norm/scale',
        'pos_embed',
      ],
    ),
    (
      'spikformer',
      'cifar10-4-256',
      [f'block/0/norm{i}/{p}' for i in (1, 2) for p in ('bias', 'scale')],
    ),
    ('sdt', 'cifar10-2-256', ['block/0/attn/talking_heads/kernel']),
  ],
)
def test_dead_modules_are_exactly_the_unreached_parameters(family, variant, unreached):
  """The official code's modules built but never called (dead_modules), and
  nothing else: what JAX's own dead-code pass found before."""
  import importlib  # pylint: disable=import-outside-toplevel

  config = config_lib.runlocal(
    importlib.import_module(f'spikeformer_jax.configs.{family}').get_config(variant)
  )
  with config.model.unlocked():
    config.model.depth, config.model.dead_modules = 1, True
  reached = experiment.params_the_loss_reaches(
    models.build_model(config.model), experiment.input_shape(config)
  )
  flat = checkpointing.flatten(reached)
  assert sorted(k for k, v in flat.items() if not v) == unreached
  assert len(flat) > len(unreached) + 20


def _tags(directory: pathlib.Path) -> set:
  """Tags in the event files of `directory` (TFRecord framing, read by hand)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  tags = set()
  for path in directory.glob('events.out.tfevents.*'):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i : i + 8])
      tags |= {v.tag for v in event_pb2.Event.FromString(data[i + 12 : i + 12 + n]).summary.value}
      i += 12 + n + 4
  return tags


@pytest.mark.parametrize('file_writer', [True, False])
def test_hparams_reach_tensorboard_with_or_without_the_writers_file_writer(tmp_path, file_writer):
  tb = metrics.TensorBoard(str(tmp_path))
  own = tb._w.file_writer  # pylint: disable=protected-access
  if not file_writer:  # a tensorboardX without the attribute: a FileWriter of our own
    tb._w.file_writer = None  # pylint: disable=protected-access
  tb.hparams({'lr': 0.1, 'model': {'name': 'spikformer', 'depth': 4}})
  tb._w.file_writer = own  # pylint: disable=protected-access  (closed with the writer)
  tb.scalars(1, {'train_loss': 1.0})
  tb.close()
  files = sorted(p.name for p in tmp_path.glob('events.out.tfevents.*'))
  assert len(files) == (1 if file_writer else 2), files
  assert {'_hparams_/experiment', '_hparams_/session_start_info'} <= _tags(tmp_path)


def test_a_failed_commit_is_named_through_orbaxs_public_wait(tmp_path, monkeypatch):
  """Orbax keeps a failed commit's exception in its finalize thread; its
  public wait_until_finished raises it, and the report names it."""
  ck = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  ck.save(1, {'w': jnp.ones(3)}, {'step': 1})
  ck.wait()

  def failed():
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(ck._mngr, 'wait_until_finished', failed)  # pylint: disable=protected-access
  ck._saving = 2  # pylint: disable=protected-access  (never committed)
  with pytest.raises(errors.CheckpointError, match=r'^saving checkpoint 2 failed \(no space left'):
    ck.poll()
  ck.close(quiet=True)
