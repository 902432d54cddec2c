"""Signals heard at once, even while the main thread runs C++ for minutes.

Python runs a signal's handler only between the main thread's bytecodes, so
not while XLA compiles or a step runs, and libraries (libtpu) install their
own. `SignalWatcher` installs a Python handler that does nothing for each of
its signals, so that `signal.set_wakeup_fd` writes the signal's number to a
pipe, and a daemon thread reading that pipe calls `on_signal(signum)` at once.
Used by the training loop (preemption.StopSignals) and the planner
(aot.py). Standard library only: the planner sets up JAX's
environment before importing it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any


class SignalWatcher:
  """`with SignalWatcher(signals, on_signal):` calls `on_signal(signum)` on a
  watcher thread for each of `signals` that arrives, and restores the previous
  handlers on exit.

  A signal ignored on entry stays ignored (nohup's SIGHUP: the user asked for
  it). Only the main thread may install handlers: elsewhere (a test runner's
  worker thread) it watches nothing. `claim()` takes the signals back from a
  library that installed its own since.
  """

  def __init__(
    self, signals: Iterable[int], on_signal: Callable[[int], None], name: str = 'signal-watcher'
  ):
    self.signals = tuple(signals)
    self._on_signal = on_signal
    self._name = name
    self._previous: dict[int, Any] = {}  # signal -> its handler on entry
    self._pipe: tuple[int, int] | None = None  # (read, write) while watching
    self._old_fd = -1  # set_wakeup_fd's previous fd, read only while _pipe is set

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      r, w = os.pipe()
      os.set_blocking(w, False)
      self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
      self._pipe = (r, w)
      self.claim()
      threading.Thread(target=self._watch, args=(r,), daemon=True, name=self._name).start()
    return self

  def claim(self):
    """(Re)installs the handlers; a signal ignored on entry is left alone."""
    if self._pipe is None:
      return
    for s in self.signals:
      if s not in self._previous and signal.getsignal(s) is signal.SIG_IGN:
        continue
      previous = signal.signal(s, _wake_only)
      self._previous.setdefault(s, previous)

  def _watch(self, r: int):
    while True:
      try:
        data = os.read(r, 64)
      except OSError:
        return
      if not data:
        os.close(r)
        return
      for signum in data:
        if signum in self.signals:
          self._on_signal(signum)

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}
    if self._pipe is not None:
      signal.set_wakeup_fd(self._old_fd)
      os.close(self._pipe[1])  # the watcher reads EOF and ends
      self._pipe = None


def _wake_only(signum, frame):  # pylint: disable=unused-argument
  """The Python handler: its only effect is the wakeup fd's byte."""
