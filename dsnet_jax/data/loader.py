"""Grain loaders: host-local batches whose order is a pure function of (seed, step).

Training: epoch e visits the records in `default_rng((seed, e)).permutation(n)` order, cut into
`n // global_batch_size` global batches (the remainder is dropped). Global batch `step` is a
fixed set of records; host p of P reads its p-th contiguous slice, so a host reads only its own
records and the global batch does not depend on the number of hosts. An example's augmentation
is seeded by (seed, epoch, record index), its extra views (`views` > 1) by (seed, epoch, record
index, view), and batch mixing (mixup / cutmix) by (seed, step). `batches(start_step)` therefore
yields exactly what an uninterrupted run yields from `start_step` on.

Evaluation: one pass in record order; the last global batch is padded, and `mask` marks the real
examples, so every example counts exactly once.

Grain does the per-example reads and maps and the batching, in threads (`num_threads`) and
optionally in worker processes (`num_workers`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Iterator, Sequence

from absl import flags
import grain
import jax
import numpy as np

from dsnet_jax.errors import DataError
from dsnet_jax.data.augment import Mixing
from dsnet_jax.data.preprocess import Preprocess

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class HostShard:
  """Which slice of every global batch this process reads."""
  index: int
  count: int

  @classmethod
  def current(cls) -> HostShard:
    return cls(jax.process_index(), jax.process_count())

  def host_batch_size(self, global_batch_size: int) -> int:
    if global_batch_size % self.count:
      raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                       f'{self.count} processes')
    return global_batch_size // self.count


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  order = np.random.default_rng((seed, epoch)).permutation(num_examples)
  order.flags.writeable = False
  return order


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  """grain map: (record index, epoch) -> preprocessed, augmented example.

  With `views` > 1 the record is augmented again, independently, for 'image_view1', ...
  """
  source: Sequence[dict[str, Any]]
  preprocess: Preprocess
  seed: int
  views: int = 1

  def __call__(self, element: np.ndarray) -> dict[str, np.ndarray]:
    index, epoch = int(element[0]), int(element[1])
    record = self.source[index]
    example = self.preprocess.train(record, np.random.default_rng((self.seed, epoch, index)))
    for view in range(1, self.views):
      rng = np.random.default_rng((self.seed, epoch, index, view))
      example[f'image_view{view}'] = self.preprocess.train(record, rng)['image']
    return example


@dataclasses.dataclass(frozen=True)
class _MixBatch:
  """grain map_with_index: (batch position i, batch) -> batch of step `first_step + i`, mixed."""
  mixing: Mixing
  first_step: int

  def __call__(self, position: int, batch: Batch) -> Batch:
    return self.mixing(batch, self.first_step + position)


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  """grain map: (record index, is real) -> preprocessed example with its mask."""
  source: Sequence[dict[str, Any]]
  preprocess: Preprocess

  def __call__(self, element: np.ndarray) -> dict[str, np.ndarray]:
    index, real = int(element[0]), bool(element[1])
    if not real:
      return {'image': np.zeros(self.preprocess.image_shape, np.float32),
              'label': np.int32(0), 'mask': np.False_}
    return {**self.preprocess.eval(self.source[index]), 'mask': np.True_}


def _iterate(elements: np.ndarray, example_fn, batch_size: int, num_workers: int,
             num_threads: int, prefetch: int, batch_fn=None) -> Iterator[Batch]:
  """Grain pipeline over `elements` (one row per example), batched in order."""
  dataset = (grain.MapDataset.source(elements).map(example_fn)
             .batch(batch_size, drop_remainder=True))
  if batch_fn is not None:
    dataset = dataset.map_with_index(batch_fn)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when starting workers, which fails outside absl.app
      # (google/grain#1355); unparsed flags keep their defaults.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(dataset)


class _HostBatches:
  """What both loaders derive from `shard` and `global_batch_size`."""

  def __post_init__(self):
    self.shard.host_batch_size(self.global_batch_size)  # Fails early when not divisible.

  @property
  def host_batch_size(self) -> int:
    return self.shard.host_batch_size(self.global_batch_size)


@dataclasses.dataclass(frozen=True)
class TrainLoader(_HostBatches):
  """Endless shuffled, augmented training batches of {'image', 'label'} for this host.

  `views` > 1 adds 'image_view1', ... (other augmentations of the same records); `mixing` mixes
  each host batch (all views alike) and adds 'label_probs'.
  """
  source: Sequence[dict[str, Any]]
  preprocess: Preprocess
  global_batch_size: int
  seed: int = 0
  shard: HostShard = dataclasses.field(default_factory=HostShard.current)
  num_workers: int = 0
  num_threads: int = 2
  prefetch: int = 2
  views: int = 1
  mixing: Mixing | None = None

  def __post_init__(self):
    if self.views < 1:
      raise ValueError(f'views must be >= 1, got {self.views}')
    if self.steps_per_epoch == 0:
      raise DataError(f'global batch size {self.global_batch_size} exceeds the '
                      f'{len(self.source)} training examples: a smaller batch_size, or more data')
    super().__post_init__()

  @property
  def steps_per_epoch(self) -> int:
    return len(self.source) // self.global_batch_size

  def permutation(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the records."""
    return _permutation(self.seed, epoch, len(self.source))

  def global_indices(self, step: int) -> np.ndarray:
    """Record indices of global batch `step`, all hosts together."""
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.global_batch_size
    return self.permutation(epoch)[start:start + self.global_batch_size]

  def _epoch_elements(self, epoch: int, first: int, stop: int) -> np.ndarray:
    """(record index, epoch) rows of this host's examples for positions [first, stop)."""
    batches = self.permutation(epoch)[:self.steps_per_epoch * self.global_batch_size]
    batches = batches.reshape(self.steps_per_epoch, self.shard.count, self.host_batch_size)
    indices = batches[first:stop, self.shard.index].reshape(-1)
    return np.stack([indices, np.full_like(indices, epoch)], axis=1)

  def batches(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
    """Batches of global steps start_step, start_step + 1, ... (num_steps of them, or forever)."""
    stop_step = None if num_steps is None else start_step + num_steps
    for epoch in itertools.count(start_step // self.steps_per_epoch):
      epoch_start = epoch * self.steps_per_epoch
      if stop_step is not None and epoch_start >= stop_step:
        return
      first = max(start_step - epoch_start, 0)
      stop = self.steps_per_epoch if stop_step is None else min(
          stop_step - epoch_start, self.steps_per_epoch)
      mix = None if self.mixing is None else _MixBatch(self.mixing, epoch_start + first)
      yield from _iterate(self._epoch_elements(epoch, first, stop),
                          _TrainExample(self.source, self.preprocess, self.seed, self.views),
                          self.host_batch_size, self.num_workers, self.num_threads, self.prefetch,
                          mix)


@dataclasses.dataclass(frozen=True)
class EvalLoader(_HostBatches):
  """One in-order pass of {'image', 'label', 'mask'} batches for this host; last one padded."""
  source: Sequence[dict[str, Any]]
  preprocess: Preprocess
  global_batch_size: int
  shard: HostShard = dataclasses.field(default_factory=HostShard.current)
  num_workers: int = 0
  num_threads: int = 2
  prefetch: int = 2

  @property
  def steps_per_epoch(self) -> int:
    """Number of global batches in the pass (the last one padded)."""
    return -(-len(self.source) // self.global_batch_size)

  def batches(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
    """Batches start_step, ... of the pass; every host yields the same number of batches."""
    stop = self.steps_per_epoch if num_steps is None else min(
        start_step + num_steps, self.steps_per_epoch)
    positions = np.arange(self.steps_per_epoch * self.global_batch_size).reshape(
        self.steps_per_epoch, self.shard.count, self.host_batch_size)
    positions = positions[start_step:stop, self.shard.index].reshape(-1)
    real = positions < len(self.source)
    elements = np.stack([np.where(real, positions, 0), real], axis=1)
    return _iterate(elements, _EvalExample(self.source, self.preprocess), self.host_batch_size,
                    self.num_workers, self.num_threads, self.prefetch)

  def __iter__(self) -> Iterator[Batch]:
    return self.batches()
