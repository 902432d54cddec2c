"""Stopping a training run on a signal without losing what it trained.

`StopSignals` turns SIGTERM (a preemption notice), SIGINT (Ctrl-C) and SIGHUP
(a closed terminal) into a request that the training loop honours at its next
safe point, after saving the step reached.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

import jax
from jax.experimental import multihost_utils

from spikeformer_jax import errors
from spikeformer_jax import signals


class StopSignals:
  """Notices SIGTERM (a preemption notice), SIGINT (Ctrl-C) and SIGHUP (a
  closed terminal; left ignored under nohup) so that the loop saves the step
  reached and stops: after a train step, between evaluation batches, or once
  the final checkpoint is written.

  One process: the signal reaches a watcher thread at once, even while the
  main thread compiles (signals.SignalWatcher). Armed
  (the first train step has compiled), the first signal sets a flag that the
  loop checks at its next safe point. Before that there is nothing to save,
  and a second Ctrl-C means "now" (a second SIGTERM or SIGHUP does not: see
  URGENT_AGAIN): both exit at once, after `on_abort`
  (releasing the workdir) and one line naming the resume point. Exiting
  without unwinding is deliberate: an exception raised into XLA's or orbax's
  threads can crash the interpreter's shutdown. Several processes: SIGTERM
  through `reached_preemption_sync_point`, JAX's distributed preemption
  service, so that all processes stop at the same step (a checkpoint is a
  collective); SIGINT keeps Python's default there.
  """

  SIGNALS: dict[int, tuple[str, str, int]] = {  # signal -> (what, name, exit status)
    signal.SIGTERM: ('preempted', 'SIGTERM', 143),
    signal.SIGINT: ('interrupted', 'SIGINT', 130),
    signal.SIGHUP: ('hung up', 'SIGHUP', 129),
  }  # a closed terminal
  # A second Ctrl-C is a person asking for "now". A second SIGTERM or SIGHUP
  # is not: a scheduler (SLURM at its time limit, `sweep.py run` passing its
  # own on) may deliver the same request to a process twice, and its SIGKILL
  # after the grace period is the "now".
  URGENT_AGAIN = (signal.SIGINT,)

  def __init__(self, on_abort: Callable[[], None] = lambda: None):
    self.signum: int | None = None
    self.armed = False  # the first step compiled: a signal waits for a safe point
    self.ckpt_dir: str | None = None  # named when stopping at once
    self._on_abort = on_abort
    self._watcher = signals.SignalWatcher(self.SIGNALS, self._on_signal, name='stop-signals')

  def __enter__(self):
    if jax.process_count() == 1:
      self._watcher.__enter__()
    return self

  def _on_signal(self, signum):
    what, name, code = self.SIGNALS[signum]
    if self.armed and self.signum is None:
      self.signum = signum
      return
    if self.armed and signum not in self.URGENT_AGAIN:
      print(
        f'{what} again ({name}): already stopping, the save goes on.', file=sys.stderr, flush=True
      )
      return
    self._on_abort()
    print(
      f'{what} ({name}) before training started: nothing to save.'
      if not self.armed
      else f'{what} again ({name}): stopping now, not waiting for the save; {self._resume_point()}',
      file=sys.stderr,
      flush=True,
    )
    os._exit(code)  # pylint: disable=protected-access

  def _resume_point(self) -> str:
    from spikeformer_jax import checkpointing  # pylint: disable=import-outside-toplevel

    # Committed steps only: in a store a step being written is listed already.
    steps = checkpointing.committed_steps(self.ckpt_dir) if self.ckpt_dir else []
    if not steps:
      return 'no checkpoint is committed yet: the rerun starts from scratch.'
    return f'the rerun resumes from the last committed checkpoint, step {steps[-1]}.'

  def requested(self) -> bool:
    """A signal arrived (this process; the evaluation's check between batches)."""
    return self.signum is not None

  def reached(self, step: int) -> bool:
    """All processes stop at this step."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested()

  def stopped(self, where: str, ckpt_dir: str, step: int, todo: str) -> errors.Stopped:
    signum = signal.SIGTERM if self.signum is None else self.signum  # None: the sync point
    what, name, code = self.SIGNALS.get(signum, self.SIGNALS[signal.SIGTERM])
    return errors.Stopped(
      f'{what} ({name}) {where}: checkpoint {step} saved in {ckpt_dir}; '
      f'rerun the same command to {todo}.',
      code,
    )

  def __exit__(self, *exc):
    self._watcher.__exit__(*exc)
