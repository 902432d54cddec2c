"""The training objective and the weights' moving average.

Cross-entropy with label smoothing (evaluation and the plain loss), TET's
per-timestep loss (SDT's criterion), and timm's ModelEmaV2 update of the
weights' exponential moving average (`config.ema_decay`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from spikeformer_jax.data import mixup


def cross_entropy(logits, labels, smoothing: float = 0.0):
  """Softmax cross-entropy with label smoothing as timm's (1-s)*y + s/K."""
  targets = mixup.smooth_one_hot(labels, logits.shape[-1], smoothing, logits.dtype)
  return optax.softmax_cross_entropy(logits, targets)


def tet_loss(logits_t, targets, means: float, lamb: float):
  """TET (Deng et al., 2022) as SDT's criterion.py: the cross-entropy of every
  timestep's logits, averaged, plus lamb * MSE of the logits to `means`.
  logits_t: [B, T, classes]; targets: soft targets [B, classes] (timm's
  SoftTargetCrossEntropy, so mixup and smoothing apply)."""
  ce = optax.softmax_cross_entropy(logits_t, targets[:, None]).mean()
  mse = jnp.mean(jnp.square(logits_t - means)) if lamb else 0.0
  return (1.0 - lamb) * ce + lamb * mse


def tet_config(config):
  """`config.tet` when the TET loss is on, else None."""
  tet = config.get('tet')
  return tet if tet is not None and tet.enabled else None


def ema_decay(config) -> float:
  """`config.ema_decay` (0: no EMA of the weights)."""
  return float(config.get('ema_decay', 0.0))


def ema_update(ema, new, decay: float):
  """timm ModelEmaV2: ema = decay * ema + (1 - decay) * new, for params and
  BatchNorm statistics alike. timm writes the float average of the integer
  num_batches_tracked back into its int64 buffer, truncating it (it stays 0
  while (1 - decay) * count < 1)."""

  def average(e, n):
    if jnp.issubdtype(e.dtype, jnp.integer):
      return (decay * e.astype(jnp.float32) + (1.0 - decay) * n.astype(jnp.float32)).astype(e.dtype)
    return decay * e + (1.0 - decay) * n

  return jax.tree.map(average, ema, new)
