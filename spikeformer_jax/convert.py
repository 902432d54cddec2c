"""Official PyTorch state_dicts <-> our NNX parameters and BatchNorm statistics.

The mapping is derived from module paths, not written per model: our module
attributes carry the official names (`block.0.attn.q_bn`), so a PyTorch key is
our path joined by dots plus a leaf name. Kernel-1 convolutions of the
official code (`q_conv`, Conv1d/Conv2d with a 1x1 kernel) are our token-wise
Linear layers (`q_linear`); the two suffixes are interchangeable. Works for
any size, depth or class count.

Every array must have the official layout of its parameter, not merely as
many elements: a Linear's weight is [out, in] (a kernel-1 convolution's
[out, in, 1] or [out, in, 1, 1]), a Conv2d's [out, in, kh, kw]. Floats must be
finite and floating point, BatchNorm's num_batches_tracked an integer. What a
shape cannot tell is not caught: a square matrix given transposed, or a square
kernel with kh and kw swapped.

    model = build_model(cfg)
    load_state_dict(model, torch_state_dict)        # dict of numpy arrays
    load_state_dict(model, load_torch_file('x.pth'))  # needs torch installed

As a command, an official checkpoint becomes a workdir of ours (step 0: the
weights, a fresh optimizer) that `eval.py --workdir=DIR` evaluates, `train.py
--workdir=DIR` trains on and `--config.init_from=DIR` starts from:

    python -m spikeformer_jax.convert --config=configs/sdt.py:imagenet-8-512 \
        --torch=8_512.pth --out=DIR [--config.x=y]
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
from flax import nnx

from spikeformer_jax import errors
from spikeformer_jax import extras
from spikeformer_jax import storage

# Our leaf name -> PyTorch leaf name, per variable type.
_LEAF_NAMES = {
  'kernel': 'weight',
  'scale': 'weight',
  'bias': 'bias',
  'mean': 'running_mean',
  'var': 'running_var',
  'count': 'num_batches_tracked',
}
_ALIASES = (('_linear', '_conv'), ('_conv', '_linear'))


def _kind(path: tuple, ndim: int) -> str:
  """How our variable's layout differs from PyTorch's: 'linear' ([in, out]
  against [out, in]), 'conv2d' (HWIO against OIHW), 'conv1d' (KIO against
  OIK), or 'same' (biases, BatchNorm, bare parameters such as pos_embed)."""
  if str(path[-1]) != 'kernel':
    return 'same'
  return {2: 'linear', 3: 'conv1d', 4: 'conv2d'}.get(ndim, 'same')


def official_shapes(path: tuple, shape: tuple) -> tuple[tuple, ...]:
  """The shapes the official array of our variable `path` (of `shape`) may
  have: a kernel-1 Conv1d / Conv2d stands for a Linear."""
  kind = _kind(path, len(shape))
  if kind == 'linear':
    i, o = shape
    return ((o, i), (o, i, 1), (o, i, 1, 1))
  if kind == 'conv1d':
    k, i, o = shape
    return ((o, i, k),)
  if kind == 'conv2d':
    h, w, i, o = shape
    return ((o, i, h, w),)
  return (tuple(shape),)


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple  # our state path
  torch_key: str
  our_shape: tuple
  torch_shape: tuple

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    w, kind = np.asarray(w), _kind(self.path, len(self.our_shape))
    if kind == 'linear':
      w = w.reshape(w.shape[0], w.shape[1]).T
    elif kind == 'conv2d':  # OIHW -> HWIO
      w = w.transpose(2, 3, 1, 0)
    elif kind == 'conv1d':  # OIK -> KIO
      w = w.transpose(2, 1, 0)
    return w.reshape(self.our_shape)

  def to_torch(self, w: np.ndarray) -> np.ndarray:
    w, kind = np.asarray(w), _kind(self.path, len(self.our_shape))
    if kind == 'linear':
      w = w.T
    elif kind == 'conv2d':
      w = w.transpose(3, 2, 0, 1)
    elif kind == 'conv1d':
      w = w.transpose(2, 1, 0)
    return w.reshape(self.torch_shape)


def value_problems(arrays: dict, dtypes: dict) -> list[str]:
  """Names each array of `arrays` (name -> array) that cannot hold the values
  of a variable of dtype `dtypes[name]`: integers or booleans where the model
  holds floats (or the reverse), NaN or infinities, also after the cast to
  the model's dtype (1e39 is no float32)."""
  import jax  # pylint: disable=import-outside-toplevel

  out = []
  for name, w in arrays.items():
    w, want = np.asarray(w), np.dtype(dtypes[name])
    floating = jax.dtypes.issubdtype(want, np.floating)
    if floating != jax.dtypes.issubdtype(w.dtype, np.floating) or (
      not floating and not np.issubdtype(w.dtype, np.integer)
    ):
      out.append(f'{name} holds {w.dtype}, not {"floats" if floating else "integers"}')
    elif floating:
      with np.errstate(over='ignore', invalid='ignore'):
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(w.astype(want))))
      if bad:
        out.append(
          f'{name} has {bad} of {w.size} values NaN or infinite'
          + (f' (as {want})' if np.isfinite(w).all() else '')
        )
  return out


def _candidates(path: tuple) -> list[str]:
  *mods, leaf = [str(p) for p in path]
  if not mods:  # a bare parameter such as pos_embed
    return [leaf]
  tleaf = _LEAF_NAMES.get(leaf, leaf)
  names = ['.'.join(mods)]
  for a, b in _ALIASES:
    if mods[-1].endswith(a):
      names.append('.'.join(mods[:-1] + [mods[-1][: -len(a)] + b]))
  return [f'{n}.{tleaf}' for n in names]


def match(model: nnx.Module, torch_shapes: dict[str, tuple]):
  """(entries, missing, unexpected, bad_shape): each of our parameters / BN
  statistics paired with a PyTorch key where one exists, what is not."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  entries, missing, bad_shape = [], [], []
  used = set()
  for path, var in flat:
    shape = tuple(var.get_value().shape)
    key = next((k for k in _candidates(path) if k in torch_shapes), None)
    if key is None:
      missing.append('.'.join(map(str, path)) + f' (tried {_candidates(path)})')
      continue
    tshape, want = tuple(torch_shapes[key]), official_shapes(path, shape)
    if tshape not in want:  # the layout, not the size: [in, out] is no [out, in]
      shown = next((w for w in want if len(w) == len(tshape)), want[0])
      bad_shape.append(f'{key} is {tshape}, the official layout {shown} (ours {shape})')
    used.add(key)
    entries.append(Entry(path, key, shape, tshape))
  return entries, missing, sorted(set(torch_shapes) - used), bad_shape


def _raise_if(missing, unexpected, bad_shape, values=()):
  problems = []
  if missing:
    problems.append('not in the state_dict: ' + '; '.join(missing))
  if unexpected:
    problems.append('state_dict keys the model does not have: ' + ', '.join(unexpected))
  if bad_shape:
    problems.append('shape mismatch: ' + '; '.join(bad_shape))
  if values:  # not the configuration: the file
    problems.append(
      'values no weight can have (a damaged file, or a diverged run?): ' + '; '.join(values)
    )
  if problems:
    raise errors.DataError(
      (
        'The PyTorch state_dict does not fit this model configuration (check '
        'embed_dim, depth, num_heads, num_classes, flavour and dead_modules):'
        if len(problems) > bool(values)
        else 'The PyTorch state_dict cannot be loaded:'
      )
      + '\n  '
      + '\n  '.join(problems)
    )


def mapping(model: nnx.Module, torch_shapes: dict[str, tuple]) -> list[Entry]:
  """Pairs each of our parameters / BN statistics with a PyTorch key.

  Raises ValueError naming every key that is missing, unexpected or not of
  its official shape, so a wrong architecture fails with one clear message.
  """
  entries, missing, unexpected, bad_shape = match(model, torch_shapes)
  _raise_if(missing, unexpected, bad_shape)
  return entries


def load_state_dict(model: nnx.Module, state_dict: dict) -> list[Entry]:
  """Copies an official state_dict (name -> array) into `model`, in place;
  ValueError naming every array that does not fit (`mapping`) or holds values
  no weight can have (`value_problems`), before anything is copied."""
  state_dict = {k.removeprefix('module.'): np.asarray(v) for k, v in state_dict.items()}
  entries, missing, unexpected, bad_shape = match(
    model, {k: v.shape for k, v in state_dict.items()}
  )
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  flat = dict(nnx.to_flat_state(state))
  fit = [e for e in entries if e.torch_shape in official_shapes(e.path, e.our_shape)]
  _raise_if(
    missing,
    unexpected,
    bad_shape,
    value_problems(
      {e.torch_key: state_dict[e.torch_key] for e in fit},
      {e.torch_key: flat[e.path].get_value().dtype for e in fit},
    ),
  )
  for e in entries:
    var = flat[e.path]
    var.set_value(np.asarray(e.to_ours(state_dict[e.torch_key]), dtype=var.get_value().dtype))
  nnx.update(model, state)
  return entries


def to_torch_layout(entries: list[Entry], flat_arrays: dict) -> dict[str, np.ndarray]:
  """Our arrays (path -> array, e.g. gradients) -> PyTorch names and layouts."""
  return {
    e.torch_key: e.to_torch(np.asarray(flat_arrays[e.path]))
    for e in entries
    if e.path in flat_arrays
  }


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads a `.pth` / `.pth.tar` checkpoint into a dict of numpy arrays.

  Accepts a bare state_dict or a training checkpoint holding one under
  'state_dict', 'model' or 'state_dict_ema'. Needs PyTorch (the `[torch]` extra);
  without it, pass a dict of numpy arrays (or an .npz) to load_state_dict.
  """
  torch = extras.require('torch', extra='torch', package='torch', needed_for=f'reading {path}')
  if storage.is_remote(path):  # torch.load reads a file object: the bytes, downloaded once
    import io  # pylint: disable=import-outside-toplevel

    obj = torch.load(io.BytesIO(storage.read_bytes(path)), map_location='cpu', weights_only=False)
  else:
    obj = torch.load(path, map_location='cpu', weights_only=False)
  if isinstance(obj, dict):
    for key in ('state_dict', 'model', 'state_dict_ema'):
      if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
        break
  return {
    k: v.detach().cpu().numpy() if hasattr(v, 'detach') else np.asarray(v) for k, v in obj.items()
  }


def _refuse_out(out: str, holding: bool = False):
  """One line if `out` cannot become a new workdir: it is a file, a live run
  holds it, or it holds anything but a stale lock (a run, a converted one,
  other files). Converting never writes into an existing directory's files."""
  from spikeformer_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  if storage.exists(out) and not storage.isdir(out):
    raise errors.UserError(f'--out={out} is a file; give a new directory.')
  if not storage.isdir(out):
    return
  who = None if holding else workdir_lib.holder(out)
  if who:
    raise errors.UserError(
      f'--out={out} is in use by {workdir_lib.describe(who)}; give a new directory.'
    )
  lock = workdir_lib.LOCK_NAME
  entries = sorted(n for n in storage.listdir(out) if n != lock and not n.startswith(lock + '.'))
  if 'config.json' in entries or 'checkpoints' in entries:
    raise errors.UserError(
      f'--out={out} already holds a run (its config.json or checkpoints/); '
      'give a new directory, or delete that one to convert into it again.'
    )
  if entries:
    raise errors.UserError(
      f'--out={out} is not empty (it holds {", ".join(entries[:4])}'
      f'{f" and {len(entries) - 4} more" if len(entries) > 4 else ""}); convert writes a new '
      'workdir: give a new or empty directory.'
    )


def write_workdir(config, torch_file: str, out: str) -> str:
  """`torch_file` (.pth / .pth.tar / .pt, or an .npz state_dict) converted for
  `config.model` into a new workdir `out` (absent or empty): config.json and
  checkpoint 0 (the weights; the optimizer fresh), written while holding the
  workdir's lock, as a training does; removed again if writing fails. Every
  parameter must be in the file in its official layout. Returns the
  checkpoint directory."""
  import os  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import checkpointing, pretrained  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import experiment, sharding, train_lib, validation  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  if not out:  # before reading the checkpoint, which may take minutes
    raise errors.UserError('--out is empty: give a new directory for the converted workdir.')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init_from, config.init_skip = storage.abspath(torch_file), ()
  validation.validate_config(config)
  _refuse_out(out)
  take, notes = train_lib.initial_weights(config, out)  # before anything is written
  created = not storage.exists(out)
  workdir_lib.ensure(out, '--out')
  ckpts, config_json = storage.join(out, 'checkpoints'), storage.join(out, 'config.json')
  try:
    with workdir_lib.WorkdirLock(out, command=' '.join(sys.argv)):
      _refuse_out(out, holding=True)  # a run may have started there since the first look
      exp = experiment.build(config, sharding.make_mesh(1), steps_per_epoch=1)
      state = pretrained.apply(exp.init_state(), take)
      try:
        workdir_lib.write_json(
          config_json,
          {
            'config': config.to_dict(),
            'run': {'converted_from': storage.abspath(torch_file), 'num_params': exp.num_params},
          },
        )
        ckpt = checkpointing.Checkpointer(ckpts)
        ckpt.save(0, state, {'step': 0, 'converted_from': storage.abspath(torch_file)}, force=True)
        ckpt.close()
      except BaseException:  # half a converted workdir would pass for a run: remove it
        storage.rmtree(ckpts, ignore_errors=True)
        if storage.exists(config_json):
          storage.remove(config_json)
        raise
  except BaseException:
    if created and not storage.is_remote(out):  # on a store a directory is only a prefix
      try:
        os.rmdir(out)  # only if empty: nothing of another process is removed
      except OSError:
        pass
    raise
  print(notes[0].replace('Initialised', 'Converted').rstrip('.') + f' -> {ckpts}/0.')
  return storage.join(ckpts, '0')


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import checkpointing  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO, as in eval.py
    logging.set_verbosity(logging.WARNING)
    checkpointing.quiet_orbax_logs()
  assert _TORCH.value is not None and _OUT.value is not None  # required flags: absl checked
  storage.check(_TORCH.value, '--torch')  # s3:// and the like: one line, before reading
  storage.check(_OUT.value, '--out')
  write_workdir(_CONFIG.value, _TORCH.value, _OUT.value)  # errors: errors.report (cli.run)
  return 0


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  from spikeformer_jax import cli  # pylint: disable=g-import-not-at-top

  _CONFIG = cli.define_config_file('config', None, 'Config of the model (path.py:VARIANT).')
  _TORCH = flags.DEFINE_string(
    'torch', None, 'Official checkpoint (.pth, .pth.tar, .pt) or .npz state_dict.'
  )
  _OUT = flags.DEFINE_string('out', None, 'New workdir to write.')
  flags.mark_flags_as_required(['config', 'torch', 'out'])
  cli.run(main)
