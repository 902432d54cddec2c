"""User errors, which the tools print as one line; bugs, which keep their traceback.

A user who mistyped a field, pointed at a bad file or shares a workdir needs
one sentence that names the problem and the fix, not a traceback. Library code
raises `UserError` (or a subclass below) with such a sentence. Every tool ends
in `report`, which prints `error: <message>` and returns the exit status.

Everything else is a bug and keeps its traceback, whatever its type: a plain
`ValueError` or `TypeError` from JAX, NumPy or a plug-in ('Incompatible shapes
for broadcasting') says nothing a user can fix without the file and line.
`USER_ERRORS` is the one list of one-line types: `UserError` and `OSError`
(a full disk, a denied permission, a missing file the user named).
`--traceback` on every tool shows the traceback of user errors too.

Plug-ins (attention kinds, families): raise `ConfigError` for a bad value of
your fields. A `check(model)` of a kind or family may raise a plain
`ValueError` as well: that is what a check is for, so validation reports it
as a `ConfigError`. Anywhere else (build, forward, products) a plain exception
is treated as a bug in the plug-in.

`ConfigError` and `DataError` are also `ValueError`s, so `except ValueError`
(and tests written before them) still catch them.
"""

from __future__ import annotations

import sys
import traceback as traceback_lib


class UserError(Exception):
  """A problem the user can fix, described in one line."""

  multiline = False  # True: the message is a summary line and a line per item, printed as is


class ConfigError(UserError, ValueError):
  """A config field, a command-line option or a --workdir that cannot work."""


class DataError(UserError, ValueError):
  """A file's content that cannot be used: a dataset, a recording, a metrics file."""


class Diverged(UserError, FloatingPointError):
  """The training loss or gradient went non-finite (an lr too high, bad data)."""


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


# The exceptions the tools print as one line (`error: ...`, exit status 1).
USER_ERRORS = (UserError, OSError)


def one_line(e: BaseException | str) -> str:
  """The exception's message (or a text) on one line: no traceback, no line breaks."""
  return ' '.join(str(e).split()) or type(e).__name__


def report(e: BaseException, traceback: bool = False, file=None) -> int:
  """Prints `e` as a tool ends with it and returns the tool's exit status.

  A user error is one line, `error: <message>` (after its traceback with
  `traceback=True`, the tools' --traceback); anything else is a bug: its
  traceback, then the line. `Stopped` prints its message and returns its
  signal's status.
  """
  file = sys.stderr if file is None else file
  if isinstance(e, Stopped):
    print(one_line(e), file=file)
    return e.exit_code
  user = isinstance(e, USER_ERRORS)
  if traceback or not user:
    traceback_lib.print_exception(type(e), e, e.__traceback__, file=file)
  if not user:
    print(
      f'error: {type(e).__name__}: {one_line(e)} (a bug, not a problem with the input: '
      'the traceback above shows where)',
      file=file,
    )
  elif getattr(e, 'multiline', False):
    print(f'error: {e}', file=file)
  else:
    print(f'error: {one_line(e)}', file=file)
  file.flush()
  return 1
