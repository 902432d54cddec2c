"""A2OS2A (Guo et al., CVPR 2025): binary Q, ReLU K, ternary V; SN(Q K^T V).

No softmax and no scale; with Q in {0, 1} and V in {-1, 0, 1} both products
are additions (and subtractions for V = -1) of K's reals. K is real (ReLU, not
spikes), so the two associations (Q K^T) V and Q (K^T V) (`model.attn_order`)
add the same reals in different orders: equal up to float rounding, not
bitwise (exact only where all operands are integers, as in SSA); a rounding
difference can move a spike of the neuron after the product where its
membrane sits at the threshold.

This kind's own config fields (`config.model.<name>`, see `A2OS2A.config`):
  * `ternary`: the ternary V neuron (paper eqs. 25-27);
  * `a2os2a.out_neuron`: the neuron SN after Q K^T V (eq. 28): 'binary' (the
    network's LIF at `model.attn_v_threshold`, the default) or 'ternary'
    (spikes in {-1, 0, 1}, so negative products pass as -1).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from spikeformer_jax import errors
from spikeformer_jax import neurons
from spikeformer_jax.attention import base
from spikeformer_jax.attention import ssa

# The neuron after Q K^T V. The paper's SN of eq. 28 is its binary LIF (eqs.
# 1-3, "we represent the spiking neuron layer as SN(.)"), yet it stresses
# that the product, unlike SSA's, can be negative (section 4.3: "our framework
# allows for the result to include negative values, akin to what is seen in
# traditional ANNs"): a binary neuron at +Vth drops every negative value,
# 'ternary' keeps them as -1 spikes.
OUT_NEURONS = ('binary', 'ternary')


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def ternary_config(**overrides) -> ml_collections.ConfigDict:
  """`config.model.ternary`: the ternary V neuron (and the ternary out neuron).

  Defaults share the network's SpikingJelly LIF convention (tau and surrogate
  from `model.neuron`, Vth 1, Vreset 0); charge_form='paper' is the paper's
  literal U = H + X with leak `beta`; grad='clamp' is the straight-through
  gradient of clamp(U / Vth, -1, 1).
  """
  cfg = ml_collections.ConfigDict(dict(
      v_threshold=1.0,            # fires sign(U) where |U| >= v_threshold
      v_reset=0.0,                # membrane after a spike
      charge_form='spikingjelly',  # or 'paper': U = H + X with the leak beta (eqs. 25-27)
      beta=0.5,                   # leak of charge_form 'paper' (ours: the paper gives none)
      grad='surrogate'))          # 'surrogate' or 'clamp' (straight-through)
  cfg.update(overrides)
  return cfg
# fmt: on


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def a2os2a_config(**overrides) -> ml_collections.ConfigDict:
  """`config.model.a2os2a`: A2OS2A's switches beyond its neurons' dynamics."""
  cfg = ml_collections.ConfigDict(dict(
      # The neuron after Q K^T V (OUT_NEURONS): 'binary' is the network's LIF at
      # model.attn_v_threshold; 'ternary' the model.ternary neuron firing -1 / +1
      # at -/+ model.attn_v_threshold, so negative values reach the projection.
      out_neuron='binary'))
  cfg.update(overrides)
  return cfg
# fmt: on


def out_neuron_choice(model: ml_collections.ConfigDict | None) -> str:
  """model.a2os2a.out_neuron, checked; 'binary' where the config predates it."""
  own = model.get('a2os2a', None) if model is not None else None
  choice = own.get('out_neuron', 'binary') if own is not None else 'binary'
  if choice not in OUT_NEURONS:
    raise errors.ConfigError(
      f'model.a2os2a.out_neuron={choice!r} is not valid; choose one of {OUT_NEURONS}.'
    )
  return choice


def check_ternary_dynamics(model: ml_collections.ConfigDict, t: ml_collections.ConfigDict):
  """The ternary V neuron's constants within their meaning, as validation
  checks the network's: a leak that keeps a fraction of the membrane, a reset
  within the threshold (it fires at |U| >= Vth and resets to +-v_reset)."""
  vth = t.get('v_threshold', 1.0)
  if not vth > 0:
    raise errors.ConfigError(f'model.ternary.v_threshold={vth} must be > 0.')
  tau = model.neuron.get('tau', 2.0)  # SpikingJelly's charge with the network's tau
  if t.get('charge_form', 'spikingjelly') == 'spikingjelly' and not tau > 1:
    raise errors.ConfigError(
      f'model.neuron.tau={tau} must be > 1: the ternary V neuron '
      "(model.ternary.charge_form='spikingjelly') keeps 1 - 1/tau of its membrane each step, "
      'with the network\'s tau; e.g. 2.0.'
    )
  beta = t.get('beta', 0.5)
  if not 0 <= beta <= 1:
    raise errors.ConfigError(
      f'model.ternary.beta={beta} is the fraction of the membrane kept '
      "(charge_form='paper'): use a value in [0, 1]."
    )
  thresholds = [('model.ternary.v_threshold', vth)]
  attn_vth = model.get('attn_v_threshold', None)
  if attn_vth is not None and out_neuron_choice(model) == 'ternary':
    thresholds.append(('model.attn_v_threshold', attn_vth))
  v_reset = t.get('v_reset', 0.0)
  for name, threshold in thresholds:
    if not abs(v_reset) < threshold:
      raise errors.ConfigError(
        f'model.ternary.v_reset={v_reset} must be in (-{threshold}, {threshold}), within '
        f'{name} (a ternary neuron reset to +-v_reset at or beyond the threshold fires '
        'again at once).'
      )


def make_ternary(lif: neurons.Neuron, t: ml_collections.ConfigDict) -> neurons.Neuron:
  """The network's LIF turned ternary with `config.model.ternary`."""
  return dataclasses.replace(
    lif,
    kind='ternary',
    v_threshold=t.v_threshold,
    v_reset=t.v_reset,
    charge_form=t.charge_form,
    beta=t.beta,
    ternary_grad=t.grad,
  )


def a2os2a_self_attention(q, k, v, *, order: str):
  """Paper eq. 28 before its neuron: Q K^T V (Q binary, K >= 0, V ternary)."""
  return ssa.spiking_self_attention(q, k, v, scale=1.0, order=order)


class A2OS2A(ssa.SSA):
  name = 'a2os2a'
  picture = 'Q K^T'
  config = {'ternary': ternary_config, 'a2os2a': a2os2a_config}
  added = {'a2os2a': ({'out_neuron': 'binary'}, dict)}  # runs saved before out_neuron

  def check(self, model):
    out_neuron_choice(model)
    t = model.get('ternary', None)
    for field, valid in (('charge_form', neurons.CHARGE_FORMS), ('grad', neurons.TERNARY_GRADS)):
      value = t.get(field) if t is not None else None
      if value is not None and value not in valid:
        raise errors.ConfigError(
          f'model.ternary.{field}={value!r} is not valid; choose one of {valid}.'
        )
    if t is not None:
      check_ternary_dynamics(model, t)

  def build(self, attn, ctx):
    t = self.own_config(ctx, 'ternary')
    base.build_qkv(
      attn,
      ctx,
      k_lif=False,
      v_lif=ctx.settings.spiking(make_ternary(ctx.settings.neuron, t)),
    )
    if out_neuron_choice(ctx.model) == 'ternary':
      # The official name, so checkpoints and parameter paths stay the same.
      attn.attn_lif = ctx.settings.spiking(
        dataclasses.replace(make_ternary(ctx.settings.neuron, t), v_threshold=ctx.attn_v_threshold)
      )
    else:
      attn.attn_lif = ctx.settings.lif(v_threshold=ctx.attn_v_threshold)

  def neurons(self, attn) -> tuple:
    return attn.q_lif, jax.nn.relu, attn.v_lif

  def equation(self, attn, q, k, v):
    return a2os2a_self_attention(q, k, v, order=attn.order)

  def attention_map(self, attn, q, k):
    return base.qk_map(q, k)


base.register(A2OS2A())
