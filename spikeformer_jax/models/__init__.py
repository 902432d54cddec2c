"""Model families, found by name (`config.model.name`) through one registry.

Each family module provides its model, config defaults, checks, downsampling
factor, description and runlocal shrink as `FAMILY` (see common.Family); a new
family is one module plus one `register` call.
"""

from __future__ import annotations

import inspect

import ml_collections
from flax import nnx

from spikeformer_jax import attention
from spikeformer_jax import registry
from spikeformer_jax.models import common
from spikeformer_jax.models import msvit, sdt, spikformer
from spikeformer_jax.models.common import (
  DTYPES,
  Family,
  count_params,
  make_neuron,
  neuron_config,
  settings,
)

__all__ = [
  'DTYPES',
  'Family',
  'build_model',
  'count_params',
  'describe',
  'downsampling',
  'get',
  'make_neuron',
  'names',
  'neuron_config',
  'register',
  'settings',
  'unregister',
  'common',
  'msvit',
  'sdt',
  'spikformer',
]

_FAMILIES = registry.Registry[Family](
  'model family', lambda name, names: f'model.name={name!r}; valid: {", ".join(names)}.', sort=True
)


def register(family: Family, *, replace: bool = False) -> Family:
  return _FAMILIES.register(family.name, family, replace=replace)


unregister, names, get = _FAMILIES.unregister, _FAMILIES.names, _FAMILIES.get  # names: sorted


for _f in (spikformer.FAMILY, sdt.FAMILY, msvit.FAMILY):
  register(_f)


def added_fields() -> dict:
  """Every family's and attention kind's `added` fields, as 'model.<field>'."""
  out = {f'model.{k}': v for family in _FAMILIES.values() for k, v in family.added.items()}
  return {**out, **attention.added_fields()}


def build_model(cfg: ml_collections.ConfigDict, *, seed: int = 0, bn_groups: int = 1) -> nnx.Module:
  """Builds the model named by `cfg.name` (`config.model`)."""
  model = get(cfg.name).model
  layer_settings = common.settings(cfg, bn_groups=bn_groups)
  if 's' in inspect.signature(model).parameters:  # a plug-in family of the old keyword
    return model(cfg, s=layer_settings, rngs=nnx.Rngs(seed))
  return model(cfg, settings=layer_settings, rngs=nnx.Rngs(seed))


def downsampling(cfg: ml_collections.ConfigDict) -> int:
  """The factor by which the patch stem (and a hierarchical family's stage
  embeddings) shrink the image: the image size must be a multiple of it."""
  return get(cfg.name).downsampling(cfg)


def describe(cfg: ml_collections.ConfigDict) -> str:
  """'spikformer cifar 4-384' style: family, flavour / graph / attention, depth-width."""
  return get(cfg.name).describe(cfg)
