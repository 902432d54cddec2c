"""Host-side, per-example augmentation in NumPy + Pillow, as the official recipes.

Each function follows one original file:

  * `random_resized_crop`: timm `data/transforms.py`
    `RandomResizedCropAndInterpolation` (get_params, then PIL crop + resize).
  * `hflip`: torchvision `RandomHorizontalFlip` (W axis; also event frames).
  * `eval_resize_crop`: timm `transforms_factory.transforms_imagenet_eval`
    (torchvision `Resize(floor(size / crop_pct))` + `CenterCrop(size)` on PIL).
  * `AugmentOp`, `RandAugment`, `rand_augment`: timm `data/auto_augment.py`
    as of timm 0.5.4-0.6.12 (the versions the recipes ran): the PIL ops, their
    level functions, `_LEVEL_DENOM`, magnitude noise (`mstd`, `mmax`) and
    `rand_augment_transform`'s parser ('p' from later timm). op_set
    'spikformer_cifar' is Spikformer's `cifar10/aa_snn.py`, a copy of timm
    0.5.4 whose op lists are cut to Equalize, Rotate, ShearX, TranslateXRel,
    TranslateYRel (same ops, same level functions). Fill colour and
    interpolation are set as timm's `transforms_imagenet_train` sets them.
  * `random_erasing`: timm `data/random_erasing.py` `RandomErasing._erase`.
  * `snn_augment_wide`: Spikformer `cifar10dvs/autoaugment.py` `SNNAugmentWide`
    on float tensors, i.e. torchvision's tensor `affine` / `rotate` (grid
    sample, nearest, zeros outside) and, for Cutout, torchvision
    `RandomErasing(p=1, scale=(0.001, 0.11), ratio=(1, 1))`, value 0.
  * `cutout`: Spike-Driven-Transformer `dvs_utils/dvs_augment.py` `Cutout`.

Deliberate differences:
  * Randomness comes from an explicit `np.random.Generator`, not Python
    `random` / `np.random` / `torch` global state, so an output is a pure
    function of the seed. The random streams differ from the originals; the
    distributions, the order of the draws and the maths do not.
  * Images are uint8 HWC arrays (event frames float [T, H, W, 2]), channels
    last, where the originals hold PIL images or [T, C, H, W] tensors.
  * Posterize to 0 bits (PosterizeIncreasing at magnitude 10) gives a black
    image, as the Pillow of the time did; current Pillow (13) raises instead.
  * Single-channel images ('L') take the first entry of the fill colour.
  * An unparsable section of a RandAugment spec raises ValueError; timm skips
    sections without digits and asserts on unknown keys.
Where the originals compute in float32 (torchvision grids), so does this code;
only exact rounding ties could come out differently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from spikeformer_jax import errors

_PIL_INTERP = {
  'nearest': Image.Resampling.NEAREST,
  'bilinear': Image.Resampling.BILINEAR,
  'bicubic': Image.Resampling.BICUBIC,
  'box': Image.Resampling.BOX,
  'hamming': Image.Resampling.HAMMING,
  'lanczos': Image.Resampling.LANCZOS,
}
# timm's 'random' interpolation: one of these, chosen per call.
_RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def _interp(name):
  """PIL resampling filter (or timm's random pair) for an interpolation name."""
  if name == 'random':
    return _RANDOM_INTERPOLATION
  if name not in _PIL_INTERP:
    raise errors.ConfigError(
      f'unknown interpolation {name!r}; valid: {sorted(_PIL_INTERP) + ["random"]}'
    )
  return _PIL_INTERP[name]


def _pick(resample, rng):
  """timm's `random.choice` over a tuple of filters; a single filter as is."""
  if isinstance(resample, (tuple, list)):
    return resample[int(rng.integers(len(resample)))]
  return resample


def _to_pil(img: np.ndarray) -> Image.Image:
  """uint8 [H, W, 1|3] -> PIL 'L' | 'RGB'."""
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise ValueError(f'expected a uint8 [H, W, 1|3] image, got {img.dtype} {img.shape}')
  if img.shape[-1] == 1:
    return Image.fromarray(np.ascontiguousarray(img[..., 0]), mode='L')
  return Image.fromarray(np.ascontiguousarray(img), mode='RGB')


def _from_pil(pil: Image.Image) -> np.ndarray:
  """PIL -> uint8 [H, W, C] (a fresh array)."""
  out = np.asarray(pil, dtype=np.uint8)
  return out[..., None] if out.ndim == 2 else out.copy()


# ------------------------------------------------------------------ crops, flip


def _rrc_params(img_h: int, img_w: int, rng, scale, ratio):
  """timm RandomResizedCropAndInterpolation.get_params -> (top, left, h, w)."""
  area = img_w * img_h
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    target_w = int(round(math.sqrt(target_area * aspect_ratio)))
    target_h = int(round(math.sqrt(target_area / aspect_ratio)))
    if target_w <= img_w and target_h <= img_h:
      # random.randint is inclusive of its upper end.
      i = int(rng.integers(0, img_h - target_h + 1))
      j = int(rng.integers(0, img_w - target_w + 1))
      return i, j, target_h, target_w
  # Fallback to the central crop, clamped to the ratio range.
  in_ratio = img_w / img_h
  if in_ratio < min(ratio):
    target_w = img_w
    target_h = int(round(target_w / min(ratio)))
  elif in_ratio > max(ratio):
    target_h = img_h
    target_w = int(round(target_h * max(ratio)))
  else:
    target_w, target_h = img_w, img_h
  return (img_h - target_h) // 2, (img_w - target_w) // 2, target_h, target_w


def random_resized_crop(
  img: np.ndarray,
  rng: np.random.Generator,
  size: int,
  scale=(0.08, 1.0),
  ratio=(3 / 4, 4 / 3),
  interpolation: str = 'bicubic',
) -> np.ndarray:
  """timm RandomResizedCropAndInterpolation: uint8 [H, W, C] -> [size, size, C].

  A full-image crop at the output size is returned unchanged (PIL's resize to
  the same size is a copy), so scale=(1, 1), ratio=(1, 1) is the identity on a
  size x size image.
  """
  resample = _interp(interpolation)
  i, j, h, w = _rrc_params(img.shape[0], img.shape[1], rng, scale, ratio)
  resample = _pick(resample, rng)  # timm chooses after get_params
  pil = _to_pil(img).crop((j, i, j + w, i + h)).resize((size, size), resample)
  return _from_pil(pil)


def hflip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """torchvision RandomHorizontalFlip: flips W with probability p.

  W is axis -2 for channels-last arrays (an HWC image, event frames
  [T, H, W, 2]) and axis -1 for a 2-D [H, W] array. Returns the input itself
  when not flipped.
  """
  if rng.random() < p:  # torch.rand(1) < p
    return np.flip(img, axis=-1 if img.ndim == 2 else -2).copy()
  return img


def eval_resize_crop(
  img: np.ndarray, size: int, crop_pct: float, interpolation: str = 'bicubic'
) -> np.ndarray:
  """timm eval: Resize shorter side to floor(size / crop_pct), CenterCrop size.

  torchvision semantics on PIL: the long side becomes int(scale * long /
  short), a shorter side already at the target is left alone, the crop offset
  is round((H - size) / 2), and a too-small image is zero-padded first.
  """
  resample = _interp(interpolation)
  if isinstance(resample, tuple):
    raise errors.ConfigError(
      "data.augment.interpolation='random' is for training only, and evaluation resizes "
      f'these images (to {size}, crop_pct {crop_pct}); set it to bicubic or bilinear.'
    )
  scale_size = int(math.floor(size / crop_pct))
  h, w = img.shape[:2]
  pil = _to_pil(img)
  short, long = (w, h) if w <= h else (h, w)
  if short != scale_size:
    new_short, new_long = scale_size, int(scale_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    pil = pil.resize((new_w, new_h), resample)
  out = _from_pil(pil)
  ih, iw = out.shape[:2]
  if size > ih or size > iw:  # torchvision center_crop pads with 0 first
    pad_t = (size - ih) // 2 if size > ih else 0
    pad_l = (size - iw) // 2 if size > iw else 0
    pad_b = (size - ih + 1) // 2 if size > ih else 0
    pad_r = (size - iw + 1) // 2 if size > iw else 0
    out = np.pad(out, ((pad_t, pad_b), (pad_l, pad_r), (0, 0)))
    ih, iw = out.shape[:2]
  top = int(round((ih - size) / 2.0))
  left = int(round((iw - size) / 2.0))
  return np.ascontiguousarray(out[top : top + size, left : left + size])


# ------------------------------------------------------------------ RandAugment

_FILL = (128, 128, 128)
_LEVEL_DENOM = 10.0  # 'Mx' magnitude -> fractional level for op arguments
_HPARAMS_DEFAULT = dict(translate_const=250, img_mean=_FILL)


def _fill_for(img: Image.Image, fillcolor):
  """The fill for the image's mode ('L' takes the first entry of a tuple)."""
  if img.mode == 'L' and isinstance(fillcolor, (tuple, list)):
    return fillcolor[0]
  return fillcolor


def _affine(img, data, fillcolor, resample, rng):
  """PIL AFFINE transform (output pixel -> input pixel), as timm's ops."""
  return img.transform(
    img.size,
    Image.Transform.AFFINE,
    data,
    resample=_pick(resample, rng),
    fillcolor=_fill_for(img, fillcolor),
  )


def shear_x(img, factor, *, fillcolor=_FILL, resample=Image.Resampling.BILINEAR, rng=None):
  """timm shear_x: out(x, y) = in(x + factor * y, y)."""
  return _affine(img, (1, factor, 0, 0, 1, 0), fillcolor, resample, rng)


def shear_y(img, factor, *, fillcolor=_FILL, resample=Image.Resampling.BILINEAR, rng=None):
  """timm shear_y: out(x, y) = in(x, y + factor * x)."""
  return _affine(img, (1, 0, 0, factor, 1, 0), fillcolor, resample, rng)


def translate_x_rel(img, pct, *, fillcolor=_FILL, resample=Image.Resampling.BILINEAR, rng=None):
  """timm translate_x_rel: out(x) = in(x + pct * W)."""
  pixels = pct * img.size[0]
  return _affine(img, (1, 0, pixels, 0, 1, 0), fillcolor, resample, rng)


def translate_y_rel(img, pct, *, fillcolor=_FILL, resample=Image.Resampling.BILINEAR, rng=None):
  """timm translate_y_rel: out(y) = in(y + pct * H)."""
  pixels = pct * img.size[1]
  return _affine(img, (1, 0, 0, 0, 1, pixels), fillcolor, resample, rng)


def translate_x_abs(img, pixels, *, fillcolor=_FILL, resample=Image.Resampling.BILINEAR, rng=None):
  """timm translate_x_abs: out(x) = in(x + pixels)."""
  return _affine(img, (1, 0, pixels, 0, 1, 0), fillcolor, resample, rng)


def translate_y_abs(img, pixels, *, fillcolor=_FILL, resample=Image.Resampling.BILINEAR, rng=None):
  """timm translate_y_abs: out(y) = in(y + pixels)."""
  return _affine(img, (1, 0, 0, 0, 1, pixels), fillcolor, resample, rng)


def rotate(img, degrees, *, fillcolor=_FILL, resample=Image.Resampling.BILINEAR, rng=None):
  """timm rotate: PIL rotate, counter-clockwise degrees about the centre."""
  return img.rotate(degrees, resample=_pick(resample, rng), fillcolor=_fill_for(img, fillcolor))


def auto_contrast(img, **_):
  """ImageOps.autocontrast."""
  return ImageOps.autocontrast(img)


def invert(img, **_):
  """ImageOps.invert."""
  return ImageOps.invert(img)


def equalize(img, **_):
  """ImageOps.equalize."""
  return ImageOps.equalize(img)


def solarize(img, thresh, **_):
  """ImageOps.solarize: invert pixels >= thresh."""
  return ImageOps.solarize(img, thresh)


def solarize_add(img, add, thresh=128, **_):
  """timm solarize_add: min(255, i + add) for pixels below thresh."""
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  if img.mode in ('L', 'RGB'):
    if img.mode == 'RGB':
      lut = lut * 3
    return img.point(lut)
  return img


def posterize(img, bits_to_keep, **_):
  """ImageOps.posterize, keeping the top `bits_to_keep` bits."""
  if bits_to_keep >= 8:
    return img
  if bits_to_keep < 1:
    # Old Pillow masked with ~(2**8 - 1) = 0, i.e. a black image; Pillow 13
    # raises for bits 0, so apply that mask directly.
    return img.point([0] * 256 * len(img.getbands()))
  return ImageOps.posterize(img, bits_to_keep)


def contrast(img, factor, **_):
  """ImageEnhance.Contrast (1.0: unchanged)."""
  return ImageEnhance.Contrast(img).enhance(factor)


def color(img, factor, **_):
  """ImageEnhance.Color (1.0: unchanged)."""
  return ImageEnhance.Color(img).enhance(factor)


def brightness(img, factor, **_):
  """ImageEnhance.Brightness (1.0: unchanged)."""
  return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img, factor, **_):
  """ImageEnhance.Sharpness (1.0: unchanged)."""
  return ImageEnhance.Sharpness(img).enhance(factor)


def _randomly_negate(v, rng):
  """With 50% prob, negate the value (timm: random.random() > 0.5)."""
  return -v if rng.random() > 0.5 else v


def _rotate_level_to_arg(level, _hparams, rng):
  return (_randomly_negate((level / _LEVEL_DENOM) * 30.0, rng),)  # [-30, 30]


def _enhance_level_to_arg(level, _hparams, rng):
  return ((level / _LEVEL_DENOM) * 1.8 + 0.1,)  # [0.1, 1.9]


def _enhance_increasing_level_to_arg(level, _hparams, rng):
  # 'No change' is 1.0; moving towards 0.1 or 1.9 strengthens the op.
  level = (level / _LEVEL_DENOM) * 0.9
  return (max(0.1, 1.0 + _randomly_negate(level, rng)),)


def _shear_level_to_arg(level, _hparams, rng):
  return (_randomly_negate((level / _LEVEL_DENOM) * 0.3, rng),)  # [-0.3, 0.3]


def _translate_abs_level_to_arg(level, hparams, rng):
  return (_randomly_negate((level / _LEVEL_DENOM) * float(hparams['translate_const']), rng),)


def _translate_rel_level_to_arg(level, hparams, rng):
  translate_pct = hparams.get('translate_pct', 0.45)  # [-0.45, 0.45]
  return (_randomly_negate((level / _LEVEL_DENOM) * translate_pct, rng),)


def _posterize_level_to_arg(level, _hparams, rng=None):
  return (int((level / _LEVEL_DENOM) * 4),)  # keep 0..4 bits, milder with level


def _posterize_increasing_level_to_arg(level, hparams, rng):
  return (4 - _posterize_level_to_arg(level, hparams)[0],)  # keep 4..0 bits


def _posterize_original_level_to_arg(level, _hparams, rng):
  return (int((level / _LEVEL_DENOM) * 4) + 4,)  # keep 4..8 bits


def _solarize_level_to_arg(level, _hparams, rng=None):
  return (int((level / _LEVEL_DENOM) * 256),)  # threshold 0..256, milder with level


def _solarize_increasing_level_to_arg(level, hparams, rng):
  return (256 - _solarize_level_to_arg(level, hparams)[0],)


def _solarize_add_level_to_arg(level, _hparams, rng):
  return (int((level / _LEVEL_DENOM) * 110),)  # [0, 110]


LEVEL_TO_ARG = {
  'AutoContrast': None,
  'Equalize': None,
  'Invert': None,
  'Rotate': _rotate_level_to_arg,
  'Posterize': _posterize_level_to_arg,
  'PosterizeIncreasing': _posterize_increasing_level_to_arg,
  'PosterizeOriginal': _posterize_original_level_to_arg,
  'Solarize': _solarize_level_to_arg,
  'SolarizeIncreasing': _solarize_increasing_level_to_arg,
  'SolarizeAdd': _solarize_add_level_to_arg,
  'Color': _enhance_level_to_arg,
  'ColorIncreasing': _enhance_increasing_level_to_arg,
  'Contrast': _enhance_level_to_arg,
  'ContrastIncreasing': _enhance_increasing_level_to_arg,
  'Brightness': _enhance_level_to_arg,
  'BrightnessIncreasing': _enhance_increasing_level_to_arg,
  'Sharpness': _enhance_level_to_arg,
  'SharpnessIncreasing': _enhance_increasing_level_to_arg,
  'ShearX': _shear_level_to_arg,
  'ShearY': _shear_level_to_arg,
  'TranslateX': _translate_abs_level_to_arg,
  'TranslateY': _translate_abs_level_to_arg,
  'TranslateXRel': _translate_rel_level_to_arg,
  'TranslateYRel': _translate_rel_level_to_arg,
}

# Signatures differ (the level arguments): each op is called with its level_fn's.
NAME_TO_OP: dict[str, Callable[..., Image.Image]] = {
  'AutoContrast': auto_contrast,
  'Equalize': equalize,
  'Invert': invert,
  'Rotate': rotate,
  'Posterize': posterize,
  'PosterizeIncreasing': posterize,
  'PosterizeOriginal': posterize,
  'Solarize': solarize,
  'SolarizeIncreasing': solarize,
  'SolarizeAdd': solarize_add,
  'Color': color,
  'ColorIncreasing': color,
  'Contrast': contrast,
  'ContrastIncreasing': contrast,
  'Brightness': brightness,
  'BrightnessIncreasing': brightness,
  'Sharpness': sharpness,
  'SharpnessIncreasing': sharpness,
  'ShearX': shear_x,
  'ShearY': shear_y,
  'TranslateX': translate_x_abs,
  'TranslateY': translate_y_abs,
  'TranslateXRel': translate_x_rel,
  'TranslateYRel': translate_y_rel,
}

# timm's standard sets ('Cutout' is random erasing, applied separately).
_RAND_TRANSFORMS = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'Posterize',
  'Solarize',
  'SolarizeAdd',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateXRel',
  'TranslateYRel',
)
_RAND_INCREASING_TRANSFORMS = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'PosterizeIncreasing',
  'SolarizeIncreasing',
  'SolarizeAdd',
  'ColorIncreasing',
  'ContrastIncreasing',
  'BrightnessIncreasing',
  'SharpnessIncreasing',
  'ShearX',
  'ShearY',
  'TranslateXRel',
  'TranslateYRel',
)
# Spikformer cifar10/aa_snn.py: both lists cut to the same five geometric ops.
_SPIKFORMER_CIFAR_TRANSFORMS = ('Equalize', 'Rotate', 'ShearX', 'TranslateXRel', 'TranslateYRel')

# op_set -> (plain list, increasing list).
OP_SETS = {
  'timm': (_RAND_TRANSFORMS, _RAND_INCREASING_TRANSFORMS),
  'spikformer_cifar': (_SPIKFORMER_CIFAR_TRANSFORMS, _SPIKFORMER_CIFAR_TRANSFORMS),
}

# timm's 'w0' weights, keyed by the plain names. timm 0.5/0.6 look them up in
# the plain list even under inc1, i.e. by position, which is what is done here.
_RAND_CHOICE_WEIGHTS_0 = {
  'Rotate': 0.3,
  'ShearX': 0.2,
  'ShearY': 0.2,
  'TranslateXRel': 0.1,
  'TranslateYRel': 0.1,
  'Color': 0.025,
  'Sharpness': 0.025,
  'AutoContrast': 0.025,
  'Solarize': 0.005,
  'SolarizeAdd': 0.005,
  'Contrast': 0.005,
  'Brightness': 0.005,
  'Equalize': 0.005,
  'Posterize': 0,
  'Invert': 0,
}

_GEOMETRIC: set[Callable[..., Image.Image]] = {
  shear_x,
  shear_y,
  translate_x_rel,
  translate_y_rel,
  translate_x_abs,
  translate_y_abs,
  rotate,
}


class AugmentOp:
  """timm AugmentOp: one named PIL op, applied with probability `prob`.

  hparams as timm's: img_mean (fill), interpolation (a PIL filter, or a tuple
  to pick from per call; default timm's random bilinear/bicubic),
  translate_const, translate_pct, magnitude_std (inf: uniform in [0, m]),
  magnitude_max (upper clip, default _LEVEL_DENOM).
  """

  def __init__(
    self, name: str, prob: float = 0.5, magnitude: float = 10, hparams: dict | None = None
  ):
    if name not in NAME_TO_OP:
      raise errors.ConfigError(f'unknown op {name!r}; valid: {sorted(NAME_TO_OP)}')
    hparams = hparams or _HPARAMS_DEFAULT
    self.name = name
    self.aug_fn = NAME_TO_OP[name]
    self.level_fn = LEVEL_TO_ARG[name]
    self.prob = prob
    self.magnitude = magnitude
    self.hparams = dict(hparams)
    self.fillcolor = hparams.get('img_mean', _FILL)
    self.resample = hparams.get('interpolation', _RANDOM_INTERPOLATION)
    self.magnitude_std = self.hparams.get('magnitude_std', 0)
    self.magnitude_max = self.hparams.get('magnitude_max', None)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """PIL image in, PIL image out (draws: apply?, magnitude, sign, filter)."""
    if self.prob < 1.0 and rng.random() > self.prob:
      return img
    magnitude = self.magnitude
    if self.magnitude_std > 0:
      if self.magnitude_std == float('inf'):
        magnitude = rng.uniform(0, magnitude)
      else:
        magnitude = rng.normal(magnitude, self.magnitude_std)
    # timm clips to [0, _LEVEL_DENOM] unless mmax raises the bound.
    upper_bound = self.magnitude_max or _LEVEL_DENOM
    magnitude = max(0.0, min(magnitude, upper_bound))
    level_args = self.level_fn(magnitude, self.hparams, rng) if self.level_fn else ()
    if self.aug_fn in _GEOMETRIC:
      return self.aug_fn(
        img, *level_args, fillcolor=self.fillcolor, resample=self.resample, rng=rng
      )
    return self.aug_fn(img, *level_args)

  def __repr__(self):
    s = f'AugmentOp(name={self.name}, p={self.prob}, m={self.magnitude}, mstd={self.magnitude_std}'
    return s + (f', mmax={self.magnitude_max})' if self.magnitude_max is not None else ')')


class RandAugment:
  """timm RandAugment: `num_layers` ops drawn per image, then applied in order.

  Draws with replacement, or without when `choice_weights` is given (timm).
  """

  def __init__(self, ops: list, num_layers: int = 2, choice_weights=None):
    self.ops = list(ops)
    self.num_layers = num_layers
    self.choice_weights = None if choice_weights is None else np.asarray(choice_weights)

  def choose(self, rng: np.random.Generator) -> list:
    """The ops for one image (timm's np.random.choice)."""
    idx = rng.choice(
      len(self.ops), self.num_layers, replace=self.choice_weights is None, p=self.choice_weights
    )
    return [self.ops[i] for i in idx]

  def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 1|3] in, uint8 [H, W, 1|3] out."""
    pil = _to_pil(img)
    for op in self.choose(rng):
      pil = op(pil, rng)
    return _from_pil(pil)

  def __repr__(self):
    return f'RandAugment(n={self.num_layers}, ops=[' + ', '.join(map(repr, self.ops)) + '])'


_SPEC_KEYS = ('m', 'n', 'mstd', 'mmax', 'inc', 'w', 'p')


def rand_augment(
  spec: str,
  op_set: str = 'timm',
  img_mean: Sequence[float] = (0.5, 0.5, 0.5),
  interpolation: str = 'bicubic',
  translate_const: int = 250,
) -> RandAugment:
  """timm rand_augment_transform for a spec like 'rand-m9-n1-mstd0.4-inc1'.

  Sections: m (magnitude, default 10), n (ops per image, default 2), mstd
  (magnitude std; > 100 means uniform in [0, m]), mmax (magnitude clip), inc
  (increasing-severity ops; as in timm, any value, even 'inc0', selects them,
  because timm tests bool() of the string), w (weight set, only 0: weighted
  choice without replacement), p (per-op probability, default 0.5; later
  timm). op_set: 'timm' or 'spikformer_cifar'. hparams as timm's
  transforms_imagenet_train: img_mean -> fill round(255 * mean), the train
  interpolation ('random': bilinear or bicubic per op), translate_const (timm's
  factory passes int(0.45 * img_size); only TranslateX/Y (absolute) use it,
  and neither op set has them).
  """
  if op_set not in OP_SETS:
    raise errors.ConfigError(f'unknown op_set {op_set!r}; valid: {sorted(OP_SETS)}')
  sections = spec.split('-')
  if sections[0] != 'rand':
    raise errors.ConfigError(
      f"RandAugment spec must start with 'rand', got {spec!r}; e.g. "
      f"'rand-m9-n1-mstd0.4-inc1' (sections {', '.join(_SPEC_KEYS)}, each "
      "followed by a number), or '' for none"
    )
  hparams = dict(
    translate_const=translate_const, img_mean=tuple(min(255, round(255 * x)) for x in img_mean)
  )
  hparams['interpolation'] = _interp(interpolation)
  magnitude, num_layers, weight_idx, prob, increasing = _LEVEL_DENOM, 2, None, 0.5, False
  for section in sections[1:]:
    cs = re.split(r'(\d.*)', section)
    key, val = (cs[0], cs[1]) if len(cs) >= 2 else (section, '')
    if key not in _SPEC_KEYS or not val:
      raise errors.ConfigError(
        f'unknown RandAugment spec section {section!r} in {spec!r}; '
        f'valid keys (each followed by a number): {list(_SPEC_KEYS)}'
      )
    if key == 'mstd':
      mstd = float(val)
      # setdefault, as timm: the first occurrence wins.
      hparams.setdefault('magnitude_std', float('inf') if mstd > 100 else mstd)
    elif key == 'mmax':
      hparams.setdefault('magnitude_max', int(val))
    elif key == 'inc':
      increasing = bool(val)  # timm: bool of the string, so 'inc0' is True too
    elif key == 'm':
      magnitude = int(val)
    elif key == 'n':
      num_layers = int(val)
    elif key == 'w':
      weight_idx = int(val)
    elif key == 'p':
      prob = float(val)
  plain, inc = OP_SETS[op_set]
  names = inc if increasing else plain
  ops = [AugmentOp(name, prob=prob, magnitude=magnitude, hparams=hparams) for name in names]
  choice_weights = None
  if weight_idx is not None:
    if weight_idx != 0:
      raise errors.ConfigError(f'unknown RandAugment weight set w{weight_idx}; valid: w0')
    w = np.array([_RAND_CHOICE_WEIGHTS_0[k] for k in plain], dtype=np.float64)
    choice_weights = w / w.sum()
  return RandAugment(ops, num_layers, choice_weights=choice_weights)


# ------------------------------------------------------------------ random erasing


def random_erasing(
  x: np.ndarray,
  rng: np.random.Generator,
  prob: float,
  mode: str = 'const',
  min_area: float = 0.02,
  max_area: float = 1 / 3,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  count: int = 1,
) -> np.ndarray:
  """timm RandomErasing on one normalised float [H, W, C] image.

  With probability `prob`, erases randint(1, count) boxes (area per box scaled
  by 1/n), each from 10 attempts with uniform area and log-uniform aspect.
  mode 'const': zeros; 'rand': one normal value per channel; 'pixel': per-pixel
  normals. Never modifies the input (returns it as is when nothing is erased).
  """
  mode = mode.lower()
  if mode not in ('', 'const', 'rand', 'pixel'):
    raise errors.ConfigError(
      f"unknown random erasing mode {mode!r}; valid: ['const', 'rand', 'pixel']"
    )
  # timm: random() > prob skips; >= makes prob=0 exactly the identity.
  if rng.random() >= prob:
    return x
  x = np.array(x, copy=True)
  img_h, img_w, chan = x.shape
  area = img_h * img_w
  max_aspect = max_aspect or 1 / min_aspect
  log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
  n = int(rng.integers(1, count + 1)) if count > 1 else count
  for _ in range(n):
    for _ in range(10):
      target_area = rng.uniform(min_area, max_area) * area / n
      aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < img_w and h < img_h:
        top = int(rng.integers(0, img_h - h + 1))
        left = int(rng.integers(0, img_w - w + 1))
        if mode == 'pixel':
          fill: np.ndarray | int = rng.standard_normal((h, w, chan), dtype=np.float32)
        elif mode == 'rand':
          fill = rng.standard_normal((1, 1, chan), dtype=np.float32)
        else:
          fill = 0
        x[top : top + h, left : left + w] = fill
        break
  return x


# ------------------------------------------------------------------ DVS frames


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace in float32 (CPU kernel: from the start for the first half,
  from the end for the rest), so that int() of a magnitude matches torch."""
  s, e = np.float32(start), np.float32(end)
  step = (e - s) / np.float32(steps - 1)
  half = steps // 2
  return np.array(
    [
      s + step * np.float32(i) if i < half else e - step * np.float32(steps - i - 1)
      for i in range(steps)
    ],
    dtype=np.float32,
  )


def _inverse_affine_matrix(center, angle, translate, scale, shear):
  """torchvision functional._get_inverse_affine_matrix (inverted=True)."""
  rot = math.radians(angle)
  sx, sy = [math.radians(s) for s in shear]
  cx, cy = center
  tx, ty = translate
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  matrix = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
  matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
  matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
  matrix[2] += cx
  matrix[5] += cy
  return matrix


def _grid_sample_nearest(frames: np.ndarray, matrix) -> np.ndarray:
  """torchvision _FT.affine/rotate on a float tensor: _gen_affine_grid, then
  grid_sample(nearest, zeros padding, align_corners=False), in float32.

  frames [..., H, W, C]; the same grid for every leading index (timestep)."""
  h, w = frames.shape[-3], frames.shape[-2]
  theta = np.asarray(matrix, dtype=np.float32).reshape(2, 3)
  xs = _torch_linspace_f32(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, w)
  ys = _torch_linspace_f32(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, h)
  base = np.empty((h, w, 3), dtype=np.float32)
  base[..., 0] = xs[None, :]
  base[..., 1] = ys[:, None]
  base[..., 2] = 1
  rescaled = theta.T / np.array([0.5 * w, 0.5 * h], dtype=np.float32)
  grid = base.reshape(-1, 3) @ rescaled  # [H*W, 2], normalised (x, y)
  one, two = np.float32(1), np.float32(2)
  ix = ((grid[:, 0] + one) * np.float32(w) - one) / two  # align_corners=False
  iy = ((grid[:, 1] + one) * np.float32(h) - one) / two
  ix = np.rint(ix).astype(np.int64)  # nearbyint: round half to even
  iy = np.rint(iy).astype(np.int64)
  valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  flat = frames.reshape(frames.shape[:-3] + (h * w, frames.shape[-1]))
  out = np.zeros_like(flat)
  src = iy[valid] * w + ix[valid]
  out[..., valid, :] = flat[..., src, :]
  return out.reshape(frames.shape)


def _snn_apply_op(frames: np.ndarray, op_name: str, magnitude: float) -> np.ndarray:
  """Spikformer cifar10dvs/autoaugment.py _apply_op for the SNNAugmentWide ops,
  on float frames [..., H, W, C] (torchvision tensor path, centre (0, 0))."""
  if op_name == 'Identity':
    return frames
  if op_name == 'ShearX':
    m = _inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 0.0], 1.0, [math.degrees(magnitude), 0.0])
  elif op_name == 'ShearY':
    m = _inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 0.0], 1.0, [0.0, math.degrees(magnitude)])
  elif op_name == 'TranslateX':
    m = _inverse_affine_matrix([0.0, 0.0], 0.0, [float(int(magnitude)), 0.0], 1.0, [0.0, 0.0])
  elif op_name == 'TranslateY':
    m = _inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, float(int(magnitude))], 1.0, [0.0, 0.0])
  elif op_name == 'Rotate':
    # F.rotate passes -angle: positive angles turn counter-clockwise.
    m = _inverse_affine_matrix([0.0, 0.0], -magnitude, [0.0, 0.0], 1.0, [0.0, 0.0])
  else:
    valid = ['Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate']
    raise errors.ConfigError(f'unknown SNNAugmentWide op {op_name!r}; valid: {valid}')
  return _grid_sample_nearest(frames, m)


def _tv_random_erasing(
  frames: np.ndarray, rng, p=1.0, scale=(0.001, 0.11), ratio=(1, 1), value=0.0
) -> np.ndarray:
  """torchvision RandomErasing(p, scale, ratio, value) on [..., H, W, C]: one box
  for all leading indices and channels; unchanged after 10 failed attempts."""
  if rng.random() >= p:  # torch.rand(1) < p erases
    return frames
  img_h, img_w = frames.shape[-3], frames.shape[-2]
  area = img_h * img_w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    erase_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(erase_area * aspect_ratio)))
    w = int(round(math.sqrt(erase_area / aspect_ratio)))
    if not (h < img_h and w < img_w):
      continue
    i = int(rng.integers(0, img_h - h + 1))
    j = int(rng.integers(0, img_w - w + 1))
    out = np.array(frames, copy=True)
    out[..., i : i + h, j : j + w, :] = value
    return out
  return frames


_SNN_NUM_BINS = 31
# SNNAugmentWide._augmentation_space: (name, magnitudes or None, signed).
_SNN_WIDE_SPACE = (
  ('Identity', None, False),
  ('ShearX', _torch_linspace_f32(-0.3, 0.3, _SNN_NUM_BINS), True),
  ('TranslateX', _torch_linspace_f32(-5.0, 5.0, _SNN_NUM_BINS), True),
  ('TranslateY', _torch_linspace_f32(-5.0, 5.0, _SNN_NUM_BINS), True),
  ('Rotate', _torch_linspace_f32(-30.0, 30.0, _SNN_NUM_BINS), True),
  ('Cutout', _torch_linspace_f32(1.0, 30.0, _SNN_NUM_BINS), True),  # magnitude unused
)


def _snn_wide_params(rng: np.random.Generator):
  """SNNAugmentWide.forward's draws: op uniformly, a magnitude bin, a sign."""
  name, magnitudes, signed = _SNN_WIDE_SPACE[int(rng.integers(len(_SNN_WIDE_SPACE)))]
  magnitude = 0.0
  if magnitudes is not None:
    magnitude = float(magnitudes[int(rng.integers(len(magnitudes)))])
  if signed and rng.integers(2):
    magnitude *= -1.0
  return name, magnitude


def snn_augment_wide(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Spikformer SNNAugmentWide on event frames [T, H, W, 2] (float).

  One of Identity, ShearX (+-0.3, as tan of the angle), TranslateX/Y (+-5 px,
  int-truncated), Rotate (+-30 deg), Cutout (torchvision RandomErasing p=1,
  scale 0.001-0.11, square, zeros), uniformly; magnitudes from 31 bins with a
  random sign. Nearest sampling, zeros outside; the same transform for every
  timestep and polarity.
  """
  name, magnitude = _snn_wide_params(rng)
  if name == 'Cutout':
    return _tv_random_erasing(frames, rng, p=1.0, scale=(0.001, 0.11), ratio=(1, 1))
  return _snn_apply_op(frames, name, magnitude)


def cutout(
  frames: np.ndarray, rng: np.random.Generator, n_holes: int = 1, length: int = 16
) -> np.ndarray:
  """SDT Cutout on [..., H, W, C] (event frames [T, H, W, 2]).

  Each hole: centre (y, x) uniform over the pixels, rows clip(y -+ length//2,
  0, H) (likewise columns), so a length x length square (even length) clipped
  at the borders; multiplied by 0 at every timestep and channel. SDT applies it
  to the whole [N, T, C, H, W] batch at once, i.e. one mask for the batch; pass
  a batch here to get that, or one example for a per-example mask.
  """
  h, w = frames.shape[-3], frames.shape[-2]
  mask = np.ones((h, w), dtype=frames.dtype)
  for _ in range(n_holes):
    y = int(rng.integers(h))
    x = int(rng.integers(w))
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0
  return frames * mask[:, :, None]
