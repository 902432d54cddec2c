"""Attention kinds: one module each, behind one registry (see base.py).

  ssa          Spikformer's Spiking Self-Attention               ssa.py
  sdsa         SDT's Spike-Driven Self-Attention                 sdsa.py
  a2os2a       A2OS2A: binary Q, ReLU K, ternary V               a2os2a.py
  mssa         MSViT's multi-scale (QKFormer's token) attention  mssa.py
  a_i, a_relu, a_leakyrelu, vsa, vsa_float_v
               Spikformer Table 1's non-spiking ablations        ablations.py

`register(kind)` adds one; `names()` is the only list of valid names, which
validation, error messages, analysis, plots and sweeps ask.
"""

from spikeformer_jax.attention.base import (
  Context,
  Kind,
  added_fields,
  build_qkv,
  config_fields,
  erode,
  erode_kv,
  get,
  heads,
  matmul_products,
  names,
  qk_map,
  qkv,
  register,
  unregister,
)

# The built-in kinds register themselves, in this order.
from spikeformer_jax.attention import ssa, sdsa, a2os2a, mssa, ablations  # pylint: disable=g-bad-import-order,wrong-import-position

__all__ = [
  'Context',
  'Kind',
  'added_fields',
  'build_qkv',
  'config_fields',
  'erode',
  'erode_kv',
  'get',
  'heads',
  'matmul_products',
  'names',
  'qk_map',
  'qkv',
  'register',
  'unregister',
  'ssa',
  'sdsa',
  'a2os2a',
  'mssa',
  'ablations',
]
