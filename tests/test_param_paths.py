"""Every config variant keeps its parameter paths, shapes and count, so that
checkpoints written before a refactor restore and evaluate after it (the
record, tests/param_paths.json, is rewritten by tests/param_paths.py only for
an intended change)."""

import json

import pytest

import param_paths


@pytest.fixture(scope='module')
def recorded():
  with open(param_paths.JSON, encoding='utf-8') as f:
    return json.load(f)


@pytest.mark.slow
def test_every_variant_keeps_its_parameter_tree(recorded):
  now = dict(param_paths.variants())
  assert sorted(now) == sorted(recorded['variants'])
  for key, cfg in now.items():
    want = recorded['variants'][key]
    got = param_paths.record(cfg)
    assert got['params'] == want['params'], key
    assert got['paths'] == recorded['templates'][want['paths']], key
    assert got['sha256'] == want['sha256'], f'{key}: same templates, other shapes or indices'
