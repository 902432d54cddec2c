"""Model families, found by name (`config.model.name`) through one registry.

Each family module provides its model, config defaults, checks, downsampling
factor, description and runlocal shrink as `FAMILY` (see common.Family); a new
family is one module plus one `register` call.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from spikeformer_jax.models import common
from spikeformer_jax.models import msvit, sdt, spikformer
from spikeformer_jax.models.common import (DTYPES, Family, count_params, make_neuron,  # pylint: disable=unused-import
                                           neuron_config, settings)

_FAMILIES: dict[str, Family] = {}


def register(family: Family, *, replace: bool = False) -> Family:
  if family.name in _FAMILIES and not replace:
    raise ValueError(f'model family {family.name!r} is registered already.')
  _FAMILIES[family.name] = family
  return family


def unregister(name: str):
  _FAMILIES.pop(name, None)


def names() -> tuple[str, ...]:
  """The registered families, sorted."""
  return tuple(sorted(_FAMILIES))


def get(name: str) -> Family:
  if name not in _FAMILIES:
    raise ValueError(f'model.name={name!r}; valid: {", ".join(names())}.')
  return _FAMILIES[name]


for _f in (spikformer.FAMILY, sdt.FAMILY, msvit.FAMILY):
  register(_f)


def build_model(cfg: ml_collections.ConfigDict, *, seed: int = 0,
                bn_groups: int = 1) -> nnx.Module:
  """Builds the model named by `cfg.name` (`config.model`)."""
  return get(cfg.name).model(cfg, s=common.settings(cfg, bn_groups=bn_groups),
                             rngs=nnx.Rngs(seed))


def downsampling(cfg: ml_collections.ConfigDict) -> int:
  """The factor by which the patch stem (and a hierarchical family's stage
  embeddings) shrink the image: the image size must be a multiple of it."""
  return get(cfg.name).downsampling(cfg)


def describe(cfg: ml_collections.ConfigDict) -> str:
  """'spikformer cifar 4-384' style: family, flavour / graph / attention, depth-width."""
  return get(cfg.name).describe(cfg)
