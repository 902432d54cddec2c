"""Optimizer and learning-rate schedule of the official recipes.

Spikformer, SDT and the CIFAR recipes of MSViT use timm's `create_optimizer_v2`
(AdamW, no weight decay on 1-D parameters: biases and norm scales) and timm's
`CosineLRScheduler` stepped once per epoch with a non-prefixed warmup,
followed by `cooldown_epochs` at `min_lr` (`optimizer.schedule='timm_cosine'`).
MSViT's and QKFormer's ImageNet trainer is MAE's fine-tuning loop
(`schedule='mae_cosine'`): the lr is set every update, a linear warmup from 0
and a half-cosine to min_lr, the base lr scaled by the effective batch / 256
(`lr_scale_batch`), with gradient accumulation (`accum_steps`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spikeformer_jax import errors


def timm_cosine_lr(
  step,
  *,
  base_lr: float,
  steps_per_epoch: float,
  epochs: int,
  warmup_epochs: int,
  warmup_lr: float,
  min_lr: float,
  per_epoch: bool = True,
):
  """timm CosineLRScheduler(t_initial=epochs, warmup_prefix=False), cycle 1.

  t = epoch index (per_epoch, as the official code steps it) or fractional
  epoch. t < warmup: linear from warmup_lr; t < epochs: min_lr + (base - min)
  * (1 + cos(pi t / epochs)) / 2; after (the cooldown epochs): min_lr.
  """
  t = step / steps_per_epoch
  if per_epoch:
    t = jnp.floor(t)
  # timm's own order of operations, so that float64 replays match to the bit.
  warm = warmup_lr + t * ((base_lr - warmup_lr) / max(warmup_epochs, 1))
  cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * t / epochs))
  return jnp.where(t < warmup_epochs, warm, jnp.where(t < epochs, cos, min_lr))


def mae_cosine_lr(
  step,
  *,
  base_lr: float,
  steps_per_epoch: int,
  epochs: int,
  warmup_epochs: int,
  min_lr: float,
  accum: int = 1,
):
  """MAE's util/lr_sched.adjust_learning_rate (MSViT / QKFormer ImageNet).

  `step` counts optimizer updates, `steps_per_epoch` loader steps (micro-steps
  with accumulation). The lr of an update is set at its first micro-step m =
  step * accum, at the fractional epoch t = (m % steps_per_epoch) /
  steps_per_epoch + m // steps_per_epoch (the official expression). t <
  warmup: base_lr * t / warmup (from 0); then min_lr + (base - min) * (1 +
  cos(pi (t - warmup) / (epochs - warmup))) / 2, held at min_lr past `epochs`.
  """
  m = step * accum
  as_float = lambda n: jnp.asarray(n, jnp.result_type(float))  # float64 under x64, not float32
  t = jnp.minimum(
    as_float(m % steps_per_epoch) / steps_per_epoch + as_float(m // steps_per_epoch), epochs
  )
  warm = base_lr * t / max(warmup_epochs, 1e-12)
  cos = min_lr + (base_lr - min_lr) * 0.5 * (
    1.0 + jnp.cos(math.pi * (t - warmup_epochs) / max(epochs - warmup_epochs, 1e-12))
  )
  return jnp.where(t < warmup_epochs, warm, cos)


SCHEDULES = ('timm_cosine', 'mae_cosine')


def base_lr(cfg: ml_collections.ConfigDict) -> float:
  """optimizer.lr, times (global batch x accum_steps) / 256 if lr_scale_batch."""
  o = cfg.optimizer
  if o.get('lr_scale_batch', False):
    return o.lr * cfg.batch_size * o.get('accum_steps', 1) / 256
  return o.lr


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int, accum: int = 1):
  """lr as a function of the optimizer-update count (`steps_per_epoch`:
  loader steps, `accum` of them per update)."""
  o = cfg.optimizer
  name, lr = o.get('schedule', 'timm_cosine'), base_lr(cfg)
  if name == 'timm_cosine':
    return lambda step: timm_cosine_lr(
      step,
      base_lr=lr,
      steps_per_epoch=steps_per_epoch / accum,
      epochs=cfg.epochs,
      warmup_epochs=o.warmup_epochs,
      warmup_lr=o.warmup_lr,
      min_lr=o.min_lr,
      per_epoch=o.schedule_per_epoch,
    )
  if name == 'mae_cosine':
    return lambda step: mae_cosine_lr(
      step,
      base_lr=lr,
      steps_per_epoch=steps_per_epoch,
      epochs=cfg.epochs,
      warmup_epochs=o.warmup_epochs,
      min_lr=o.min_lr,
      accum=accum,
    )
  raise errors.ConfigError(f'optimizer.schedule={name!r}; valid: {SCHEDULES}.')


def decay_mask(params, reached=None):
  """Weight decay only on parameters with more than one dimension (timm, and
  MAE's param_groups_lrd), and only on those the loss reaches (`reached`: a
  pytree of bools like `params`; None: all). PyTorch gives a parameter the
  forward never touches no gradient, and its optimizers then skip it, decay
  included: the official SDT code's unused `talking_heads` keeps its value."""
  if reached is None:
    return jax.tree.map(lambda p: p.ndim > 1, params)
  return jax.tree.map(lambda p, r: bool(p.ndim > 1 and r), params, reached)


def timm_clip_by_global_norm(max_norm: float, order=None) -> optax.GradientTransformation:
  """timm Lamb's own global-norm clip (timm 0.5 / 0.6 `Lamb.step`).

  timm sums `grad.pow(2).sum()` of each parameter into `torch.zeros(1)`, a
  float32 accumulator whatever the parameters' dtype, in the optimizer's
  parameter order; the float32 norm over float32(max_norm), where it exceeds
  it, divides every gradient (computed in the wider of the gradient's dtype and
  float32). Here the same: each leaf's sum in its own dtype, rounded to
  float32, added in `order`. `order`: sort keys like the updates (a pytree of
  ints, or a function of the updates giving one; a stable sort, so group ids
  keep the tree order within a group); None: the tree order. On float32
  parameters this is optax.clip_by_global_norm up to the order of the sum; on
  float64 ones (the fidelity replays) its float32 rounding is timm's.
  """

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    keys = (
      [0] * len(leaves)
      if order is None
      else jax.tree.leaves(order(updates) if callable(order) else order)
    )
    if len(keys) != len(leaves):
      raise ValueError(f'the clip order has {len(keys)} entries for {len(leaves)} parameters.')
    acc = jnp.zeros((), jnp.float32)
    for i in sorted(range(len(leaves)), key=lambda i: keys[i]):  # static: unrolled under jit
      acc = acc + jnp.sum(jnp.square(leaves[i])).astype(jnp.float32)
    norm, limit = jnp.sqrt(acc), float(np.float32(max_norm))
    # XLA divides by a constant through its rounded reciprocal; in float64
    # (with x64) that rounds to float32's own quotient.
    wide = jnp.promote_types(jnp.float32, jnp.result_type(float))
    divisor = jnp.where(
      norm > limit, (norm.astype(wide) / limit).astype(jnp.float32), jnp.float32(1.0)
    )

    def clip(g):
      wide = jnp.promote_types(g.dtype, jnp.float32)
      return (g.astype(wide) / divisor.astype(wide)).astype(g.dtype)

    return jax.tree.unflatten(treedef, [clip(g) for g in leaves]), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def torch_clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_ (timm's `--clip-grad` in mode 'norm', and
  MAE's loss scaler, MSViT): every gradient times min(max_norm / (norm +
  1e-6), 1), the norm being the 2-norm of the per-parameter 2-norms.

  optax.clip_by_global_norm instead scales by max_norm / norm, without the
  1e-6: about 1e-7 relative apart at a small norm, which a replay at 1e-10
  would show.
  """

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    norms = [jnp.sqrt(jnp.sum(jnp.square(g))) for g in leaves]
    total = jnp.sqrt(sum(jnp.square(n.astype(norms[0].dtype)) for n in norms))
    coef = jnp.minimum(max_norm / (total + 1e-6), 1.0)
    return jax.tree.unflatten(treedef, [(g * coef.astype(g.dtype)) for g in leaves]), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def timm_lamb(
  lr,
  *,
  b1: float,
  b2: float,
  eps: float,
  weight_decay: float,
  mask,
  max_grad_norm: float = 1.0,
  order=None,
):
  """timm's Lamb (0.5/0.6, `create_optimizer_v2(opt='lamb')`), which differs
  from optax.lamb in two ways. It clips the global gradient norm at
  max_grad_norm inside the optimizer (timm_clip_by_global_norm: a float32
  sum in the optimizer's parameter order). And it applies the layer-wise trust
  ratio only to the parameters with weight decay: with timm's no-decay group
  for 1-D parameters, biases and norm scales take plain Adam steps.

  `order`: the official parameter order of the norm's sum (see
  timm_clip_by_global_norm); None: timm's group order, the no-decay group
  (`mask` False) before the decay group, each in our tree order (the official
  order within a group, `named_parameters()`, is known only from an official
  state_dict: the fidelity replay passes it).
  """
  if order is None:
    order = lambda updates: jax.tree.map(int, mask(updates) if callable(mask) else mask)
  trust = optax.masked(optax.scale_by_trust_ratio(), mask) if weight_decay else optax.identity()
  return optax.chain(
    timm_clip_by_global_norm(max_grad_norm, order),
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.add_decayed_weights(weight_decay, mask),
    trust,
    optax.scale_by_learning_rate(lr),
  )


def make_optimizer(
  cfg: ml_collections.ConfigDict, steps_per_epoch: int, reached=None, lamb_order=None
):
  """Returns (optax transformation, schedule of the train-step count).

  With accum_steps = k > 1 the gradients of k consecutive steps are averaged
  into one update (optax.MultiSteps; BatchNorm statistics still move every
  step, as in PyTorch), and the schedule advances once per update.
  `reached`: which parameters the loss reaches (decay_mask). `lamb_order`:
  the official order of Lamb's gradient-norm sum (timm_lamb's `order`).
  """
  o = cfg.optimizer
  k = o.get('accum_steps', 1)
  if k < 1:
    raise errors.ConfigError(f'optimizer.accum_steps={k} must be >= 1.')
  schedule = make_schedule(cfg, steps_per_epoch, k)
  mask = functools.partial(decay_mask, reached=reached)
  if o.name == 'adamw':
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  elif o.name == 'lamb':  # SDT's ImageNet / Gesture recipes (timm Lamb)
    tx = timm_lamb(
      schedule,
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
      mask=mask,
      order=lamb_order,
    )
  else:
    raise errors.ConfigError(f"optimizer.name={o.name!r}; valid: 'adamw', 'lamb'.")
  if o.grad_clip_norm > 0:
    tx = optax.chain(torch_clip_grad_norm(o.grad_clip_norm), tx)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
    return tx, lambda step: schedule(step // k)
  return tx, schedule
