"""A feature whose optional package is missing names the extra that installs it."""

import sys

import pytest

from spikeformer_jax import errors
from spikeformer_jax import extras
from spikeformer_jax.data import sources


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)  # import fails as if not installed
  with pytest.raises(extras.MissingExtra) as e:
    sources.digits('train')
  msg = str(e.value)
  assert isinstance(e.value, errors.UserError) and isinstance(e.value, ImportError)
  assert '\n' not in msg and 'scikit-learn' in msg and '"spikeformer_jax[digits]"' in msg, msg
  assert "data.name='digits'" in msg, msg


def test_a_missing_dependency_of_the_package_is_named():
  e = ModuleNotFoundError("No module named 'scipy'", name='scipy')
  msg = str(
    extras.missing(
      e, module='sklearn.datasets', extra='digits', package='scikit-learn', needed_for='x'
    )
  )
  assert "scikit-learn (No module named 'scipy')" in msg, msg
  with pytest.raises(extras.MissingExtra, match=r'needs no_such_package, .*\[plots\]'):
    extras.require('no_such_module_here', extra='plots', package='no_such_package', needed_for='y')
