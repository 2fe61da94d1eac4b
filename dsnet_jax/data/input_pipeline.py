"""The one entry point from a data spec to batches: `make(spec, split, batch_size=..., train=...)`.

`DataSpec` (frozen) holds every data option; `config.data` is checked against it and turned
into one by `config_lib`. The fields are documented on the class.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

from dsnet_jax import errors
from dsnet_jax.errors import ConfigError
from dsnet_jax.data import fashion_mnist, imagenet
from dsnet_jax.data.augment import Mixing
from dsnet_jax.data.in_memory import ArraySource, load_numpy
from dsnet_jax.data.loader import Batch, EvalLoader, HostShard, TrainLoader
from dsnet_jax.data.preprocess import Preprocess
from dsnet_jax.data.synthetic import SyntheticSource

DATASETS = ('fashion_mnist', 'imagenet2012', 'synthetic')
# data.normalization: '' (the data set's mean and std) or 'inception' (0.5 and 0.5).
NORMALIZATIONS = ('', 'inception')
# Split each data set evaluates on.
EVAL_SPLITS = {'fashion_mnist': 'test', 'imagenet2012': 'validation', 'synthetic': 'test'}


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """One split's batches for this host, and what the model needs to know about them.

  `batches(start_step=0, num_steps=None)` yields {'image': float32 (host_batch, H, W, C),
  'label': int32 (host_batch,)} (+ 'mask': bool for eval). Training batches go on forever
  (or num_steps), eval batches make one padded pass of `steps_per_epoch` batches. Training
  batches also hold 'image_view1', ... when `views` > 1, and 'label_probs' float32
  (host_batch, num_classes) when `mixes_labels` (mixup / cutmix on).
  """
  name: str
  split: str
  train: bool
  num_examples: int
  num_classes: int
  image_shape: tuple[int, int, int]
  global_batch_size: int
  host_batch_size: int
  steps_per_epoch: int
  batches: Callable[..., Iterator[Batch]]
  views: int = 1
  mixes_labels: bool = False


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A data set and how its batches are made. None: the data set's own value (image_size,
  num_classes) or, for data_dir, tfds's default (~/tensorflow_datasets).

  Training-only options (off by default; eval batches never change): randaugment, timm's
  spelling 'rand-m{magnitude of 10}[-n{ops, 2}][-mstd{noise, 0}][-p{chance per op, 0.5}]',
  e.g. 'rand-m9-mstd0.5' ('' = off); random_erasing, the chance of replacing a random rectangle
  (2-33 % of the area, aspect 0.3-3.3) of the normalised image with standard normal noise
  (timm's mode 'pixel'); views, augmented views per example, each with its own augmentation
  seed (views=2 adds 'image_view1', e.g. for MvCo); mixup_alpha / cutmix_alpha, Beta(alpha,
  alpha) of timm-style batch mixup / cutmix (0 = off; one lambda and box per step from (seed,
  step), each example mixed with the batch reversed, every view alike; adds 'label_probs'),
  applied with chance mix_prob, cutmix rather than mixup with chance switch_prob.
  """
  name: str = 'fashion_mnist'  # 'fashion_mnist' | 'imagenet2012' | 'synthetic'.
  data_dir: str | None = None  # Where tfds data is prepared.
  debian_dir: str | None = None  # Fashion-MNIST IDX files (None: fashion_mnist.DEBIAN_DIR).
  image_size: int | None = None  # Checked against the data set (synthetic: define it).
  num_classes: int | None = None  # Checked against the data set (synthetic: define it).
  channels: int | None = None  # Synthetic data only (None: 3).
  augment: str = 'none'  # 'pad_crop_flip' | 'rrc_flip' | 'none'.
  crop_pct: float = 0.875  # Eval center crop fraction (data sets of varying image size).
  # '': the data set's own mean and std; 'inception': mean = std = 0.5 per channel (what
  # timm's ViT/AugReg weights expect; DeiT's expect ImageNet's, the default).
  normalization: str = ''
  randaugment: str = ''
  random_erasing: float = 0.0
  views: int = 1
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  switch_prob: float = 0.5
  in_memory: bool = False  # Read the split into NumPy once (small data sets).
  num_workers: int = 0  # grain worker processes (0: in-process).
  num_threads: int = 2  # grain reader threads.
  prefetch: int = 2  # grain prefetch buffer.
  synthetic_num_examples: int = 1024  # Synthetic data only.


def check_name(name: str) -> None:
  """Raises ConfigError unless `name` is a data set this library reads."""
  if name not in DATASETS:
    raise ConfigError(f'config key data.name={name!r}: unknown data set; valid: '
                      f'{", ".join(DATASETS)}')


def _check(spec: DataSpec, field: str, expected: int, name: str) -> None:
  if getattr(spec, field) not in (None, expected):  # None: take the dataset's.
    raise ConfigError(f'config.data.{field}={getattr(spec, field)} but {name} has {expected}')


def _dataset(spec: DataSpec,
             split: str) -> tuple[Sequence[dict[str, Any]], Preprocess, int]:
  """The split's random-access source, its preprocessing and its number of classes."""
  name = spec.name
  check_name(name)
  preprocess = preprocessing(spec)
  if name == 'fashion_mnist':
    _check(spec, 'num_classes', fashion_mnist.NUM_CLASSES, name)
    sources = fashion_mnist.data_sources(
        spec.data_dir, spec.debian_dir or fashion_mnist.DEBIAN_DIR)
    num_classes = fashion_mnist.NUM_CLASSES
  elif name == 'imagenet2012':
    _check(spec, 'num_classes', imagenet.NUM_CLASSES, name)
    sources = imagenet.data_sources(spec.data_dir)
    num_classes = imagenet.NUM_CLASSES
  else:
    sources = {s: SyntheticSource(spec.synthetic_num_examples,
                                  preprocess.image_shape, spec.num_classes, seed=i)
               for i, s in enumerate(('train', 'test'))}
    num_classes = spec.num_classes
  if split not in sources:
    raise errors.DataError(f'{name} has no split {split!r}; splits: {sorted(sources)}')
  return sources[split], preprocess, num_classes


def preprocessing(spec: DataSpec) -> Preprocess:
  """The preprocessing of the data set `spec` names: image size, channels,
  normalisation, augmentation."""
  name = spec.name
  check_name(name)
  augment = spec.augment or 'none'
  extra = dict(randaugment=spec.randaugment or '', random_erasing=float(spec.random_erasing))
  if spec.normalization not in NORMALIZATIONS:
    raise ConfigError(f'config key data.normalization={spec.normalization!r}: valid: '
                      f'{", ".join(map(repr, NORMALIZATIONS))}')
  inception = lambda mean, std: ((0.5,) * len(mean), (0.5,) * len(std)) if (
      spec.normalization == 'inception') else (mean, std)
  if name == 'fashion_mnist':
    _check(spec, 'image_size', 28, name)
    return Preprocess(28, 1, *inception(fashion_mnist.MEAN, fashion_mnist.STD), augment, **extra)
  if name == 'imagenet2012':
    return Preprocess(spec.image_size or 224, 3, *inception(imagenet.MEAN, imagenet.STD),
                      augment, 'resize_crop', spec.crop_pct, **extra)
  channels = spec.channels or 3
  return Preprocess(spec.image_size, channels, (0.5,) * channels, (0.5,) * channels, augment,
                    **extra)


def describe_preprocessing(preprocess: Preprocess) -> dict[str, Any]:
  """What a deployment must do to a uint8 HWC image before the model (JSON-ready)."""
  return {'image_size': preprocess.image_size, 'channels': preprocess.channels,
          'normalize': '(pixel / 255 - mean) / std, per channel',
          'mean': list(preprocess.mean), 'std': list(preprocess.std),
          'resize': (f'shorter side to image_size / {preprocess.crop_pct}, center crop'
                     if preprocess.eval_resize == 'resize_crop' else 'none (image_size square)')}


def check_available(spec: DataSpec, split: str | None = None) -> None:
  """Raises at once, with what to do, if `spec` names data that cannot be read."""
  name = spec.name
  check_name(name)
  _dataset(spec, split or EVAL_SPLITS[name])


def num_examples(spec: DataSpec, split: str) -> int:
  """The number of records in `split` of the data set `spec` names."""
  return len(_dataset(spec, split)[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Subrange:
  """Records [start, stop) of a random-access source, renumbered from 0."""
  source: Sequence[dict[str, Any]]
  start: int
  stop: int

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of a {len(self)}-record subrange')
    return self.source[self.start + index]


def make(spec: DataSpec, split: str, *, batch_size: int, train: bool,
         seed: int = 0, shard: HostShard | None = None,
         examples: tuple[int, int] | None = None) -> Pipeline:
  """Builds the pipeline of `split` for `spec`.

  Args:
    spec: the data set and its options.
    split: 'train', or the eval split (EVAL_SPLITS[name]).
    batch_size: global batch size, all hosts together.
    train: shuffled, augmented, endless, drop-remainder batches; else one padded pass.
    seed: shuffling and augmentation seed (train only).
    shard: this host's slice; default (jax.process_index(), jax.process_count()).
    examples: (start, stop) to use only those records of the split; negative values count
      from its end, as in Python slices (e.g. (-5000, None) holds out its last 5000).
  Raises:
    ValueError: `examples` leaves fewer records than one batch (train) or none (eval).
  """
  source, preprocess, num_classes = _dataset(spec, split)
  if examples is not None:
    start, stop, _ = slice(*examples).indices(len(source))
    if stop - start < (batch_size if train else 1):
      raise ValueError(f'records {examples} of {spec.name} {split} ({len(source)} records) '
                       f'leave {max(stop - start, 0)}, fewer than {"a batch" if train else "one"}')
    source = Subrange(source, start, stop)
  if spec.in_memory:
    source = ArraySource(load_numpy(source))
  shard = shard or HostShard.current()
  parallelism = dict(num_workers=spec.num_workers,
                     num_threads=spec.num_threads, prefetch=spec.prefetch)
  views, mixing = 1, None
  if train:
    views = int(spec.views)
    mixing = _mixing(spec, num_classes, seed)
    loader = TrainLoader(source, preprocess, batch_size, seed, shard, **parallelism,
                         views=views, mixing=mixing)
  else:
    loader = EvalLoader(source, preprocess, batch_size, shard, **parallelism)
  return Pipeline(name=spec.name, split=split, train=train, num_examples=len(source),
                  num_classes=num_classes, image_shape=preprocess.image_shape,
                  global_batch_size=batch_size, host_batch_size=loader.host_batch_size,
                  steps_per_epoch=loader.steps_per_epoch, batches=loader.batches, views=views,
                  mixes_labels=mixing is not None)


def _mixing(spec: DataSpec, num_classes: int, seed: int) -> Mixing | None:
  mixup, cutmix = spec.mixup_alpha, spec.cutmix_alpha
  if not (mixup or cutmix):
    return None
  return Mixing(num_classes, seed, float(mixup), float(cutmix), float(spec.mix_prob),
                float(spec.switch_prob))
