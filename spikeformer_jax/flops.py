"""Model FLOPs counted analytically from a function's jaxpr.

Counts the multiply-accumulates of every `dot_general` and
`conv_general_dilated` (2 FLOPs each), descending into jit, scan (times its
length), custom-gradient and remat sub-jaxprs. Elementwise work (neurons,
BatchNorm, pooling) is excluded, as in the usual model-FLOPs (MFU) convention
(PaLM, appendix B). No XLA cost model is involved: the count follows from the
shapes alone, and is the same on every backend.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


def _dot_macs(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
  return math.prod(lhs) * math.prod(rhs_free)


def _conv_macs(eqn) -> int:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params['dimension_numbers']
  out_features = rhs[dn.rhs_spec[0]]
  return math.prod(out) * (math.prod(rhs) // out_features)


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(x, jex_core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex_core.Jaxpr):
        yield x


def jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_macs(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_macs(eqn)
    else:
      mult = eqn.params.get('length', 1) if name == 'scan' else 1
      # custom_jvp/vjp carry both the primal and the rule: count the primal only.
      subs = list(_sub_jaxprs(eqn))
      if name in ('custom_jvp_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr'):
        subs = subs[:1]
      total += mult * sum(jaxpr_macs(j) for j in subs)
  return total


def forward_flops(fn, *args) -> int:
  """FLOPs (2 x MACs) of one call of fn(*args)."""
  return 2 * jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)
