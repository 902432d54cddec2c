"""Parameter counts of every variant, shapes, dtypes, config handling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from spikeformer_jax.configs import sdt as sdt_cfgs
from spikeformer_jax.configs import spikformer as cfgs
from spikeformer_jax import models
from spikeformer_jax.models import spikformer


# Spec section 1.4 (official code totals; without the unused modules).
PARAMS = {
  'cifar10-4-384': (9_330_874, 9_324_730),
  'cifar10-4-384-400e': (9_330_874, 9_324_730),
  'cifar100-4-384': (9_365_524, 9_359_380),
  'cifar100-4-384-400e': (9_365_524, 9_359_380),
  'cifar10-4-256': (4_159_274, 4_155_178),
  'cifar10-2-384': (5_768_122, 5_765_050),
  'cifar100-4-256': (4_182_404, 4_178_308),
  'cifar100-2-384': (5_802_772, 5_799_700),
  'imagenet-4-384': (9_707_416, 9_701_272),  # Table 7's source; no Table 2 row
  'imagenet-8-384': (16_828_312, 16_816_024),
  'imagenet-6-512': (23_385_640, 23_373_352),
  'imagenet-8-512': (29_705_768, 29_689_384),
  'imagenet-10-512': (36_025_896, 36_005_416),
  'imagenet-8-768': (66_363_208, 66_338_632),
  'cifar10dvs-2-256': (2_585_610, 2_566_666),
  'dvs128gesture-2-256': (2_585_867, 2_566_923),
  # Table 7: the ImageNet models with a 10 / 100-class head
  'cifar10-transfer-4-384': (9_326_266, 9_320_122),
  'cifar10-transfer-8-384': (16_447_162, 16_434_874),
  'cifar10-transfer-8-512': (29_197_898, 29_181_514),
  'cifar100-transfer-4-384': (9_360_916, 9_354_772),
  'cifar100-transfer-8-384': (16_481_812, 16_469_524),
  'cifar100-transfer-8-512': (29_244_068, 29_227_684),
}


def _count(model_cfg):
  return models.count_params(nnx.eval_shape(lambda: models.build_model(model_cfg)))


# Forwards compiled as one program: op by op, each operation compiles alone
# (several times slower for a whole model).
_forward = nnx.jit(lambda model, x: model(x))


@pytest.mark.parametrize('variant', sorted(PARAMS))
def test_parameter_counts(variant):
  c = cfgs.get_config(variant)
  official, without_dead = PARAMS[variant]
  assert _count(c.model) == without_dead
  c.model.dead_modules = True
  assert _count(c.model) == official


def test_every_variant_is_covered():
  assert set(PARAMS) == set(cfgs._ROWS)


# The README's epoch rule: a run trains epochs + cooldown_epochs; that total is
# the paper's count, except where the official code gives another (MSViT's CIFAR
# yml and Gesture trainer), which the default rows keep.
TOTAL_EPOCHS = {
  'spikformer:cifar10-4-384': 310,  # the yml's 300 + 10 (the paper gives none)
  'spikformer:imagenet-8-512': 310,  # the paper's 310 = the yml's 300 + 10
  'spikformer:imagenet-4-384': 310,
  'spikformer:cifar10dvs-2-256': 106,  # the paper's 106 = the code's 96 + 10
  'spikformer:cifar10dvs-2-256-paper': 106,
  'spikformer:dvs128gesture-2-256-paper': 200,  # the paper's; no official code
  'spikformer:dvs128gesture-2-256': 106,  # the CIFAR10-DVS code's; the paper: 200
  'spikformer:cifar10-4-384-400e': 400,
  'spikformer:cifar100-4-384-400e': 400,
  'spikformer:cifar10-transfer-4-384': 60,
  'spikformer:cifar100-transfer-8-512': 60,
  'msvit:imagenet-10-512': 200,  # MAE's loop, no cooldown
  'msvit:imagenet-10-512-paper': 200,
  'msvit:cifar10dvs-16': 106,
  'msvit:cifar10dvs-10-paper': 106,
  'msvit:dvs128gesture-16-paper': 200,
  'msvit:dvs128gesture-10-paper': 200,
  'msvit:cifar10-4-384': 410,  # cifar10.yml's 400 + 10; the paper: 400
  'msvit:dvs128gesture-16': 202,  # the trainer's 192 + 10; the paper: 200
}


def test_epoch_counts_follow_one_rule():
  from spikeformer_jax.configs import msvit as msvit_cfgs  # pylint: disable=import-outside-toplevel

  modules = {'spikformer': cfgs, 'msvit': msvit_cfgs}
  for key, total in TOTAL_EPOCHS.items():
    family, variant = key.split(':')
    c = modules[family].get_config(variant)
    assert c.epochs + c.cooldown_epochs == total, key


def test_paper_rounding_matches_counts_without_dead_modules():
  # The paper quotes the counts without the unused modules (spec 1.4).
  paper_m = {
    'cifar10-4-256': 4.15,
    'cifar10-2-384': 5.76,
    'cifar10-4-384': 9.32,
    'imagenet-8-384': 16.81,
    'imagenet-6-512': 23.37,
    'imagenet-8-512': 29.68,
    'imagenet-10-512': 36.01,
    'imagenet-8-768': 66.34,
    'cifar10dvs-2-256': 2.57,
  }
  for v, m in paper_m.items():
    assert abs(PARAMS[v][1] / 1e6 - m) <= 0.011, v


@pytest.mark.parametrize(
  'flavour,shape,tokens',
  [('cifar', (2, 16, 16, 3), 16), ('imagenet', (2, 32, 32, 3), 4), ('dvs', (2, 2, 32, 32, 2), 4)],
)
def test_forward_shapes_and_finite(flavour, shape, tokens):
  mc = spikformer.model_config(
    flavour, embed_dim=32, depth=1, num_heads=2, T=2, num_classes=7, img_size=shape[-2]
  )
  model = models.build_model(mc)
  x = jax.random.normal(jax.random.key(0), shape)
  y = _forward(model, x)
  assert y.shape == (2, 7) and y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()
  feats = _forward(
    model.patch_embed,
    jnp.broadcast_to(x[:, None], (2, 2) + shape[1:]).reshape((4,) + shape[-3:])
    if x.ndim == 4
    else x.reshape((4,) + shape[2:]),
  )
  assert feats.shape == (4, tokens, 32)


def test_bfloat16_compute_keeps_float32_params_and_stats():
  mc = spikformer.model_config(
    'cifar', embed_dim=32, depth=1, num_heads=2, T=2, num_classes=10, img_size=16
  )
  mc.dtype = 'bfloat16'
  model = models.build_model(mc)
  y = _forward(model, jnp.ones((2, 16, 16, 3)))
  assert y.dtype == jnp.float32
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  bs = nnx.state(model, nnx.BatchStat)
  assert {leaf.dtype for leaf in jax.tree.leaves(bs)} == {jnp.dtype('float32'), jnp.dtype('int32')}
  assert model.patch_embed.proj_conv(jnp.ones((1, 16, 16, 3))).dtype == jnp.bfloat16


def test_attention_order_does_not_change_the_function():
  base = spikformer.model_config(
    'cifar', embed_dim=32, depth=1, num_heads=2, T=2, num_classes=10, img_size=16
  )
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  outs = []
  for order in ('qk_first', 'kv_first'):
    base.attn_order = order
    outs.append(np.asarray(_forward(models.build_model(base), x)))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match='unknown variant'):
    cfgs.get_config('cifar10-9-999')
  with pytest.raises(ValueError, match='runlocal'):
    cfgs.get_config('digits,fast')
  c = cfgs.get_config('digits')
  with pytest.raises(AttributeError, match='Did you mean'):
    c.lock()
    c.model.embed_dims = 3  # typo: locked configs reject it
  mc = spikformer.model_config('cifar', embed_dim=36, depth=1, num_heads=5, T=2)
  with pytest.raises(ValueError, match='divisible'):
    models.build_model(mc)
  mc = spikformer.model_config('cifar')
  mc.neuron.surrogate = 'tanh'
  with pytest.raises(ValueError, match='surrogate'):
    models.build_model(mc)
  mc = spikformer.model_config('cifar')
  mc.dtype = 'float16'
  with pytest.raises(ValueError, match='model.dtype'):
    models.build_model(mc)


def test_every_config_variant_builds_with_runlocal():
  for v in ['digits'] + sorted(cfgs._ROWS):
    c = cfgs.get_config(v + ',runlocal')
    assert isinstance(c, ml_collections.ConfigDict)
    assert _count(c.model) > 0


def test_digits_default_size():
  assert _count(cfgs.get_config('digits').model) == 113_026  # as the config docstring says


# Spec section 2.4: SDT code totals (with the unused talking_heads Conv1d, h*h
# per block) and without them.
SDT_PARAMS = {
  ('cifar', 512, 2, 10, 32): 10_233_546,
  ('cifar', 512, 2, 100, 32): 10_279_716,
  ('cifar', 256, 2, 10, 32): 2_567_082,
  ('cifar10dvs', 256, 2, 10, 64): 2_566_794,
  ('gesture', 256, 2, 11, 128): 2_567_051,
  ('imagenet', 384, 8, 1000, 224): 16_816_536,
  ('imagenet', 512, 6, 1000, 224): 23_373_736,
  ('imagenet', 512, 8, 1000, 224): 29_689_896,
  ('imagenet', 512, 10, 1000, 224): 36_006_056,
  ('imagenet', 768, 8, 1000, 224): 66_339_144,
}


@pytest.mark.parametrize('key', sorted(SDT_PARAMS))
def test_sdt_parameter_counts(key):
  from spikeformer_jax.models import sdt

  ds, dim, depth, classes, img = key
  mc = sdt.model_config(ds, embed_dim=dim, depth=depth, num_classes=classes, img_size=img)
  mc.dead_modules = True
  assert _count(mc) == SDT_PARAMS[key]
  mc.dead_modules = False
  assert _count(mc) == SDT_PARAMS[key] - depth * 8 * 8


def test_every_sdt_config_matches_the_closed_form():
  """Spec 2.4: SPS(c_in, D) + depth * (12 D^2 + 24 D + h^2) + D n + n (official)."""
  for v in sdt_cfgs.VARIANTS:
    m = sdt_cfgs.get_config(v).model
    m.dead_modules = True
    D, c, h, n = m.embed_dim, m.in_channels, m.num_heads, m.num_classes
    sps = (
      9 * c * D // 8
      + 9 * (D * D // 32 + D * D // 8 + D * D // 2 + D * D)
      + 2 * (D // 8 + D // 4 + D // 2 + 2 * D)
    )
    assert _count(m) == sps + m.depth * (12 * D * D + 24 * D + h * h) + D * n + n, v
