"""Metrics as JSON lines (process 0 only) plus readable progress lines."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import jax


def is_main() -> bool:
  return jax.process_index() == 0


def _step(line: str) -> float:
  """The step of a metrics line; inf (dropped on resume) for a blank line or
  one that a killed process left half-written."""
  try:
    return json.loads(line)['step']
  except (json.JSONDecodeError, KeyError, TypeError):
    return float('inf')


class MetricWriter:
  """Appends {'step': s, **metrics} lines to `workdir/metrics.jsonl`.

  A run resumed at `resume_step` first drops the lines of later steps (written
  before the interruption, after the checkpoint), so every step appears once.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._f = None
    if not is_main():
      return
    if os.path.exists(self.path):
      with open(self.path, encoding='utf-8') as f:
        keep = [l for l in f if _step(l) <= resume_step]
      with open(self.path + '.tmp', 'w', encoding='utf-8') as f:
        f.writelines(keep)
      os.replace(self.path + '.tmp', self.path)
    self._f = open(self.path, 'a', encoding='utf-8')

  def write(self, step: int, **metrics):
    if self._f is None:
      return
    row = {'step': int(step), 'time': round(time.time(), 3)}
    row.update({k: _py(v) for k, v in metrics.items()})
    self._f.write(json.dumps(row) + '\n')
    self._f.flush()

  def close(self):
    if self._f is not None:
      self._f.close()


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
