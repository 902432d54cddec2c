"""Tests for spikeformer_jax.data.augment (host-side NumPy + Pillow augmentation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from spikeformer_jax.data import augment as A

BICUBIC = Image.Resampling.BICUBIC
NEAREST = Image.Resampling.NEAREST


def _img(seed=0, h=24, w=24, c=3):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _rng(seed=0):
  return np.random.default_rng(seed)


def _op(name, magnitude, **hp):
  hparams = dict(img_mean=(10, 20, 30), interpolation=BICUBIC, translate_const=250)
  hparams.update(hp)
  return A.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)


def _apply(op, img, seed=0):
  return A._from_pil(op(A._to_pil(img), _rng(seed)))


# ------------------------------------------------------------------ crop, flip, eval


@pytest.mark.parametrize('c', [1, 3])
def test_random_resized_crop_identity(c):
  img = _img(1, 32, 32, c)
  for seed in range(3):
    out = A.random_resized_crop(img, _rng(seed), 32, scale=(1, 1), ratio=(1, 1))
    assert out.dtype == np.uint8 and out.shape == (32, 32, c)
    np.testing.assert_array_equal(out, img)


def test_random_resized_crop_shape_determinism():
  img = _img(2, 40, 56)
  a = A.random_resized_crop(img, _rng(5), 24)
  b = A.random_resized_crop(img, _rng(5), 24)
  c = A.random_resized_crop(img, _rng(6), 24)
  assert a.shape == (24, 24, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # 'random' interpolation works and is seeded too.
  r1 = A.random_resized_crop(img, _rng(7), 24, interpolation='random')
  np.testing.assert_array_equal(r1, A.random_resized_crop(img, _rng(7), 24, interpolation='random'))
  with pytest.raises(ValueError, match='bicubic'):
    A.random_resized_crop(img, _rng(0), 24, interpolation='cubic')


def test_random_resized_crop_is_a_crop_in_bounds():
  # Pixel values encode their coordinates; a 16x16 crop resized to 16 (nearest)
  # must be exactly img[i:i+16, j:j+16] for some in-bounds (i, j).
  yy, xx = np.mgrid[0:32, 0:32]
  img = np.stack([yy * 7, xx * 7, np.zeros_like(yy)], -1).astype(np.uint8)
  offsets = set()
  for seed in range(20):
    out = A.random_resized_crop(
      img, _rng(seed), 16, scale=(0.25, 0.25), ratio=(1, 1), interpolation='nearest'
    )
    i, j = out[0, 0, 0] // 7, out[0, 0, 1] // 7
    assert 0 <= i <= 16 and 0 <= j <= 16
    np.testing.assert_array_equal(out, img[i : i + 16, j : j + 16])
    offsets.add((int(i), int(j)))
  assert len(offsets) > 5  # uniform offsets, not always the same


def test_random_resized_crop_fallback_central_crop():
  # ratio >= 3 never fits a square image: 10 failures, then timm's fallback
  # clamps to min(ratio): width 20, height round(20 / 3) = 7, centred (top 6).
  img = _img(3, 20, 20)
  out = A.random_resized_crop(img, _rng(0), 10, scale=(1, 1), ratio=(3, 4))
  expect = np.asarray(Image.fromarray(img).crop((0, 6, 20, 13)).resize((10, 10), BICUBIC))
  np.testing.assert_array_equal(out, expect)


def test_hflip():
  img = _img(4, 8, 10)
  np.testing.assert_array_equal(A.hflip(img, _rng(0), p=1.0), img[:, ::-1])
  np.testing.assert_array_equal(A.hflip(img, _rng(0), p=0.0), img)
  frames = _rng(1).random((3, 6, 7, 2)).astype(np.float32)
  out = A.hflip(frames, _rng(0), p=1.0)
  assert out.shape == frames.shape and out.dtype == np.float32
  np.testing.assert_array_equal(out, frames[:, :, ::-1, :])
  flips = sum(not np.array_equal(A.hflip(img, _rng(s)), img) for s in range(200))
  assert 70 < flips < 130  # p = 0.5


def test_eval_resize_crop():
  img = _img(5, 32, 32)
  np.testing.assert_array_equal(A.eval_resize_crop(img, 32, 1.0), img)
  # 48x64 (HxW), size 32, crop_pct 0.875: shorter side -> floor(32/0.875) = 36,
  # long side int(36 * 64 / 48) = 48, then the central 32x32 at (top 2, left 8).
  img = _img(6, 48, 64)
  out = A.eval_resize_crop(img, 32, 0.875)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  resized = np.asarray(Image.fromarray(img).resize((48, 36), BICUBIC))
  np.testing.assert_array_equal(out, resized[2:34, 8:40])
  # crop_pct 1 on a bigger image: resize only the short side to 32, crop centre.
  img = _img(7, 32, 40, 1)
  out = A.eval_resize_crop(img, 32, 1.0)
  np.testing.assert_array_equal(out, img[:, 4:36])


# ------------------------------------------------------------------ RandAugment parsing


def test_rand_augment_spec_cifar():
  ra = A.rand_augment('rand-m9-n1-mstd0.4-inc1', img_mean=(0.4914, 0.4822, 0.4465))
  assert ra.num_layers == 1 and ra.choice_weights is None
  names = [op.name for op in ra.ops]
  assert names == list(A._RAND_INCREASING_TRANSFORMS) and len(names) == 15
  assert {'PosterizeIncreasing', 'SolarizeIncreasing', 'ColorIncreasing'} <= set(names)
  assert 'Posterize' not in names
  for op in ra.ops:
    assert op.magnitude == 9 and op.magnitude_std == 0.4 and op.prob == 0.5
    assert op.magnitude_max is None
    assert op.fillcolor == (125, 123, 114)  # round(255 * mean)
    assert op.resample == BICUBIC


def test_rand_augment_spec_variants():
  ra = A.rand_augment('rand-m9-mstd0.5-inc1')
  assert ra.num_layers == 2 and ra.ops[0].magnitude == 9 and ra.ops[0].magnitude_std == 0.5
  assert ra.ops[0].fillcolor == (128, 128, 128)
  ra = A.rand_augment('rand-m7-mstd0.5-inc1')
  assert ra.ops[0].magnitude == 7
  ra = A.rand_augment('rand-m9-mstd0.5')  # no inc: timm's plain set
  assert [op.name for op in ra.ops] == list(A._RAND_TRANSFORMS)
  ra = A.rand_augment('rand-mstd101-mmax20-p0.3-w0', interpolation='random')
  op = ra.ops[0]
  assert op.magnitude == 10 and op.magnitude_std == float('inf') and op.magnitude_max == 20
  assert op.prob == 0.3 and op.resample == A._RANDOM_INTERPOLATION
  w = dict(zip(A._RAND_TRANSFORMS, ra.choice_weights))
  assert math.isclose(sum(ra.choice_weights), 1.0)
  assert math.isclose(w['Rotate'] / w['ShearX'], 1.5) and w['Invert'] == 0
  # timm tests bool() of the string, so 'inc0' selects the increasing set too.
  assert A.rand_augment('rand-m9-inc0').ops[4].name == 'PosterizeIncreasing'


@pytest.mark.parametrize('spec', ['rand-m9-x3', 'rand-m9-foo', 'auto-m9', 'rand-m9-', 'rand-w1'])
def test_rand_augment_bad_specs(spec):
  with pytest.raises(ValueError):
    A.rand_augment(spec)


def test_rand_augment_bad_op_set_names_choices():
  with pytest.raises(ValueError, match="spikformer_cifar.*timm"):
    A.rand_augment('rand-m9', op_set='imagenet')
  with pytest.raises(ValueError, match='mstd'):
    A.rand_augment('rand-m9-q2')


def test_spikformer_cifar_op_set_draws_only_its_five_ops():
  five = ['Equalize', 'Rotate', 'ShearX', 'TranslateXRel', 'TranslateYRel']
  for spec in ('rand-m9-n1-mstd0.4-inc1', 'rand-m9-n1-mstd0.4'):
    ra = A.rand_augment(spec, op_set='spikformer_cifar')
    assert [op.name for op in ra.ops] == five and ra.num_layers == 1
  rng = _rng(0)
  drawn = [op.name for _ in range(300) for op in ra.choose(rng)]
  assert set(drawn) == set(five)
  counts = np.array([drawn.count(n) for n in five])
  assert counts.min() > 30  # uniform: 60 each on average
  # and it runs end to end
  out = ra(_img(8, 16, 16), _rng(1))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


@pytest.mark.parametrize('c', [1, 3])
def test_rand_augment_apply_shapes_determinism(c):
  ra = A.rand_augment('rand-m9-mstd0.5-inc1')
  img = _img(9, 20, 20, c)
  outs = [ra(img, _rng(s)) for s in range(6)]
  for o in outs:
    assert o.shape == img.shape and o.dtype == np.uint8
  np.testing.assert_array_equal(outs[0], ra(img, _rng(0)))
  assert len({o.tobytes() for o in outs}) > 3
  np.testing.assert_array_equal(img, _img(9, 20, 20, c))  # input untouched


def test_rand_augment_magnitude_zero_geometric_identity():
  hp = dict(img_mean=(0, 0, 0), interpolation=BICUBIC)
  ops = [
    A.AugmentOp(n, prob=1.0, magnitude=0, hparams=hp)
    for n in ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
  ]
  ra = A.RandAugment(ops, num_layers=3)
  img = _img(10, 16, 16)
  for s in range(5):
    np.testing.assert_array_equal(ra(img, _rng(s)), img)


# ------------------------------------------------------------------ each op


def test_ops_colour_against_pil():
  img = _img(11, 16, 16)
  pil = Image.fromarray(img)
  np.testing.assert_array_equal(_apply(_op('Equalize', 9), img), np.asarray(ImageOps.equalize(pil)))
  np.testing.assert_array_equal(
    _apply(_op('AutoContrast', 9), img), np.asarray(ImageOps.autocontrast(pil))
  )
  np.testing.assert_array_equal(_apply(_op('Invert', 9), img), 255 - img)
  # SolarizeIncreasing: threshold 256 - 256 * m / 10.
  np.testing.assert_array_equal(_apply(_op('SolarizeIncreasing', 10), img), 255 - img)
  np.testing.assert_array_equal(_apply(_op('SolarizeIncreasing', 0), img), img)
  np.testing.assert_array_equal(
    _apply(_op('Solarize', 5), img), np.where(img >= 128, 255 - img, img)
  )
  # SolarizeAdd: +int(110 * m / 10) below 128.
  np.testing.assert_array_equal(
    _apply(_op('SolarizeAdd', 10), img),
    np.where(img < 128, np.minimum(255, img.astype(int) + 110), img),
  )
  # PosterizeIncreasing keeps 4 - int(4 * m / 10) bits: 4 at m0, 0 (black) at m10.
  np.testing.assert_array_equal(_apply(_op('PosterizeIncreasing', 0), img), img & 0xF0)
  np.testing.assert_array_equal(_apply(_op('PosterizeIncreasing', 10), img), np.zeros_like(img))
  np.testing.assert_array_equal(_apply(_op('PosterizeIncreasing', 9), img), img & 0x80)


@pytest.mark.parametrize(
  'name,enh',
  [
    ('ColorIncreasing', ImageEnhance.Color),
    ('ContrastIncreasing', ImageEnhance.Contrast),
    ('BrightnessIncreasing', ImageEnhance.Brightness),
    ('SharpnessIncreasing', ImageEnhance.Sharpness),
  ],
)
def test_ops_enhance_increasing(name, enh):
  img = _img(12, 16, 16)
  pil = Image.fromarray(img)
  np.testing.assert_array_equal(_apply(_op(name, 0), img), img)  # factor 1.0
  # m10: factor 1 +- 0.9, by the random sign.
  both = [np.asarray(enh(pil).enhance(f)) for f in (1.9, 0.1)]
  seen = set()
  for s in range(8):
    out = _apply(_op(name, 10), img, seed=s)
    match = [k for k, e in enumerate(both) if np.array_equal(out, e)]
    assert match, name
    seen.add(match[0])
  assert seen == {0, 1}


def test_op_rotate():
  img = _img(13, 33, 33)
  pil = Image.fromarray(img)
  # the helper turns counter-clockwise like PIL: 90 deg == np.rot90
  np.testing.assert_array_equal(
    A._from_pil(A.rotate(pil, 90, fillcolor=(0, 0, 0), resample=BICUBIC)), np.rot90(img)
  )
  # level: m / 10 * 30 deg, random sign; clipped at m = 10 unless mmax.
  for m, deg in ((10, 30.0), (5, 15.0), (20, 30.0)):
    expect = {
      s: np.asarray(pil.rotate(s * deg, resample=BICUBIC, fillcolor=(10, 20, 30))) for s in (1, -1)
    }
    signs = set()
    for seed in range(6):
      out = _apply(_op('Rotate', m), img, seed)
      match = [s for s, e in expect.items() if np.array_equal(out, e)]
      assert match, (m, seed)
      signs.add(match[0])
      np.testing.assert_array_equal(out[0, 0], (10, 20, 30))  # corner is fill
    assert signs == {1, -1}
  out = _apply(_op('Rotate', 20, magnitude_max=20), img)
  assert any(
    np.array_equal(out, np.asarray(pil.rotate(s * 60.0, resample=BICUBIC, fillcolor=(10, 20, 30))))
    for s in (1, -1)
  )


def test_op_shear_x():
  img = _img(14, 12, 12)
  pil = Image.fromarray(img)
  # PIL affine (1, f, 0, 0, 1, 0), nearest: out[y, x] = in[y, floor(x + .5 + f (y + .5))].
  out = A._from_pil(A.shear_x(pil, 0.3, fillcolor=(1, 2, 3), resample=NEAREST))
  for y in range(12):
    for x in range(12):
      xs = math.floor(x + 0.5 + 0.3 * (y + 0.5))
      expect = img[y, xs] if xs < 12 else (1, 2, 3)
      np.testing.assert_array_equal(out[y, x], expect)
  # level: factor m / 10 * 0.3 with a random sign.
  both = [
    np.asarray(A.shear_x(pil, f, fillcolor=(10, 20, 30), resample=BICUBIC)) for f in (0.27, -0.27)
  ]
  outs = [_apply(_op('ShearX', 9), img, s) for s in range(6)]
  assert all(any(np.array_equal(o, e) for e in both) for o in outs)
  assert not np.array_equal(both[0], img)


@pytest.mark.parametrize('m', [10, 0])
def test_op_translate_rel(m):
  # m10: 0.45 * 20 = 9 px; integer shifts are exact even with bicubic.
  img = _img(15, 20, 20)
  fill = np.array([10, 20, 30], np.uint8)
  px = int(round(0.45 * 20 * m / 10))
  for seed in range(4):
    out = _apply(_op('TranslateXRel', m), img, seed)
    left = np.array_equal(out[:, : 20 - px], img[:, px:])  # (1, 0, +px): content moves left
    right = np.array_equal(out[:, px:], img[:, : 20 - px])
    assert left or right
    if px:
      assert np.all((out[:, 20 - px :] if left else out[:, :px]) == fill)
    out = _apply(_op('TranslateYRel', m), img, seed)
    up = np.array_equal(out[: 20 - px], img[px:])
    down = np.array_equal(out[px:], img[: 20 - px])
    assert up or down


def test_ops_grayscale_fill():
  img = _img(16, 12, 12, 1)
  out = _apply(_op('Rotate', 10), img)
  assert out.shape == (12, 12, 1) and out[0, 0, 0] == 10  # first entry of img_mean


def test_magnitude_noise_is_seeded_and_clipped():
  op = A.AugmentOp(
    'Rotate',
    prob=1.0,
    magnitude=9,
    hparams=dict(img_mean=(0, 0, 0), interpolation=BICUBIC, magnitude_std=0.5),
  )
  img = _img(17, 17, 17)
  a, b = _apply(op, img, 3), _apply(op, img, 3)
  np.testing.assert_array_equal(a, b)
  assert len({_apply(op, img, s).tobytes() for s in range(6)}) > 4  # noisy magnitudes
  # prob: about half of the calls do nothing.
  op = A.AugmentOp('Invert', prob=0.5, magnitude=9)
  same = sum(np.array_equal(_apply(op, img, s), img) for s in range(200))
  assert 70 < same < 130


# ------------------------------------------------------------------ random erasing


def _erased_box(out):
  zero = np.all(out == 0, axis=-1)
  ys, xs = np.nonzero(zero)
  return zero, ys, xs


def test_random_erasing_const_area_fraction():
  x = np.ones((40, 40, 3), np.float32) * 0.5
  np.testing.assert_array_equal(A.random_erasing(x, _rng(0), prob=0.0), x)
  fracs = []
  for seed in range(40):
    out = A.random_erasing(x, _rng(seed), prob=1.0)
    assert out.shape == x.shape and out.dtype == np.float32
    zero, ys, xs = _erased_box(out)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert zero.sum() == h * w  # one solid rectangle of zeros
    assert np.all(out[~zero] == 0.5)
    # h, w are rounded from the target, so allow half a pixel on each side.
    tol = 0.5 * (h + w) / x[..., 0].size + 1e-9
    frac = h * w / x[..., 0].size
    assert 0.02 - tol <= frac <= 1 / 3 + tol
    assert 0.3 - 1.0 / min(h, w) <= h / w <= 1 / 0.3 + 1.0 / min(h, w)
    fracs.append(frac)
  assert np.ptp(fracs) > 0.1  # areas spread over the range
  np.testing.assert_array_equal(x, 0.5)  # input untouched


def test_random_erasing_modes():
  x = np.full((32, 32, 3), 5.0, np.float32)
  out = A.random_erasing(x, _rng(1), prob=1.0, mode='rand')
  region = out[np.any(out != 5.0, axis=-1)]
  assert len(region) > 0
  assert np.all(region == region[0])  # one colour per channel for the whole box
  assert len(set(region[0].tolist())) == 3
  out = A.random_erasing(x, _rng(1), prob=1.0, mode='pixel')
  region = out[np.any(out != 5.0, axis=-1)]
  assert len(np.unique(region[:, 0])) == len(region)  # per-pixel normals
  assert abs(region.mean()) < 0.5 and 0.6 < region.std() < 1.4
  with pytest.raises(ValueError, match='pixel'):
    A.random_erasing(x, _rng(0), prob=1.0, mode='noise')
  a = A.random_erasing(x, _rng(2), prob=1.0, mode='pixel')
  np.testing.assert_array_equal(a, A.random_erasing(x, _rng(2), prob=1.0, mode='pixel'))
  assert not np.array_equal(a, A.random_erasing(x, _rng(3), prob=1.0, mode='pixel'))


def test_random_erasing_count():
  x = np.ones((48, 48, 1), np.float32)
  totals = []
  for seed in range(20):
    out = A.random_erasing(x, _rng(seed), prob=1.0, count=3, max_area=0.3)
    totals.append((out == 0).mean())
  # n boxes of area/n each: the union never exceeds max_area (plus rounding).
  assert max(totals) <= 0.3 + 0.05 and min(totals) > 0


# ------------------------------------------------------------------ DVS frames


def _frames(seed=0, t=4, h=16, w=16):
  base = np.random.default_rng(seed).random((h, w, 2)).astype(np.float32) + 0.1
  return base, np.stack([base * (k + 1) for k in range(t)])


def test_snn_ops_by_hand():
  base, fr = _frames(1)
  np.testing.assert_array_equal(A._snn_apply_op(fr, 'Identity', 0.0), fr)
  out = A._snn_apply_op(fr, 'TranslateX', 3.7)  # int(3.7) = 3 px to the right
  np.testing.assert_array_equal(out[:, :, 3:], fr[:, :, :-3])
  assert np.all(out[:, :, :3] == 0)
  out = A._snn_apply_op(fr, 'TranslateY', -2.0)  # 2 px up
  np.testing.assert_array_equal(out[:, :-2], fr[:, 2:])
  assert np.all(out[:, -2:] == 0)
  out = A._snn_apply_op(fr, 'Rotate', 90.0)  # counter-clockwise, exact on a grid
  np.testing.assert_array_equal(out, np.rot90(fr, 1, axes=(1, 2)))
  # ShearX m: x_src = x + tan(m) * (y - (H - 1) / 2), nearest, zeros outside.
  out = A._snn_apply_op(fr, 'ShearX', 0.3)
  expect = np.zeros_like(fr)
  for y in range(16):
    for x in range(16):
      xs = int(np.rint(x + math.tan(0.3) * (y - 7.5)))
      if 0 <= xs < 16:
        expect[:, y, x] = fr[:, y, xs]
  np.testing.assert_array_equal(out, expect)
  assert (out == 0).sum() > 0


def test_snn_wide_params_space():
  rng = _rng(0)
  draws = [A._snn_wide_params(rng) for _ in range(1200)]
  names = [n for n, _ in draws]
  assert set(names) == {'Identity', 'ShearX', 'TranslateX', 'TranslateY', 'Rotate', 'Cutout'}
  assert min(names.count(n) for n in set(names)) > 150  # uniform: 200 each
  tx = sorted({int(m) for n, m in draws if n == 'TranslateX'})
  assert tx == list(range(-5, 6))
  sh = [m for n, m in draws if n == 'ShearX']
  assert max(abs(v) for v in sh) <= 0.3 + 1e-6 and min(sh) < -0.25 and max(sh) > 0.25
  rot = [m for n, m in draws if n == 'Rotate']
  assert max(abs(v) for v in rot) <= 30 + 1e-4 and min(rot) < -25 and max(rot) > 25
  assert all(m == 0.0 for n, m in draws if n == 'Identity')


def test_snn_augment_wide_same_transform_every_timestep():
  base, fr = _frames(2)
  changed = 0
  for seed in range(40):
    out = A.snn_augment_wide(fr, _rng(seed))
    assert out.shape == fr.shape and out.dtype == np.float32
    for k in range(fr.shape[0]):  # frame k is (k + 1) * frame 0: same spatial map
      np.testing.assert_allclose(out[k], out[0] * (k + 1), rtol=1e-6)
    changed += not np.array_equal(out, fr)
    np.testing.assert_array_equal(out, A.snn_augment_wide(fr, _rng(seed)))
  assert 25 < changed < 40  # Identity is 1 of 6 ops (plus zero-magnitude draws)


def test_snn_augment_wide_cutout_branch():
  fr = np.ones((3, 32, 32, 2), np.float32)
  sides = []
  for seed in range(300):
    rng = _rng(seed)
    name, _ = A._snn_wide_params(np.random.default_rng(seed))
    if name != 'Cutout':
      continue
    out = A.snn_augment_wide(fr, rng)
    zero = out == 0
    assert np.all(zero == zero[:1, :, :, :1])  # same box at every step and polarity
    ys, xs = np.nonzero(zero[0, :, :, 0])
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert h == w and zero[0, :, :, 0].sum() == h * w  # a square (ratio 1)
    assert 0.001 * 1024 - h <= h * w <= 0.11 * 1024 + h
    sides.append(h)
  assert len(sides) > 20 and max(sides) >= 9 and min(sides) <= 4


def test_cutout_clipped_square():
  fr = np.ones((3, 24, 24, 2), np.float32)
  clipped = unclipped = 0
  for seed in range(60):
    out = A.cutout(fr, _rng(seed), n_holes=1, length=8)
    assert out.shape == fr.shape and out.dtype == np.float32
    zero = out == 0
    assert np.all(zero == zero[:1, :, :, :1])  # one mask for all steps and channels
    z = zero[0, :, :, 0]
    ys, xs = np.nonzero(z)
    y1, y2, x1, x2 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    assert z.sum() == (y2 - y1) * (x2 - x1)  # a solid rectangle
    for lo, hi in ((y1, y2), (x1, x2)):
      if lo > 0 and hi < 24:
        assert hi - lo == 8  # length//2 either side of the centre
      else:
        assert hi - lo <= 8  # clipped at a border
    if (y2 - y1, x2 - x1) == (8, 8):
      unclipped += 1
    else:
      clipped += 1
    assert np.all(out[~zero] == 1)
  assert clipped > 5 and unclipped > 5
  a = A.cutout(fr, _rng(7), n_holes=2, length=6)
  np.testing.assert_array_equal(a, A.cutout(fr, _rng(7), n_holes=2, length=6))
  assert not np.array_equal(a, A.cutout(fr, _rng(8), n_holes=2, length=6))


def test_cutout_centre_and_clip_exact():
  # The centre is (rng.integers(H), rng.integers(W)); rows clip(y -+ 8, 0, H).
  fr = np.ones((2, 20, 20, 2), np.float32)
  for seed in range(10):
    r = _rng(seed)
    y, x = int(r.integers(20)), int(r.integers(20))
    expect = np.ones((20, 20), np.float32)
    expect[max(y - 8, 0) : min(y + 8, 20), max(x - 8, 0) : min(x + 8, 20)] = 0
    out = A.cutout(fr, _rng(seed), length=16)
    np.testing.assert_array_equal(out, fr * expect[:, :, None])
