"""Starting a run from trained weights: `config.init_from`, `config.init_skip`.

As big_vision's `model_init` / `model_load.dont_load` and MaxText's
`load_parameters_path`: only the initial parameters and BatchNorm statistics
come from the source (and the EMA starts from them); the optimizer and the
step start fresh. A run that resumes from its own checkpoint ignores it.

`init_from` is one of
* a workdir of ours (its latest checkpoint), its `checkpoints/` directory or
  one step directory `checkpoints/N`;
* an official PyTorch checkpoint `.pth` / `.pth.tar` / `.pt` (needs torch),
  or an `.npz` of a state_dict (name -> array), converted by `convert`;
* any of these in Cloud Storage (`gs://BUCKET/...`);
* `none` (NONE): no weights, on purpose. A config with `init_required`
  (Spikformer's Table 7 fine-tuning rows) refuses to start with init_from
  unset; `none` trains it from scratch (`./none` names a directory `none`).

`init_skip`: regular expressions (`re.search`) over our names such as
`params/head/kernel` or `batch_stats/patch_embed/proj_bn/mean`; those keep
their fresh initialisation (the head, when the number of classes changes).
Everything else must be in the source with the same shape (an official
array: in PyTorch's layout, see `convert`) and finite values, or the run stops
with one message naming what is not, before anything is written.
"""

from __future__ import annotations

import os
import re
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from spikeformer_jax import checkpointing
from spikeformer_jax import convert
from spikeformer_jax import errors
from spikeformer_jax import storage

TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.npz')
NONE = 'none'  # init_from=none: start from scratch, said explicitly


def requested(config) -> bool:
  """Whether `config.init_from` names weights to start from ('' and 'none' do not)."""
  return config.get('init_from', '') not in ('', NONE)


def _step_dir(path: str) -> str:
  """The checkpoint step directory a workdir / checkpoints dir / step dir means."""
  if storage.isdir(storage.join(path, 'state')):
    return path
  ckpts = storage.join(path, 'checkpoints')
  ckpts = ckpts if storage.isdir(ckpts) else path
  steps = [
    n
    for n in checkpointing.committed_steps(ckpts)
    if storage.isdir(storage.join(ckpts, str(n), 'state'))
  ]
  if not steps:
    raise errors.UserError(
      f'init_from={path} holds no checkpoint of ours (no checkpoints/<step>/state); give a '
      f'workdir, a checkpoint directory, or a PyTorch file ({", ".join(TORCH_SUFFIXES)}).'
    )
  return storage.join(ckpts, str(max(steps)))


def check_source(path: str):
  """One line if `init_from` cannot be a source (before the workdir is touched)."""
  storage.check(path, 'init_from')
  if not storage.exists(path):
    raise errors.UserError(f'init_from={path} does not exist.')
  if storage.isdir(path):
    _step_dir(path)
  elif not path.endswith(TORCH_SUFFIXES):
    raise errors.UserError(
      f'init_from={path} is neither a directory of ours nor a PyTorch / numpy state_dict '
      f'file ({", ".join(TORCH_SUFFIXES)}).'
    )


def _read_ours(path: str) -> dict[str, np.ndarray]:
  """{'params/...': array, 'batch_stats/...': array} of a checkpoint of ours;
  its run may still be training and deleting old steps meanwhile."""
  step_dir = _step_dir(path)
  directory, name = storage.dirname(step_dir), storage.basename(step_dir)

  def read(root, step):
    where = storage.join(root, str(step), 'state')
    where = storage.epath(where) if storage.is_remote(where) else where
    try:
      ckptr = ocp.StandardCheckpointer()
      md = ckptr.metadata(where)
      tree = getattr(getattr(md, 'item_metadata', md), 'tree', md)
      device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
      abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree
      )
      return ckptr.restore(where, abstract)
    except Exception as e:  # pylint: disable=broad-except  # damaged, truncated, not orbax
      raise errors.UserError(
        f'init_from: the checkpoint {storage.join(root, str(step))} is '
        f'unreadable ({checkpointing.reason(e)}).'
      ) from e

  if not name.isdigit():  # a step directory copied under another name: no run writes it
    state = read(directory, name)
  else:  # the newest step, unless init_from names one
    named = storage.isdir(storage.join(path, 'state'))
    state = checkpointing.read_committed(
      directory, read, step=int(name) if named else None, workdir=storage.dirname(directory)
    )
  return {
    k: np.asarray(v)
    for k, v in checkpointing.flatten(state).items()
    if k.startswith(('params/', 'batch_stats/'))
  }


def _read_torch(path: str, model: nnx.Module):
  """An official state_dict converted to our names and layouts, the
  state_dict keys our model has no place for, and {our name: why} for each
  array not in its official layout (another shape, if not another size:
  fc1's [in, out] for PyTorch's [out, in])."""
  if storage.is_remote(path):  # the readers take local files: a local copy
    with tempfile.TemporaryDirectory(prefix='spikeformer-init-') as tmp:
      local = os.path.join(tmp, storage.basename(path))
      with open(local, 'wb') as f:
        f.write(storage.read_bytes(path))
      return _read_torch(local, model)
  try:
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as d:
        state_dict = {k: d[k] for k in d.files}
    else:
      state_dict = convert.load_torch_file(path)
  except ImportError as e:
    raise errors.UserError(errors.one_line(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f'init_from: {path} is unreadable ({checkpointing.reason(e)}).') from e
  state_dict = {k.removeprefix('module.'): np.asarray(v) for k, v in state_dict.items()}
  entries, _, unexpected, _ = convert.match(model, {k: v.shape for k, v in state_dict.items()})
  kinds = {
    path: 'params' if isinstance(var, nnx.Param) else 'batch_stats'
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  }
  out, misfits = {}, {}
  for entry in entries:
    name = kinds[entry.path] + '/' + '/'.join(map(str, entry.path))
    want = convert.official_shapes(entry.path, entry.our_shape)
    if entry.torch_shape in want:
      out[name] = entry.to_ours(state_dict[entry.torch_key])
    else:
      shown = next((w for w in want if len(w) == len(entry.torch_shape)), want[0])
      misfits[name] = f'{name} ({entry.torch_key} is {entry.torch_shape}, officially {shown})'
  return out, unexpected, misfits


def _names(items: list[str], limit: int = 30) -> str:
  return ', '.join(items[:limit]) + (f' (+{len(items) - limit} more)' if len(items) > limit else '')


def load(config, model: nnx.Module) -> tuple[dict[str, np.ndarray], list[str]]:
  """The arrays to start from: {name: array} for every parameter and
  BatchNorm statistic of `model` (config.model, built abstractly) that
  `init_skip` does not keep, plus lines to log.

  Raises UserError listing every entry missing from the source, of another
  shape (an official array: of another layout) or holding values no weight
  can have (integers, NaN), with the init_skip that would keep it fresh."""
  path = config.init_from
  path = storage.abspath(path if storage.is_remote(path) else os.path.expanduser(path))
  check_source(path)
  patterns = config.get('init_skip', ())
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  try:
    skip = [re.compile(p) for p in patterns]
  except re.error as e:
    raise errors.UserError(
      f'init_skip={patterns!r}: {e.pattern!r} is not a regular expression ({e}).'
    ) from e
  if storage.isdir(path):
    source, unused_keys, misfits = _read_ours(path), [], {}
  else:
    source, unused_keys, misfits = _read_torch(path, model)
  ours = checkpointing.flatten(
    {'params': nnx.state(model, nnx.Param), 'batch_stats': nnx.state(model, nnx.BatchStat)}
  )
  take, kept, missing, bad = {}, [], [], []
  for name, leaf in ours.items():
    if any(p.search(name) for p in skip):
      kept.append(name)
    elif name in misfits:
      bad.append(misfits[name])
    elif name not in source:
      missing.append(name)
    elif tuple(source[name].shape) != tuple(leaf.shape):
      bad.append(f'{name} {tuple(source[name].shape)} vs ours {tuple(leaf.shape)}')
    else:
      take[name] = source[name]
  values = convert.value_problems(take, {n: ours[n].dtype for n in take})
  if missing or bad or values:
    heads = sorted({n.split('/')[1] for n in missing + [b.split(' ')[0] for b in bad + values]})
    raise errors.UserError(
      f'init_from={config.init_from} does not fit this model: '
      + '; '.join(
        filter(
          None,
          [
            f'{len(bad)} of another shape ({_names(bad)})' if bad else '',
            f'{len(missing)} missing ({_names(missing, 6)})' if missing else '',
            f'{len(values)} of unusable values ({_names(values)})' if values else '',
          ],
        )
      )
      + f'. Leave them at their initialisation with --config.init_skip="{tuple(heads)}" '
      '(regular expressions over these names), or fix the config'
      + (' or the source' if bad or values else '')
      + '.'
    )
  unused = sorted(set(source) - set(ours)) + unused_keys
  notes = [
    f'Initialised {len(take)} of {len(ours)} arrays from {path}'
    + (f'; kept fresh (init_skip): {", ".join(kept)}' if kept else '')
    + (
      f'; not used from the source: {", ".join(unused[:8])}{" ..." if len(unused) > 8 else ""}'
      if unused
      else ''
    )
    + '.'
  ]
  return take, notes


def apply(state: dict, take: dict[str, np.ndarray]) -> dict:
  """The train state with `take`'s arrays in place of its fresh ones (on the
  same shardings and dtypes); the EMA starts from them too."""

  def put(prefix, tree):
    flat = checkpointing.flatten(tree, prefix)
    leaves = [
      jax.device_put(np.asarray(take[n], leaf.dtype), leaf.sharding) if n in take else leaf
      for n, leaf in flat.items()
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)

  new = dict(
    state,
    params=put('params', state['params']),
    batch_stats=put('batch_stats', state['batch_stats']),
  )
  if 'ema' in state:
    new['ema'] = {
      'params': put('params', state['ema']['params']),
      'batch_stats': put('batch_stats', state['ema']['batch_stats']),
    }
  return new
