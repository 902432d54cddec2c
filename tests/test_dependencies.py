"""pyproject's JAX pins: Python 3.11 keeps what CI tests, 3.12+ admits the newer JAX.

jax 0.11 and later ship for Python >= 3.12 only, so the ranges differ by
environment marker (docs/install.md says which versions were tested where).
"""

import pathlib
import tomllib

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
_PROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
# The releases there are for each Python (0.12.0.1: the 0.12.0 jaxlib fix release).
_RELEASES = ('0.10.2', '0.11.0', '0.11.2', '0.12.0.1', '0.12.1')


def _admitted(requirements, name, python):
  """{requirement text: the releases it admits} for `name` on Python `python`."""
  env = {'python_version': python, 'python_full_version': python + '.0', 'sys_platform': 'linux'}
  out = {}
  for text in requirements:
    r = Requirement(text)
    if r.name == name and (r.marker is None or r.marker.evaluate(env)):
      out[str(r.specifier) + str(sorted(r.extras))] = [
        v for v in _RELEASES if r.specifier.contains(v)
      ]
  return out


def test_python_311_keeps_jax_0_10_and_3_12_admits_0_11_and_0_12():
  deps, tpu = _PROJECT['dependencies'], _PROJECT['optional-dependencies']['tpu']
  for requirements, name in ((deps, 'jax'), (deps, 'jaxlib'), (tpu, 'jax')):
    on_311 = _admitted(requirements, name, '3.11')
    on_312 = _admitted(requirements, name, '3.12')
    assert list(on_311.values()) == [['0.10.2']], (name, on_311)
    assert list(on_312.values()) == [list(_RELEASES)], (name, on_312)
  # flax and orbax: one range for both (flax 0.12.9+ and jax 0.11+ come together on 3.12).
  for name in ('flax', 'orbax-checkpoint'):
    (spec,) = [Requirement(t).specifier for t in deps if Requirement(t).name == name]
    assert spec.contains('0.12.8') and not spec.contains('0.13.0'), (name, spec)
