"""Per-example preprocessing in NumPy (and Pillow for resampling), run inside grain maps.

Input records are {'image': HWC uint8, 'label': int}; outputs are {'image': float32 HWC,
normalised with the dataset's mean/std, 'label': int32}. Training: crop/flip (`augment`), then
optionally RandAugment on the uint8 image, normalisation, then optionally random erasing.
Randomness comes only from the `np.random.Generator` passed in, so an example's augmentation is
fixed by its seed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
from PIL import Image

from dsnet_jax.data import augment as augment_lib

AUGMENTS = ('pad_crop_flip', 'rrc_flip', 'none')
EVAL_RESIZES = ('resize_crop', 'none')


def to_hwc(image: np.ndarray, channels: int) -> np.ndarray:
  """Gives grayscale images a channel axis and repeats it when `channels` is 3."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] != channels:
    if image.shape[-1] != 1:
      raise ValueError(f'image of shape {image.shape} cannot become {channels} channels')
    image = np.repeat(image, channels, axis=-1)
  return image


def resized_crop(image: np.ndarray, box: tuple[float, float, float, float],
                 size: int) -> np.ndarray:
  """Crops `box` = (left, top, right, bottom) in pixels and resizes it to size x size, bilinear.

  One Pillow call: its bilinear filter widens on downscaling (antialiased), like torchvision's
  resize of a PIL image.
  """
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box))
  return out[..., None] if squeeze else out


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box: 10 tries at a random area/aspect, else a center crop."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def center_crop_box(height: int, width: int, size: int,
                    crop_pct: float) -> tuple[float, float, float, float]:
  """The box that "resize the shorter side to size / crop_pct, center-crop size" keeps."""
  side = min(height, width) * crop_pct  # = size / (shorter-side scale factor)
  top, left = (height - side) / 2, (width - side) / 2
  return left, top, left + side, top + side


def pad_crop(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Zero-pads by `pad` on each side and crops back the original size at a random offset."""
  height, width = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  return padded[top:top + height, left:left + width]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Train and eval preprocessing of one dataset configuration (picklable for grain workers).

  Attributes:
    image_size: output height and width.
    channels: output channels.
    mean, std: per-channel normalisation, in [0, 1] pixel units.
    augment: training augmentation, one of AUGMENTS ('none' trains on eval preprocessing).
    eval_resize: 'resize_crop' (shorter side to image_size / crop_pct, center crop) for images
      of varying size; 'none' for images already image_size x image_size.
    crop_pct: fraction of the shorter side that the eval center crop keeps.
    randaugment: training RandAugment in timm's spelling, e.g. 'rand-m9-n2' ('' = none).
    random_erasing: probability of erasing a random rectangle of a training image (0 = never).
  """
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: str = 'none'
  eval_resize: str = 'none'
  crop_pct: float = 0.875
  randaugment: str = ''
  random_erasing: float = 0.0

  def __post_init__(self):
    if self.augment not in AUGMENTS:
      raise ValueError(f'unknown augment {self.augment!r}; valid: {AUGMENTS}')
    if self.eval_resize not in EVAL_RESIZES:
      raise ValueError(f'unknown eval_resize {self.eval_resize!r}; valid: {EVAL_RESIZES}')
    if not len(self.mean) == len(self.std) == self.channels:
      raise ValueError(f'mean {self.mean} / std {self.std} do not match {self.channels} channels')
    if not 0 <= self.random_erasing <= 1:
      raise ValueError(f'random_erasing {self.random_erasing} is not a probability')
    self._rand_augment  # Raises on a bad spelling.

  @functools.cached_property
  def _rand_augment(self) -> augment_lib.RandAugment | None:
    return augment_lib.RandAugment.parse(self.randaugment) if self.randaugment else None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def normalize(self, image: np.ndarray) -> np.ndarray:
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return (image.astype(np.float32) * np.float32(1 / 255) - mean) / std

  def _eval_image(self, image: np.ndarray) -> np.ndarray:
    if self.eval_resize == 'resize_crop':
      box = center_crop_box(*image.shape[:2], self.image_size, self.crop_pct)
      return resized_crop(image, box, self.image_size)
    if image.shape != self.image_shape:
      raise ValueError(f'image of shape {image.shape} is not {self.image_shape}; use '
                       "eval_resize='resize_crop' for images of other sizes")
    return image

  def _train_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.augment == 'rrc_flip':
      box = random_resized_crop_box(*image.shape[:2], rng)
      return random_flip(resized_crop(image, box, self.image_size), rng)
    image = self._eval_image(image)
    if self.augment == 'pad_crop_flip':
      image = random_flip(pad_crop(image, rng), rng)
    return image

  def train(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = self._train_image(to_hwc(np.asarray(record['image']), self.channels), rng)
    if self._rand_augment is not None:
      image = self._rand_augment(image, rng)
    image = self.normalize(image)
    if self.random_erasing > 0:
      image = augment_lib.random_erase(image, rng, self.random_erasing)
    return {'image': image, 'label': np.int32(record['label'])}

  def eval(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    image = self._eval_image(to_hwc(np.asarray(record['image']), self.channels))
    return {'image': self.normalize(image), 'label': np.int32(record['label'])}
