"""Optimizer and learning-rate schedule of the official recipes.

The official repositories use timm's `create_optimizer_v2` (AdamW, no weight
decay on 1-D parameters: biases and norm scales) and timm's
`CosineLRScheduler` stepped once per epoch with a non-prefixed warmup,
followed by `cooldown_epochs` at `min_lr`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def timm_cosine_lr(step, *, base_lr: float, steps_per_epoch: int, epochs: int,
                   warmup_epochs: int, warmup_lr: float, min_lr: float,
                   per_epoch: bool = True):
  """timm CosineLRScheduler(t_initial=epochs, warmup_prefix=False), cycle 1.

  t = epoch index (per_epoch, as the official code steps it) or fractional
  epoch. t < warmup: linear from warmup_lr; t < epochs: min_lr + (base - min)
  * (1 + cos(pi t / epochs)) / 2; after (the cooldown epochs): min_lr.
  """
  t = step / steps_per_epoch
  if per_epoch:
    t = jnp.floor(t)
  warm = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_epochs, 1)
  cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * t / epochs))
  return jnp.where(t < warmup_epochs, warm, jnp.where(t < epochs, cos, min_lr))


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int):
  o = cfg.optimizer
  return lambda step: timm_cosine_lr(
      step, base_lr=o.lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
      warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr, min_lr=o.min_lr,
      per_epoch=o.schedule_per_epoch)


def decay_mask(params):
  """Weight decay only on parameters with more than one dimension (timm)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int):
  """Returns (optax transformation, schedule)."""
  o = cfg.optimizer
  schedule = make_schedule(cfg, steps_per_epoch)
  if o.name == 'adamw':
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                     weight_decay=o.weight_decay, mask=decay_mask)
  elif o.name == 'lamb':  # SDT's ImageNet / Gesture recipes (timm Lamb)
    tx = optax.lamb(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                    weight_decay=o.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"optimizer.name={o.name!r}; valid: 'adamw', 'lamb'.")
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, schedule
