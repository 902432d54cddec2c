"""Fields added after runs were saved without them: each attention kind and
family declares its own (`added`), the shared config_lib asks the registries,
and a saved config that lacks them compares as the value those runs had."""

from spikeformer_jax import attention, config_lib, models
from spikeformer_jax.attention import ssa


def _defining(saved_model: dict, want_model: dict) -> list[str]:
  saved, want = {'model': saved_model}, {'model': want_model}
  return config_lib.model_defining(config_lib.config_diff(saved, want), saved, want)


def test_a2os2a_runs_saved_before_out_neuron_are_the_binary_model():
  assert 'model.a2os2a' in config_lib.added_fields()
  assert _defining({}, {'a2os2a': {'out_neuron': 'binary'}}) == []
  assert _defining({}, {'a2os2a': {'out_neuron': 'ternary'}}) == ['model.a2os2a']


def test_families_declare_their_added_fields():
  assert models.get('sdt').added == {'head_order': ('pool_then_fire', str)}
  assert _defining({}, {'head_order': 'pool_then_fire', 'qk_pool': 0}) == []
  assert _defining({}, {'head_order': 'fire_then_pool'}) == ['model.head_order']


def test_a_plugin_kind_declares_its_added_fields():
  class Gained(ssa.SSA):
    name = 'gained'
    added = {'gained': ({'gain': 1.0}, dict)}

  assert _defining({}, {'gained': {'gain': 1.0}}) == ['model.gained']  # not registered
  attention.register(Gained())
  try:
    assert _defining({}, {'gained': {'gain': 1.0}}) == []
    assert _defining({}, {'gained': {'gain': 2.0}}) == ['model.gained']
  finally:
    attention.unregister('gained')
