"""Recordings of the official PyTorch code: reading them, and our model
holding their variables. Shared by the one-step check (fidelity.py) and the
training-trajectory replay (replay.py); formats in shared/fixtures/README.md
and shared/fixtures/trajectory/README.md."""

from __future__ import annotations

import json
import os
import zipfile

import jax
import numpy as np
from flax import nnx

from spikeformer_jax import convert
from spikeformer_jax import errors
from spikeformer_jax import models


class BadRecording(errors.DataError):
  """A file that is not a readable recording (the message says why)."""


# Entries every recording of a kind has.
_REQUIRED = {
  'one-step': ('config', 'input', 'labels', 'logits_eval', 'logits_train', 'loss'),
  'trajectory': ('config', 'batch/0/input', 'batch/0/labels', 'loss/0', 'lr/0'),
}


def error_kind(e: BaseException) -> str:
  """'zlib.error' rather than a bare 'error'."""
  t = type(e)
  return t.__name__ if t.__module__ == 'builtins' else f'{t.__module__}.{t.__name__}'


def kind_of(arrays: dict) -> str:
  """'trajectory' (a recorded training run) or 'one-step' (one forward / backward)."""
  return 'trajectory' if any(k.startswith('batch/') for k in arrays) else 'one-step'


def read_recording(path: str) -> tuple[dict, dict]:
  """All arrays of a recording and its config; BadRecording if unreadable.

  Reads every array now, so a damaged member is reported as the file's
  problem here rather than as a failure halfway through the check.
  """
  if not os.path.isfile(path):
    raise BadRecording('no such file.')
  size = os.path.getsize(path)
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(4)
    if not size:
      raise BadRecording('empty file.')
    if head == b'PK\x03\x04':  # a zip without its directory: cut short
      raise BadRecording(f'truncated ({size} bytes, the zip directory at its end is missing).')
    raise BadRecording(f'not an .npz file (starts with {head!r}, not a zip header).')
  arrays, key = {}, None
  try:
    with np.load(path, allow_pickle=False) as d:
      for key in d.files:
        arrays[key] = d[key]
  except Exception as e:  # pylint: disable=broad-except  # zlib, CRC, EOF, bad header
    where = f'entry {key!r}' if key else 'the archive'
    raise BadRecording(
      f'damaged: {where} cannot be read ({error_kind(e)}: {errors.one_line(e)}).'
    ) from e
  missing = [k for k in _REQUIRED[kind_of(arrays)] if k not in arrays]
  if missing or not any(k.startswith('state/') for k in arrays):
    raise BadRecording(
      f'not a fidelity recording: no {", ".join(missing) or "state/*"} entries '
      '(formats: shared/fixtures/README.md, shared/fixtures/trajectory/README.md).'
    )
  try:
    cfg = json.loads(str(arrays['config']))
  except json.JSONDecodeError as e:
    raise BadRecording(f"its 'config' is not JSON ({e}).") from e
  return arrays, cfg


def model_config_from_fixture(cfg: dict):
  """Our `config.model` for the architecture a fixture was recorded from
  (each family maps its official source files: Family.from_fixture)."""
  family = cfg.get('family')
  from_fixture = models.get(family).from_fixture if family in models.names() else None
  if from_fixture is None:
    raise NotImplementedError(
      f"fixture family {family!r} is not implemented in this version; supported: "
      f"{', '.join(repr(n) for n in models.names() if models.get(n).from_fixture)}."
    )
  return from_fixture(cfg)


def to_nhwc(x: np.ndarray) -> np.ndarray:
  if x.ndim == 4:  # [B, C, H, W]
    return x.transpose(0, 2, 3, 1)
  if x.ndim == 5:  # [B, T, C, H, W]
    return x.transpose(0, 1, 3, 4, 2)
  raise errors.DataError(f'fixture input of rank {x.ndim}; expected 4 or 5.')


def rel_error(a, b, scale) -> float:
  """max |a - b| / scale (0 for empty arrays)."""
  return (
    float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) / scale)
    if np.size(b)
    else 0.0
  )


def state_dict(arrays: dict, prefix: str = 'state/') -> dict:
  """{torch name: array} of the entries under `prefix`."""
  return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def model_holding(mc, state: dict):
  """Our model holding a recording's variables. Built from shapes alone, since
  the recording sets every variable (a float64 random initialisation, op by
  op, took a quarter of the whole check); initialised for real only when the
  recording leaves some variable unset."""
  model = nnx.eval_shape(lambda: models.build_model(mc))
  entries = convert.load_state_dict(model, state)
  if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(nnx.state(model))):
    model = models.build_model(mc)
    entries = convert.load_state_dict(model, state)
  return model, entries
