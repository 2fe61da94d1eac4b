"""Training augmentations beyond crop and flip, in NumPy and Pillow, like timm's.

Per example (inside `Preprocess.train`, seeded by the example's `np.random.Generator`):
  `RandAugment`: N ops drawn from one table, at magnitude M of 10, on the uint8 image.
  `random_erase`: one rectangle of the normalised image replaced by per-pixel normal noise.
Per batch (inside the grain pipeline, seeded by (seed, step)):
  `Mixing`: mixup / cutmix in timm's batch mode (one lambda per batch, every example mixed with
  the batch reversed), giving mixed one-hot targets 'label_probs'.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Batch = dict[str, np.ndarray]


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _fill(image: Image.Image):
  return 128 if image.mode == 'L' else (128,) * len(image.getbands())


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix,
                         resample=Image.Resampling.BILINEAR, fillcolor=_fill(image))


def _enhance(enhancer) -> Callable:
  return lambda image, v, rng: enhancer(image).enhance(1.8 * v + 0.1)


# op(image, v = magnitude / 10, rng) -> image. Arguments follow timm's RandAugment ('rand-m9'):
# rotate up to +-30 degrees, shear up to +-0.3, translate up to +-45% of the size, enhance
# factors 0.1..1.9, posterize to 4..8 bits, solarize above threshold 256 * v; fill grey 128.
RAND_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    'identity': lambda image, v, rng: image,
    'autocontrast': lambda image, v, rng: ImageOps.autocontrast(image),
    'equalize': lambda image, v, rng: ImageOps.equalize(image),
    'rotate': lambda image, v, rng: image.rotate(
        _signed(30 * v, rng), resample=Image.Resampling.BILINEAR, fillcolor=_fill(image)),
    'solarize': lambda image, v, rng: ImageOps.solarize(image, int(256 * v)),
    'color': _enhance(ImageEnhance.Color),
    'posterize': lambda image, v, rng: ImageOps.posterize(image, int(4 * v) + 4),
    'contrast': _enhance(ImageEnhance.Contrast),
    'brightness': _enhance(ImageEnhance.Brightness),
    'sharpness': _enhance(ImageEnhance.Sharpness),
    'shear_x': lambda image, v, rng: _affine(image, (1, _signed(0.3 * v, rng), 0, 0, 1, 0)),
    'shear_y': lambda image, v, rng: _affine(image, (1, 0, 0, _signed(0.3 * v, rng), 1, 0)),
    'translate_x': lambda image, v, rng: _affine(
        image, (1, 0, _signed(0.45 * v, rng) * image.size[0], 0, 1, 0)),
    'translate_y': lambda image, v, rng: _affine(
        image, (1, 0, 0, 0, 1, _signed(0.45 * v, rng) * image.size[1])),
}


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """`num_ops` ops drawn uniformly (with replacement) from RAND_OPS, each applied with
  probability `prob` at `magnitude` (0..10; with `magnitude_std` > 0, redrawn per op from a
  normal around it and clipped to 0..10, like timm's 'mstd')."""
  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  prob: float = 0.5

  @classmethod
  def parse(cls, spec: str) -> RandAugment:
    """Parses timm's spelling 'rand-m9-n2[-mstd0.5][-p0.5]' (order free; defaults n2 p0.5)."""
    parts = spec.split('-')
    names = {'m': 'magnitude', 'n': 'num_ops', 'mstd': 'magnitude_std', 'p': 'prob'}
    matches = [re.fullmatch(r'(mstd|m|n|p)(\d+(?:\.\d*)?)', part) for part in parts[1:]]
    if parts[0] != 'rand' or not all(matches):
      raise ValueError(f"randaugment {spec!r}: expected e.g. 'rand-m9-n2', 'rand-m9-mstd0.5', "
                       "'rand-m9-n2-p1.0'")
    kwargs = {names[m[1]]: (int if m[1] == 'n' else float)(m[2]) for m in matches}
    return cls(**kwargs)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Augments an HWC uint8 image of 1 or 3 channels; same shape and dtype."""
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    ops = list(RAND_OPS.values())
    for _ in range(self.num_ops):
      op = ops[rng.integers(len(ops))]
      if rng.random() >= self.prob:
        continue
      magnitude = self.magnitude
      if self.magnitude_std > 0:
        magnitude = float(np.clip(rng.normal(magnitude, self.magnitude_std), 0, 10))
      pil = op(pil, magnitude / 10, rng)
    out = np.asarray(pil)
    return out[..., None] if squeeze else out


def random_erase(image: np.ndarray, rng: np.random.Generator, prob: float,
                 area=(0.02, 1 / 3), min_aspect: float = 0.3) -> np.ndarray:
  """timm's RandomErasing (mode 'pixel', one box) on a normalised HWC float image.

  With probability `prob`, a rectangle of `area` fraction (uniform) and aspect ratio in
  [min_aspect, 1 / min_aspect] (log-uniform) gets standard normal noise per pixel and channel;
  10 tries to fit it inside the image, else the image is returned unchanged.
  """
  if rng.random() >= prob:
    return image
  height, width, channels = image.shape
  log_ratio = (math.log(min_aspect), -math.log(min_aspect))
  for _ in range(10):
    target_area = rng.uniform(*area) * height * width
    aspect = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if 0 < w < width and 0 < h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      image = image.copy()
      image[top:top + h, left:left + w] = rng.standard_normal((h, w, channels), np.float32)
      return image
  return image


def image_keys(batch: Batch) -> list[str]:
  """'image' and the extra views 'image_view1', ... of a batch."""
  return [k for k in batch if k == 'image' or k.startswith('image_view')]


@dataclasses.dataclass(frozen=True)
class Mixing:
  """timm's Mixup in batch mode, on host batches, seeded by (seed, step).

  Per batch: with probability `prob`, draw lambda ~ Beta(alpha, alpha) of cutmix (chance
  `switch_prob` when both alphas are > 0) or mixup, and mix each example with the batch
  reversed: mixup `lam * x + (1 - lam) * x[::-1]`; cutmix pastes a box of x[::-1] of area about
  (1 - lam), lambda corrected to the box actually pasted. Every view of the batch gets the same
  lambda and box. Adds 'label_probs' = lam * onehot(label) + (1 - lam) * onehot(label[::-1]).
  """
  num_classes: int
  seed: int = 0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5

  def __post_init__(self):
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or not (
        self.mixup_alpha or self.cutmix_alpha):
      raise ValueError(f'mixup_alpha {self.mixup_alpha} / cutmix_alpha {self.cutmix_alpha}: '
                       'both >= 0, one > 0')
    if not (0 <= self.prob <= 1 and 0 <= self.switch_prob <= 1):
      raise ValueError(f'mix_prob {self.prob} / switch_prob {self.switch_prob} not in [0, 1]')

  def params(self, step: int, height: int,
             width: int) -> tuple[float, tuple[int, int, int, int] | None]:
    """(lambda, cutmix box (top, bottom, left, right) or None) of global step `step`."""
    rng = np.random.default_rng(np.random.SeedSequence((self.seed, step), spawn_key=(1,)))
    if rng.random() >= self.prob:
      return 1.0, None
    cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
    alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not cutmix:
      return lam, None
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return 1 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right)

  def __call__(self, batch: Batch, step: int) -> Batch:
    lam, box = self.params(step, *batch['image'].shape[1:3])
    out = dict(batch)
    for key in image_keys(batch) if lam < 1 else ():
      x = batch[key]
      if box is None:
        out[key] = x * np.float32(lam) + x[::-1] * np.float32(1 - lam)
      else:
        top, bottom, left, right = box
        out[key] = x.copy()
        out[key][:, top:bottom, left:right] = x[::-1, top:bottom, left:right]
    one_hot = np.eye(self.num_classes, dtype=np.float32)[batch['label']]
    out['label_probs'] = one_hot * np.float32(lam) + one_hot[::-1] * np.float32(1 - lam)
    return out
