"""Random images and labels, for tests: record i depends only on (seed, i)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Random-access source of {'image': uint8 `image_shape`, 'label': int in [0, num_classes)}."""
  num_examples: int
  image_shape: tuple[int, int, int]
  num_classes: int
  seed: int = 0

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self.num_examples} examples')
    rng = np.random.default_rng((self.seed, int(index)))
    return {'image': rng.integers(0, 256, self.image_shape, dtype=np.uint8),
            'label': int(rng.integers(self.num_classes))}
