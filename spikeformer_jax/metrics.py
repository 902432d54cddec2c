"""Metrics as JSON lines (process 0 only) plus readable progress lines."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import jax

from spikeformer_jax import errors


def is_main() -> bool:
  return jax.process_index() == 0


def _row(line: str) -> dict | None:
  """A metrics line, or None for a blank line or one that a killed process
  left half-written (dropped on resume)."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  ok = isinstance(row, dict) and isinstance(row.get('step'), int)
  return row if ok else None


class MetricWriter:
  """Appends {'step': s, **metrics} lines to `workdir/metrics.jsonl`.

  A run resumed at `resume_step` first drops the lines of later steps (written
  before the interruption, after the checkpoint), so every step appears once;
  with `redo_eval` (the evaluation at `resume_step` runs again) also the test
  lines of that step.
  """

  def __init__(self, workdir: str, resume_step: int = 0, redo_eval: bool = False):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._f = None
    if not is_main():
      return

    def keep(row):
      if row is None or row['step'] > resume_step:
        return False
      return not (redo_eval and row['step'] == resume_step
                  and any(k.startswith('test_') for k in row))
    try:
      if os.path.exists(self.path):
        with open(self.path, encoding='utf-8', errors='replace') as f:  # bad bytes: dropped
          kept = [l for l in f if keep(_row(l)) and '\ufffd' not in l]
        with open(self.path + '.tmp', 'w', encoding='utf-8') as f:
          f.writelines(kept)
        os.replace(self.path + '.tmp', self.path)
      self._f = open(self.path, 'a', encoding='utf-8')
    except OSError as e:
      self._fail(e)

  def _fail(self, e: OSError):
    raise errors.UserError(f'cannot write {self.path}: {e.strerror or e}; free the space or fix '
                           'the directory, then rerun the same command.') from e

  def write(self, step: int, **metrics):
    if self._f is None:
      return
    row = {'step': int(step), 'time': round(time.time(), 3)}
    row.update({k: _py(v) for k, v in metrics.items()})
    try:
      self._f.write(json.dumps(row) + '\n')
      self._f.flush()
    except OSError as e:
      self._fail(e)

  def close(self):
    if self._f is not None:
      f, self._f = self._f, None
      try:
        f.close()
      except OSError:
        pass  # a failed flush was reported by write()


def _py(v):
  try:
    return float(v) if not isinstance(v, (str, int)) else v
  except (TypeError, ValueError):
    return str(v)


def log(msg: str):
  if is_main():
    print(msg, flush=True, file=sys.stdout)


def fmt_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))
