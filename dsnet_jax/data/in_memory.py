"""Small splits held in NumPy: read every record once, then index arrays."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


def load_numpy(source: Sequence[dict[str, Any]], chunk: int = 4096) -> dict[str, np.ndarray]:
  """Reads a whole random-access source into {'image': (N, ...) uint8, 'label': (N,) int32}."""
  read = getattr(source, '__getitems__', None) or (lambda keys: [source[i] for i in keys])
  images, labels = [], []
  for start in range(0, len(source), chunk):
    records = read(list(range(start, min(start + chunk, len(source)))))
    images.append(np.stack([r['image'] for r in records]))
    labels.append(np.asarray([r['label'] for r in records], np.int32))
  return {'image': np.concatenate(images), 'label': np.concatenate(labels)}


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """Random-access source over arrays from `load_numpy`."""
  arrays: dict[str, np.ndarray]

  def __len__(self) -> int:
    return len(self.arrays['label'])

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'image': self.arrays['image'][index], 'label': int(self.arrays['label'][index])}
