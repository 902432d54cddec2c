"""The exceptions the command-line tools turn into one line and an exit status.

A user who mistyped a field, pointed at a bad file or shares a workdir needs
one sentence that names the problem and the fix, not a traceback. Library code
raises these (or ValueError / FileNotFoundError with such a sentence); the
tools catch `CLEAR` and print `error: <message>`.
"""

from __future__ import annotations


class UserError(Exception):
  """A problem the user can fix, described in one line."""


class WorkdirBusy(UserError):
  """Another live process trains in this workdir."""


class CheckpointError(UserError):
  """A checkpoint cannot be read or written."""


class Stopped(Exception):
  """SIGTERM or SIGINT stopped the run after saving its step; rerun to resume.

  `exit_code` is what a shell reports for that signal (143, 130), which is
  what schedulers expect of a job stopped by it.
  """

  def __init__(self, message: str, exit_code: int = 143):
    super().__init__(message)
    self.exit_code = exit_code


# Errors that carry a one-line message for the user (tools print them as
# `error: ...` and exit 1). OSError covers unwritable and missing paths.
CLEAR = (ValueError, FileNotFoundError, FloatingPointError, UserError, OSError)


def one_line(e: BaseException) -> str:
  """The exception's message on one line (no traceback, no line breaks)."""
  msg = ' '.join(str(e).split()) or type(e).__name__
  return msg
