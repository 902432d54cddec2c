"""signals.SignalWatcher, in this process (the training loop's and the
planner's use of it, with real processes: test_preemption, test_aot)."""

import os
import signal
import threading

from spikeformer_jax import signals


def _wait_for(event):
  assert event.wait(10), 'the watcher thread never heard the signal'


def test_each_signal_reaches_the_callback_and_handlers_are_restored():
  heard, event = [], threading.Event()

  def on_signal(signum):
    heard.append(signum)
    event.set()

  before = signal.getsignal(signal.SIGUSR1)
  with signals.SignalWatcher((signal.SIGUSR1, signal.SIGUSR2), on_signal):
    assert signal.getsignal(signal.SIGUSR1) is not before
    os.kill(os.getpid(), signal.SIGUSR2)
    _wait_for(event)
  assert heard == [signal.SIGUSR2]
  assert signal.getsignal(signal.SIGUSR1) is before


def test_an_ignored_signal_stays_ignored_even_when_claimed_again():
  """nohup's SIGHUP: the user asked for it to be ignored."""
  previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
  try:
    watcher = signals.SignalWatcher((signal.SIGUSR1, signal.SIGUSR2), lambda s: None)
    with watcher:
      watcher.claim()
      assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
      assert signal.getsignal(signal.SIGUSR2) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGUSR1, previous)


def test_claim_takes_a_signal_back_from_a_library():
  """libtpu installs its own SIGTERM handler when it loads."""
  event = threading.Event()
  with signals.SignalWatcher((signal.SIGUSR1,), lambda s: event.set()) as watcher:
    signal.signal(signal.SIGUSR1, lambda *_: None)  # a library's handler
    watcher.claim()
    os.kill(os.getpid(), signal.SIGUSR1)
    _wait_for(event)


def test_outside_the_main_thread_nothing_is_watched():
  before = signal.getsignal(signal.SIGUSR1)
  seen = []

  def enter():
    with signals.SignalWatcher((signal.SIGUSR1,), lambda s: None):
      seen.append(signal.getsignal(signal.SIGUSR1))

  t = threading.Thread(target=enter)
  t.start()
  t.join()
  assert seen == [before]
