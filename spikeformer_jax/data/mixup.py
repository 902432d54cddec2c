"""Mixup and CutMix on device, as timm's `Mixup` in 'batch' mode.

One mixing coefficient per batch. With probability `prob` the batch is mixed:
CutMix with probability `switch_prob` when both alphas are set, otherwise
mixup. The partner of example i is example B-1-i (timm's `x.flip(0)`). CutMix
pastes a box of area about (1 - lam) and then corrects lam to the pasted area
(`correct_lam`). Targets become smoothed one-hots mixed with the same lam.
After `off_epoch` the batch is left alone, but its targets stay smoothed,
because timm keeps calling the disabled Mixup.

Two differences from timm. The randomness is `jax.random`, keyed by the
training step, so a resumed run draws the same values. And the batch that is
mixed is the global batch, where timm mixes each GPU's own: the pairing
differs, the distribution does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


# Not formatted: its aligned field comments are the config reference
# (docs/gen_config_reference.py reads them).
# fmt: off
def mixup_config(mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, off_epoch: int = 0) -> ml_collections.ConfigDict:
  """`config.mixup`: timm's Mixup / CutMix in batch mode, on device inside the step."""
  return ml_collections.ConfigDict(dict(
      mixup_alpha=mixup_alpha,  # Beta(alpha, alpha) of mixup; 0: off
      cutmix_alpha=cutmix_alpha,  # Beta(alpha, alpha) of CutMix; 0: off
      prob=prob,                # probability that a batch is mixed
      switch_prob=switch_prob,  # with both alphas set: probability of CutMix over mixup
      off_epoch=off_epoch))     # stop mixing from this epoch on; 0: mix until the end
# fmt: on


def active(cfg) -> bool:
  return cfg is not None and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) and cfg.prob > 0


def smooth_one_hot(labels, num_classes: int, smoothing: float, dtype=jnp.float32):
  """timm's one_hot(on = 1 - s + s/K, off = s/K)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=dtype) * (1.0 - smoothing) + off


def cutmix_box(key, height: int, width: int, lam):
  """timm's rand_bbox: a box of side int(side * sqrt(1 - lam)) around a uniform
  centre, clipped to the image; returns (yl, yh, xl, xh) and the corrected lam."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  lam = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)
  return (yl, yh, xl, xh), lam


def mix_batch(key, images, labels, cfg, *, num_classes: int, smoothing: float, enabled=True):
  """(images, soft targets [B, K], lam) of a batch; images [B, ..., H, W, C]
  (an image or T event frames). `enabled`: a traced bool (the off epoch)."""
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  use = enabled & (jax.random.uniform(k_apply) < cfg.prob)
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
  else:
    use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else 1.0
  lam_cut = (
    jax.random.beta(k_cut, cfg.cutmix_alpha, cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else 1.0
  )
  lam = jnp.where(use, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)

  partner = jnp.flip(images, axis=0)
  h, w = images.shape[-3], images.shape[-2]
  (yl, yh, xl, xh), lam_box = cutmix_box(k_box, h, w, lam)
  ys = jnp.arange(h)[:, None, None]
  xs = jnp.arange(w)[None, :, None]
  box = (ys >= yl) & (ys < yh) & (xs >= xl) & (xs < xh)  # [H, W, 1], broadcasts
  cut = jnp.where(box, partner, images)
  mixed = (lam * images + (1.0 - lam) * partner).astype(images.dtype)
  do_cut = use & use_cutmix
  out = jnp.where(do_cut, cut, jnp.where(use, mixed, images))
  lam = jnp.where(do_cut, lam_box, lam)

  y1 = smooth_one_hot(labels, num_classes, smoothing)
  targets = lam * y1 + (1.0 - lam) * jnp.flip(y1, axis=0)
  return out, targets, lam
