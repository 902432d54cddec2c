"""Metrics as JSON lines (process 0 only), the same scalars for TensorBoard,
plus readable progress lines.

A local workdir gets every line appended and flushed at once. An object store
cannot append (gcsfs's open('a') overwrites), so a `gs://` run keeps its lines
in memory and writes metrics.jsonl whole (one PUT) at `sync()`: before every
checkpoint save, after every evaluation, at most UPLOAD_EVERY_S after a line,
and at close. A checkpoint therefore never holds a step whose lines are not
in the store, and resume drops the later ones as it does locally. TensorBoard
writes its events to a local temporary directory there and uploads them at
the same points (tensorboardX would re-upload the whole event file at every
flush); the upload at close is bounded by CLOSE_UPLOAD_S so that a store that
went away cannot hang the exit.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time

import jax

from spikeformer_jax import errors
from spikeformer_jax import storage

UPLOAD_EVERY_S = 60.0  # a store: metric lines uploaded at least this often
CLOSE_UPLOAD_S = 60.0  # a store: the most the last upload may take at close


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
    rerun = storage.isdir(directory) and any(
      n.startswith('events.out.tfevents.') for n in storage.listdir(directory)
    )
    # A store: events go to a local directory first, uploaded by `upload` (a
    # new event file beside the old ones there: the purge step still applies).
    self.remote = directory if storage.is_remote(directory) else None
    self._local = tempfile.mkdtemp(prefix='spikeformer-tb-') if self.remote else directory
    self._sizes: dict[str, int] = {}
    self._w = SummaryWriter(self._local, purge_step=resume_step + 1 if rerun else None)

  def upload(self):
    """A store: the event files that grew since the last upload."""
    if self.remote:
      self._sizes = storage.put_tree(self._local, self.remote, self._sizes)

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
    if not self.remote:
      return
    # Bounded: a store that went away must not hang the exit (the events stay local).
    failed: list[BaseException] = []

    def last_upload():
      try:
        self.upload()
      except BaseException as e:  # pylint: disable=broad-except  # reported below
        failed.append(e)

    t = threading.Thread(target=last_upload, daemon=True, name='tensorboard-upload')
    t.start()
    t.join(CLOSE_UPLOAD_S)
    if t.is_alive() or failed:
      why = errors.one_line(failed[0]) if failed else f'not done in {CLOSE_UPLOAD_S:.0f} s'
      log(
        f'tensorboard: uploading to {self.remote} failed ({why}); the events are in {self._local}.'
      )
    else:
      shutil.rmtree(self._local, ignore_errors=True)


class MetricWriter:
  """Appends {'step': s, **metrics} lines to `workdir/metrics.jsonl` and,
  with `tensorboard`, the same scalars to `workdir/tb`.

  A run resumed at `resume_step` first drops the lines of later steps (written
  before the interruption, after the checkpoint), so every step appears once;
  with `redo_eval` (the evaluation at `resume_step` runs again) also the test
  lines of that step.

  In a store (`gs://`) the lines are uploaded whole at `sync()` (see the
  module's docstring); locally `sync()` does nothing, every line is flushed.
  """

  def __init__(
    self, workdir: str, resume_step: int = 0, redo_eval: bool = False, tensorboard: bool = False
  ):
    self.path = storage.join(workdir, 'metrics.jsonl')
    self._f = None
    self._tb = None
    self._lines: list[str] | None = None  # a store: the whole file, written at sync()
    self._unsynced = False
    self._synced_at = time.monotonic()
    if not is_main():
      return
    if tensorboard:
      try:
        self._tb = TensorBoard(storage.join(workdir, 'tb'), resume_step)
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

    if storage.is_remote(workdir):
      try:
        text = storage.read_text(self.path, 'replace') if storage.exists(self.path) else ''
        lines = io.StringIO(text, newline=None)  # as a local file's lines
        self._lines = [line for line in lines if keep(_row(line)) and '\ufffd' not in line]
        self._unsynced = bool(text)
        self.sync()  # the dropped lines go now, as a local file's rewrite
      except storage.errors_of_the_store() as e:
        self._fail(e)
      return
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

  def _fail(self, e: BaseException):
    raise errors.UserError(
      f'cannot write {self.path}: {_why(e)}; free the space or fix '
      'the directory, then rerun the same command.'
    ) from e

  def sync(self):
    """A store: writes metrics.jsonl whole and uploads the TensorBoard events
    (before a checkpoint is saved, after an evaluation, at close). Locally
    nothing: every line is already flushed."""
    if self._lines is None:
      return
    try:
      if self._unsynced:
        storage.write_text(self.path, ''.join(self._lines))
      self._unsynced, self._synced_at = False, time.monotonic()
      if self._tb is not None:
        self._tb.upload()
    except storage.errors_of_the_store() as e:
      self._fail(e)

  def write(self, step: int, **metrics):
    row = {'step': int(step), 'time': round(time.time(), 3)}
    row.update({k: _py(v) for k, v in metrics.items()})
    if self._lines is not None:
      self._lines.append(json.dumps(row) + '\n')
      self._unsynced = True
      if self._tb is not None:
        try:
          self._tb.scalars(step, {k: v for k, v in row.items() if k not in ('step', 'time')})
        except OSError as e:
          self._fail(e)
      if time.monotonic() - self._synced_at > UPLOAD_EVERY_S:
        self.sync()
      return
    if self._f is None:
      return
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
    if self._lines is not None:  # the events: tb.close() below, bounded
      try:
        if self._unsynced:
          storage.write_text(self.path, ''.join(self._lines))
      except (
        storage.errors_of_the_store()
      ) as e:  # close also runs while another error stops the run
        print(f'error: cannot write {self.path}: {errors.one_line(e)}', file=sys.stderr, flush=True)
      self._lines = None
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


def _why(e: BaseException):
  return (e.strerror or e) if isinstance(e, OSError) else errors.one_line(e)


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
