"""Optional dependencies: one line naming the extra that installs a missing one.

Training needs only the runtime requirements (pyproject.toml). The packages
of one feature are an extra: `[digits]` (scikit-learn, the embedded digits
dataset), `[tfds]` (reading prepared CIFAR / ImageNet / event datasets),
`[plots]` (matplotlib), `[torch]` (official .pth checkpoints). A feature whose
extra is missing raises `MissingExtra`, a user error (one line, no traceback)
that is also an ImportError for code that tests for one.
"""

from __future__ import annotations

import importlib
import types

from spikeformer_jax import errors


class MissingExtra(errors.UserError, ImportError):
  """An optional package is not installed; the message names the extra."""


def missing(
  e: ImportError, *, module: str, extra: str, package: str, needed_for: str
) -> MissingExtra:
  """The one-line error for `e`, raised by importing `module` (of the pip
  package `package`, installed by `extra`) for `needed_for`."""
  # A dependency of the package may be what is missing: say which.
  ours = e.name is None or module == e.name or module.startswith(e.name + '.')
  what = package if ours else f'{package} ({e})'
  return MissingExtra(
    f'{needed_for} needs {what}, an optional dependency: '
    f'pip install "spikeformer_jax[{extra}]" (in a checkout: '
    f'pip install -e ".[{extra}]").'
  )


def require(module: str, *, extra: str, package: str, needed_for: str) -> types.ModuleType:
  """Imports `module` (of the pip package `package`, installed by `extra`)."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise missing(e, module=module, extra=extra, package=package, needed_for=needed_for) from e
