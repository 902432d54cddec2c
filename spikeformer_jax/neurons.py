"""Spiking neuron dynamics as pure JAX functions (no Flax in this file).

A multi-step neuron maps input currents `x[B, T, ...]` to spikes `s[B, T, ...]`.
Each neuron is the composition of three named functions, applied per timestep:

    h[t] = charge(v[t-1], x[t])     membrane after integrating the input
    s[t] = fire(h[t])               spike (binary {0,1} or ternary {-1,0,1})
    v[t] = reset(h[t], s[t])        membrane carried to the next step

The defaults reproduce SpikingJelly's `MultiStepLIFNode(tau=2., detach_reset=True)`,
the neuron of every official Spikformer / SDT / MSViT model. How the loop over
time is compiled (`Neuron.loop`) is a free choice that never changes the result:

  * `scan`:   `jax.lax.scan`, with `unroll` steps per iteration (1..T; 0 or
              any value >= T: fully, the default, fastest and leanest in
              benchmarks/unroll_study.py);
  * `python`: a Python loop, i.e. fully unrolled at trace time;
  * `vjp`:    a whole-sequence `jax.custom_vjp` that saves only the pre-spike
              membrane `h[0..T-1]` for its backward pass (spikes and the reset
              membrane are recomputed from it), instead of every scan residual.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from spikeformer_jax import errors

# --------------------------------------------------------------------------
# Surrogate spike functions.
# --------------------------------------------------------------------------

#: Default `alpha` per surrogate, as in SpikingJelly (sigmoid 4, atan 2,
#: piecewise quadratic = triangle 1). `straight_through` has no parameter.
SURROGATE_DEFAULT_ALPHA = {
  'sigmoid': 4.0,
  'atan': 2.0,
  'triangle': 1.0,
  'straight_through': 1.0,
}


def surrogate_grad(name: str, alpha: float, z: jax.Array) -> jax.Array:
  """Derivative used in place of the Heaviside step's (zero) derivative.

  `z` is the distance to the threshold (membrane - v_threshold).
  * sigmoid:          alpha * sig(alpha z) * (1 - sig(alpha z))
                      (SpikingJelly `surrogate.Sigmoid`).
  * atan:             alpha / 2 / (1 + (pi/2 * alpha * z)^2)   (`surrogate.ATan`).
  * triangle:         max(0, alpha - alpha^2 |z|), a triangle of height alpha
                      and half-width 1/alpha (`surrogate.PiecewiseQuadratic`).
  * straight_through: 1 everywhere (the straight-through estimator).
  """
  if name == 'sigmoid':
    sg = jax.nn.sigmoid(alpha * z)
    return alpha * sg * (1.0 - sg)
  if name == 'atan':
    return (alpha / 2.0) / (1.0 + jnp.square((math.pi / 2.0) * alpha * z))
  if name == 'triangle':
    return jnp.maximum(alpha - alpha * alpha * jnp.abs(z), 0.0)
  if name == 'straight_through':
    return jnp.ones_like(z)
  raise errors.ConfigError(f'Unknown surrogate {name!r}; valid: {sorted(SURROGATE_DEFAULT_ALPHA)}.')


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def spike(z: jax.Array, surrogate: str = 'sigmoid', alpha: float = 4.0):
  """Heaviside step `z >= 0` (fires on ties) with a surrogate derivative."""
  return (z >= 0).astype(z.dtype)


@spike.defjvp
def _spike_jvp(surrogate, alpha, primals, tangents):
  (z,), (dz,) = primals, tangents
  return spike(z, surrogate, alpha), surrogate_grad(surrogate, alpha, z) * dz


# --------------------------------------------------------------------------
# Neuron definition.
# --------------------------------------------------------------------------

KINDS = ('lif', 'if', 'ternary', 'relu', 'gelu')
# Not neurons: float activations in their place (the papers' ANN baselines,
# `model.neuron.kind`). No state, no time dependence, no threshold.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  'relu': jax.nn.relu,
  'gelu': functools.partial(jax.nn.gelu, approximate=False),
}
LOOPS = ('scan', 'python', 'vjp')
MEMBRANES = ('float32', 'compute')
CHARGE_FORMS = ('spikingjelly', 'paper')
TERNARY_GRADS = ('surrogate', 'clamp')


@dataclasses.dataclass(frozen=True)
class Neuron:
  """A spiking neuron's parameters; hashable, so it is static under `jit`.

  Attributes:
    kind: 'lif' (leaky), 'if' (no leak) or 'ternary' (A2OS2A, spikes in
      {-1, 0, +1}, paper eqs. 25-27); or 'relu' / 'gelu', no neuron at all:
      that float activation of each timestep's input (`ACTIVATIONS`), for a
      non-spiking network (the other fields are then unused).
    tau: membrane time constant of the SpikingJelly charge.
    decay_input: SpikingJelly's `decay_input`: whether the input is divided by tau.
    v_threshold: firing threshold (for ternary: on |membrane|).
    v_reset: membrane after a spike (hard reset); None means soft reset
      (subtract the threshold), as in SpikingJelly.
    detach_reset: treat the spike as a constant in the reset (no gradient
      through the reset path), as every official model does.
    surrogate: name of the surrogate derivative, see `surrogate_grad`.
    alpha: surrogate sharpness; None takes `SURROGATE_DEFAULT_ALPHA`.
    charge_form: 'spikingjelly' (H = V + (X - V)/tau) or 'paper' (the A2OS2A
      paper's form U = H + X with leak beta applied when the neuron does not
      fire: H = Vreset*S + beta*U*(1-|S|)). Only for 'lif' and 'ternary'.
    beta: leak factor of the 'paper' charge form.
    ternary_grad: 'surrogate' (dS/dU = g(|U| - Vth), g the surrogate) or
      'clamp' (straight-through: the gradient of clamp(U/Vth, -1, 1)).
    loop: how the timestep loop is compiled, see the module docstring.
    unroll: steps per `lax.scan` iteration (loop 'scan', and the backward
      scan of 'vjp'); 0 unrolls all T steps.
    recompute: keep only the neuron's input for the backward pass and run the
      loop again there (jax.checkpoint): the input in the compute dtype (2
      bytes in bfloat16) instead of float32 membranes per timestep, for a
      cheap elementwise recomputation. Same values and gradients.
    membrane: 'float32' (at least float32 whatever the compute dtype: exact,
      the default) or 'compute' (the input's dtype: bfloat16 membranes under
      a bfloat16 network, as SpikingJelly's membranes are float16 under the
      official code's AMP). Not exact: bfloat16 rounding of the membrane can
      move spikes near the threshold; it halves the neuron's memory traffic.
  """

  kind: str = 'lif'
  tau: float = 2.0
  decay_input: bool = True
  v_threshold: float = 1.0
  v_reset: float | None = 0.0
  detach_reset: bool = True
  surrogate: str = 'sigmoid'
  alpha: float | None = None
  charge_form: str = 'spikingjelly'
  beta: float = 0.5
  ternary_grad: str = 'surrogate'
  loop: str = 'scan'
  unroll: int = 0
  recompute: bool = False
  membrane: str = 'float32'

  def __post_init__(self):
    def check(field, valid):
      value = getattr(self, field)
      if value not in valid:
        raise errors.ConfigError(f'Neuron.{field}={value!r} is not valid; choose one of {valid}.')

    check('kind', KINDS)
    check('loop', LOOPS)
    check('membrane', MEMBRANES)
    check('charge_form', CHARGE_FORMS)
    check('ternary_grad', TERNARY_GRADS)
    check('surrogate', tuple(SURROGATE_DEFAULT_ALPHA))
    if self.tau <= 0:
      raise errors.ConfigError(f'Neuron.tau={self.tau} must be > 0.')
    if self.unroll < 0:
      raise errors.ConfigError(
        f'Neuron.unroll={self.unroll} must be >= 1, or 0 to unroll all T steps.'
      )

  @property
  def surrogate_alpha(self) -> float:
    if self.alpha is None:
      return SURROGATE_DEFAULT_ALPHA[self.surrogate]
    return float(self.alpha)

  @property
  def v_init(self) -> float:
    return 0.0 if self.v_reset is None else float(self.v_reset)


def charge(n: Neuron, v: jax.Array, x: jax.Array) -> jax.Array:
  """Integrates input x into membrane v (SpikingJelly `neuronal_charge`).

  Always affine in (v, x); the `vjp` loop relies on that.
  """
  if n.kind == 'if' or n.charge_form == 'paper':
    return v + x
  # SpikingJelly's four charge functions, literally: the expressions decide
  # bit-level ties at the threshold.
  tau = _divisor(n.tau, v)
  if n.v_reset is None or n.v_reset == 0.0:
    if n.decay_input:
      return v + (x - v) / tau
    return v * (1.0 - 1.0 / n.tau) + x  # factor in double, as Python computes it
  if n.decay_input:
    return v + (x - (v - n.v_reset)) / tau
  return v - (v - n.v_reset) / tau + x


def _divisor(tau: float, like: jax.Array):
  """tau as a divisor that XLA really divides by, as PyTorch does.

  XLA rewrites division by a (broadcast) scalar into multiplication by its
  reciprocal, which rounds differently unless tau is a power of two (2.0, the
  default, is exact). For other tau, a full-shape divisor behind an
  optimisation barrier keeps the IEEE division, at the cost of one operand.
  This reproduces SpikingJelly's torch backend (and its documented
  expressions); its CuPy kernel multiplies by 1/tau instead, so for tau not a
  power of two the two SpikingJelly backends differ from each other at ties.
  """
  if math.frexp(tau)[0] == 0.5:  # a power of two: the reciprocal is exact
    return tau
  return jax.lax.optimization_barrier(jnp.full(like.shape, tau, like.dtype))


def fire(n: Neuron, h: jax.Array) -> jax.Array:
  """Spike from membrane h: Heaviside (binary) or sign*Heaviside (ternary)."""
  alpha = n.surrogate_alpha
  if n.kind != 'ternary':
    return spike(h - n.v_threshold, n.surrogate, alpha)
  # A2OS2A eq. 26: S = sign(U) * Hea(|U| - Vth). The sign is piecewise
  # constant, so the gradient is g(|U| - Vth) (sign(U)^2 = 1).
  sign = jax.lax.stop_gradient(jnp.sign(h))
  s = sign * spike(jnp.abs(h) - n.v_threshold, n.surrogate, alpha)
  if n.ternary_grad == 'clamp':
    # Straight-through: forward value s, gradient of clamp(U / Vth, -1, 1).
    c = jnp.clip(h / n.v_threshold, -1.0, 1.0)
    s = c + jax.lax.stop_gradient(s - c)
  return s


def reset(n: Neuron, h: jax.Array, s: jax.Array) -> jax.Array:
  """Membrane after firing (SpikingJelly `neuronal_reset`, A2OS2A eq. 27)."""
  if n.detach_reset:
    s = jax.lax.stop_gradient(s)
  keep = n.beta * h if (n.charge_form == 'paper' and n.kind != 'if') else h
  if n.v_reset is None:  # soft reset: subtract the threshold (signed if ternary)
    return keep - s * n.v_threshold
  # |S| for ternary spikes, with d|S|/dS = sign(S) (0 at 0, as PyTorch's abs).
  fired = jax.lax.stop_gradient(jnp.sign(s)) * s if n.kind == 'ternary' else s
  return keep * (1.0 - fired) + n.v_reset * s


def step(n: Neuron, v: jax.Array, x: jax.Array):
  """One timestep: returns (new membrane, spike, pre-spike membrane h)."""
  h = charge(n, v, x)
  s = fire(n, h)
  return reset(n, h, s), s, h


# --------------------------------------------------------------------------
# Multi-step application: the three loop choices.
# --------------------------------------------------------------------------


def membrane_dtype(dtype) -> jnp.dtype:
  """Membranes are at least float32, also when the network computes in bf16."""
  return jnp.promote_types(dtype, jnp.float32)


def _python_loop(n: Neuron, x: jax.Array, time_axis: int) -> jax.Array:
  # Indexes time where it lies: with the batch first ([B, T, ...], the folded
  # layers' layout) this avoids the two transposes a time-major scan needs,
  # and XLA fuses the T steps and the stacking into one elementwise pass.
  x_t = [jax.lax.index_in_dim(x, t, time_axis, keepdims=False) for t in range(x.shape[time_axis])]
  v = jnp.full(x_t[0].shape, n.v_init, x.dtype)
  out = []
  for xt in x_t:
    v, s, _ = step(n, v, xt)
    out.append(s)
  return jnp.stack(out, time_axis)


def steps_per_iteration(n: Neuron, T: int) -> int:
  """The scan's unroll: n.unroll capped at T, 0 meaning all T."""
  return T if n.unroll == 0 else min(n.unroll, T)


def _forward_h(n: Neuron, xs: jax.Array):
  """Forward scan returning spikes and the pre-spike membranes h."""

  def body(v, x):
    v, s, h = step(n, v, x)
    return v, (s, h)

  v0 = jnp.full(xs.shape[1:], n.v_init, xs.dtype)
  _, (s, h) = jax.lax.scan(body, v0, xs, unroll=steps_per_iteration(n, xs.shape[0]))
  return s, h


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sequence_vjp(n: Neuron, xs: jax.Array) -> jax.Array:
  return _forward_h(n, xs)[0]


def _sequence_vjp_fwd(n, xs):
  s, h = _forward_h(n, xs)
  return s, h  # the only residual: pre-spike membranes, [T, ...]


def _sequence_vjp_bwd(n, h, g_s):
  def fire_reset(h_t):
    s_t = fire(n, h_t)
    return s_t, reset(n, h_t, s_t)

  def body(g_v, inp):
    h_t, g_s_t = inp
    _, fr_vjp = jax.vjp(fire_reset, h_t)
    (g_h,) = fr_vjp((g_s_t, g_v))
    # charge is affine in (v, x): its VJP needs neither the unsaved input nor
    # the previous membrane, so it is taken at zeros.
    zeros = jnp.zeros_like(h_t)
    _, ch_vjp = jax.vjp(functools.partial(charge, n), zeros, zeros)
    g_vprev, g_x = ch_vjp(g_h)
    return g_vprev, g_x

  _, g_xs = jax.lax.scan(
    body, jnp.zeros_like(h[0]), (h, g_s), reverse=True, unroll=steps_per_iteration(n, h.shape[0])
  )
  return (g_xs,)


_sequence_vjp.defvjp(_sequence_vjp_fwd, _sequence_vjp_bwd)


def multistep(n: Neuron, x: jax.Array, time_axis: int = 1) -> jax.Array:
  """Applies neuron `n` over time. x: [B, T, ...] (time on `time_axis`).

  Returns spikes of x's shape and dtype (spikes are exact in any float dtype);
  the membrane is kept in at least float32. A non-spiking kind ('relu',
  'gelu') returns its activation of x instead, elementwise.
  """
  if n.kind in ACTIVATIONS:
    return ACTIVATIONS[n.kind](x)
  if n.recompute:
    plain = dataclasses.replace(n, recompute=False)
    return jax.checkpoint(
      functools.partial(multistep, plain, time_axis=time_axis),
      policy=jax.checkpoint_policies.nothing_saveable,
    )(x)
  xm = x.astype(membrane_dtype(x.dtype) if n.membrane == 'float32' else x.dtype)
  if n.loop == 'python':
    return _python_loop(n, xm, time_axis).astype(x.dtype)
  xs = jnp.moveaxis(xm, time_axis, 0)  # lax.scan runs over the leading axis
  if n.loop == 'scan':
    s = _forward_h(n, xs)[0]  # h is dead code here, removed by XLA
  else:
    s = _sequence_vjp(n, xs)
  return jnp.moveaxis(s, 0, time_axis).astype(x.dtype)
