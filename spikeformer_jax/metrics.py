"""Metrics as JSON lines (process 0 only), the same scalars for TensorBoard,
plus readable progress lines."""

from __future__ import annotations

import datetime
import json
import math
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


def _tag(name: str) -> str:
  """'train_loss' -> 'train/loss': TensorBoard groups the charts by prefix."""
  for prefix in ('train_', 'test_'):
    if name.startswith(prefix):
      return prefix[:-1] + '/' + name[len(prefix) :]
  return name


class TensorBoard:
  """The run's scalars and its config (as hyper-parameters) in `directory`,
  written with tensorboardX: no TensorFlow. metrics.jsonl stays the record."""

  def __init__(self, directory: str, resume_step: int = 0):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    # A rerun drops the events written after its checkpoint, as the JSONL: also
    # a rerun from step 0 (killed before its first checkpoint), whose events
    # would otherwise show every step twice.
    rerun = os.path.isdir(directory) and any(
      n.startswith('events.out.tfevents.') for n in os.listdir(directory)
    )
    self._w = SummaryWriter(directory, purge_step=resume_step + 1 if rerun else None)

  def scalars(self, step: int, metrics: dict):
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        self._w.add_scalar(_tag(k), v, step)
    self._w.flush()

  def hparams(self, config: dict):
    """Every scalar config field (dotted names) on TensorBoard's HParams tab."""
    from tensorboardX.summary import hparams  # pylint: disable=import-outside-toplevel

    flat = {}

    def walk(d, prefix=''):
      for k, v in d.items():
        if isinstance(v, dict):
          walk(v, f'{prefix}{k}.')
        else:
          flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(config)
    summaries = hparams(flat, {'test/top1': None, 'test/loss': None})
    # Into the run's own event file (SummaryWriter.file_writer, public but
    # undocumented; its add_hparams would start a subdirectory). Without it, a
    # FileWriter of their own: TensorBoard reads every event file of the run.
    writer = getattr(self._w, 'file_writer', None)
    if writer is None:
      from tensorboardX import FileWriter  # pylint: disable=import-outside-toplevel

      own = FileWriter(self._w.logdir, filename_suffix='.hparams')  # never the run's name
      for summary in summaries:
        own.add_summary(summary)
      own.close()
      return
    for summary in summaries:
      writer.add_summary(summary)
    self._w.flush()

  def close(self):
    self._w.close()


class MetricWriter:
  """Appends {'step': s, **metrics} lines to `workdir/metrics.jsonl` and,
  with `tensorboard`, the same scalars to `workdir/tb`.

  A run resumed at `resume_step` first drops the lines of later steps (written
  before the interruption, after the checkpoint), so every step appears once;
  with `redo_eval` (the evaluation at `resume_step` runs again) also the test
  lines of that step.
  """

  def __init__(
    self, workdir: str, resume_step: int = 0, redo_eval: bool = False, tensorboard: bool = False
  ):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._f = None
    self._tb = None
    if not is_main():
      return
    if tensorboard:
      try:
        self._tb = TensorBoard(os.path.join(workdir, 'tb'), resume_step)
      except ImportError:
        log(
          'tensorboard: tensorboardX is not installed (pip install tensorboardX); '
          'metrics go to metrics.jsonl only.'
        )

    def keep(row):
      if row is None or row['step'] > resume_step:
        return False
      return not (
        redo_eval and row['step'] == resume_step and any(k.startswith('test_') for k in row)
      )

    try:
      if os.path.exists(self.path):
        with open(self.path, encoding='utf-8', errors='replace') as f:  # bad bytes: dropped
          kept = [line for line in f if keep(_row(line)) and '\ufffd' not in line]
        with open(self.path + '.tmp', 'w', encoding='utf-8') as f:
          f.writelines(kept)
        os.replace(self.path + '.tmp', self.path)
      self._f = open(self.path, 'a', encoding='utf-8')
    except OSError as e:
      self._fail(e)

  def _fail(self, e: OSError):
    raise errors.UserError(
      f'cannot write {self.path}: {e.strerror or e}; free the space or fix '
      'the directory, then rerun the same command.'
    ) from e

  def write(self, step: int, **metrics):
    if self._f is None:
      return
    row = {'step': int(step), 'time': round(time.time(), 3)}
    row.update({k: _py(v) for k, v in metrics.items()})
    try:
      self._f.write(json.dumps(row) + '\n')
      self._f.flush()
      if self._tb is not None:
        self._tb.scalars(step, {k: v for k, v in row.items() if k not in ('step', 'time')})
    except OSError as e:
      self._fail(e)

  def firing_rates(self, step: int, rates: dict):
    """Per-layer firing rates of an evaluation: TensorBoard only (`eval.py
    --analyze` writes the full analysis), as `firing_rate/<neuron path>`."""
    if self._tb is not None and rates:
      try:
        self._tb.scalars(step, {f'firing_rate/{k}': v for k, v in rates.items()})
      except OSError as e:
        self._fail(e)

  def hparams(self, config: dict):
    if self._tb is not None:
      try:
        self._tb.hparams(config)
      except OSError as e:
        self._fail(e)

  def close(self):
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except OSError:
        pass
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
