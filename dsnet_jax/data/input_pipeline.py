"""The one entry point from a config to batches: `make(config.data, split, ...)`.

`config.data` fields (defaults in brackets):
  name: 'fashion_mnist' | 'imagenet2012' | 'synthetic'.
  data_dir [None = tfds's default, ~/tensorflow_datasets]: where tfds data is prepared.
  debian_dir [fashion_mnist.DEBIAN_DIR]: Fashion-MNIST IDX files.
  image_size, num_classes: checked against the dataset (synthetic: define it).
  augment ['none']: 'pad_crop_flip' | 'rrc_flip' | 'none'.
  crop_pct [0.875]: eval center crop fraction, for datasets of varying image size.
  in_memory [False]: read the split into NumPy once (small data sets).
  num_workers [0 = in-process], num_threads [2], prefetch [2]: grain parallelism.
  channels [3], synthetic_num_examples [1024]: synthetic data only.
Training-only options (all off by default; eval batches never change):
  randaugment ['']: RandAugment on the uint8 image after crop/flip, timm's spelling
    'rand-m{magnitude of 10}[-n{ops, 2}][-mstd{magnitude noise, 0}][-p{chance per op, 0.5}]',
    e.g. 'rand-m9-n2' (the DS-Net ImageNet recipe's 'rand-m9-mstd0.5'); '' = off.
  random_erasing [0.0]: chance of replacing a random rectangle (2%-33% of the area, aspect
    0.3-3.3) of the normalised image with per-pixel standard normal noise (timm's, mode 'pixel').
  views [1]: augmented views per example, each with its own augmentation seed (seed, epoch,
    record, view); views=2 adds 'image_view1' (same shape as 'image'; 'label' is shared), e.g.
    for multi-view consistency (MvCo) supernet training.
  mixup_alpha [0.0], cutmix_alpha [0.0]: Beta(alpha, alpha) of timm-style batch mixup / cutmix
    (0 = off); per host batch, one lambda (and box) per step from (seed, step), each example
    mixed with the batch reversed, every view alike. Adds 'label_probs': float32
    (host_batch, num_classes), the mixed one-hot targets; 'label' stays the original labels.
  mix_prob [1.0]: chance that a batch is mixed at all (else 'label_probs' is one-hot).
  switch_prob [0.5]: chance of cutmix rather than mixup when both alphas are > 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import ml_collections

from dsnet_jax.config_lib import ConfigError
from dsnet_jax.data import fashion_mnist, imagenet
from dsnet_jax.data.augment import Mixing
from dsnet_jax.data.in_memory import ArraySource, load_numpy
from dsnet_jax.data.loader import Batch, EvalLoader, HostShard, TrainLoader
from dsnet_jax.data.preprocess import Preprocess
from dsnet_jax.data.synthetic import SyntheticSource

DATASETS = ('fashion_mnist', 'imagenet2012', 'synthetic')
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


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(DATASETS)}')


def _check(config: ml_collections.ConfigDict, field: str, expected: int, name: str) -> None:
  if config.get(field) not in (None, expected):  # None: take the dataset's.
    raise ConfigError(f'config.data.{field}={config.get(field)} but {name} has {expected}')


def _dataset(config: ml_collections.ConfigDict,
             split: str) -> tuple[Sequence[dict[str, Any]], Preprocess, int]:
  """The split's random-access source, its preprocessing and its number of classes."""
  name = config.name
  _check_name(name)
  preprocess = preprocessing(config)
  if name == 'fashion_mnist':
    _check(config, 'num_classes', fashion_mnist.NUM_CLASSES, name)
    sources = fashion_mnist.data_sources(
        config.get('data_dir'), config.get('debian_dir') or fashion_mnist.DEBIAN_DIR)
    num_classes = fashion_mnist.NUM_CLASSES
  elif name == 'imagenet2012':
    _check(config, 'num_classes', imagenet.NUM_CLASSES, name)
    sources = imagenet.data_sources(config.get('data_dir'))
    num_classes = imagenet.NUM_CLASSES
  else:
    sources = {s: SyntheticSource(config.get('synthetic_num_examples', 1024),
                                  preprocess.image_shape, config.num_classes, seed=i)
               for i, s in enumerate(('train', 'test'))}
    num_classes = config.num_classes
  if split not in sources:
    raise ValueError(f'{name} has no split {split!r}; splits: {sorted(sources)}')
  return sources[split], preprocess, num_classes


def preprocessing(config: ml_collections.ConfigDict) -> Preprocess:
  """The preprocessing of the data set `config` (config.data) names: image size, channels,
  normalisation, augmentation."""
  name = config.name
  _check_name(name)
  augment = config.get('augment') or 'none'
  extra = dict(randaugment=config.get('randaugment') or '',
               random_erasing=float(config.get('random_erasing') or 0.0))
  if name == 'fashion_mnist':
    _check(config, 'image_size', 28, name)
    return Preprocess(28, 1, fashion_mnist.MEAN, fashion_mnist.STD, augment, **extra)
  if name == 'imagenet2012':
    return Preprocess(config.get('image_size') or 224, 3, imagenet.MEAN, imagenet.STD,
                      augment, 'resize_crop', config.get('crop_pct') or 0.875, **extra)
  channels = config.get('channels') or 3
  return Preprocess(config.image_size, channels, (0.5,) * channels, (0.5,) * channels, augment,
                    **extra)


def describe_preprocessing(preprocess: Preprocess) -> dict[str, Any]:
  """What a deployment must do to a uint8 HWC image before the model (JSON-ready)."""
  return {'image_size': preprocess.image_size, 'channels': preprocess.channels,
          'normalize': '(pixel / 255 - mean) / std, per channel',
          'mean': list(preprocess.mean), 'std': list(preprocess.std),
          'resize': (f'shorter side to image_size / {preprocess.crop_pct}, center crop'
                     if preprocess.eval_resize == 'resize_crop' else 'none (image_size square)')}


def check_available(config: ml_collections.ConfigDict, split: str | None = None) -> None:
  """Raises at once, with what to do, if `config.data` names data that cannot be read."""
  name = config.name
  _check_name(name)
  _dataset(config, split or EVAL_SPLITS[name])


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """The number of records in `split` of the data set `config` (config.data) names."""
  return len(_dataset(config, split)[0])


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


def make(config: ml_collections.ConfigDict, split: str, *, batch_size: int, train: bool,
         seed: int = 0, shard: HostShard | None = None,
         examples: tuple[int, int] | None = None) -> Pipeline:
  """Builds the pipeline of `split` for `config.data`.

  Args:
    config: the `config.data` ConfigDict (see the module docstring).
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
  source, preprocess, num_classes = _dataset(config, split)
  if examples is not None:
    start, stop, _ = slice(*examples).indices(len(source))
    if stop - start < (batch_size if train else 1):
      raise ValueError(f'records {examples} of {config.name} {split} ({len(source)} records) '
                       f'leave {max(stop - start, 0)}, fewer than {"a batch" if train else "one"}')
    source = Subrange(source, start, stop)
  if config.get('in_memory', False):
    source = ArraySource(load_numpy(source))
  shard = shard or HostShard.current()
  parallelism = dict(num_workers=config.get('num_workers', 0),
                     num_threads=config.get('num_threads', 2), prefetch=config.get('prefetch', 2))
  views, mixing = 1, None
  if train:
    views = int(config.get('views', 1))
    mixing = _mixing(config, num_classes, seed)
    loader = TrainLoader(source, preprocess, batch_size, seed, shard, **parallelism,
                         views=views, mixing=mixing)
  else:
    loader = EvalLoader(source, preprocess, batch_size, shard, **parallelism)
  return Pipeline(name=config.name, split=split, train=train, num_examples=len(source),
                  num_classes=num_classes, image_shape=preprocess.image_shape,
                  global_batch_size=batch_size, host_batch_size=loader.host_batch_size,
                  steps_per_epoch=loader.steps_per_epoch, batches=loader.batches, views=views,
                  mixes_labels=mixing is not None)


def _mixing(config: ml_collections.ConfigDict, num_classes: int, seed: int) -> Mixing | None:
  mixup, cutmix = config.get('mixup_alpha') or 0.0, config.get('cutmix_alpha') or 0.0
  if not (mixup or cutmix):
    return None
  prob, switch = config.get('mix_prob'), config.get('switch_prob')
  return Mixing(num_classes, seed, float(mixup), float(cutmix),
                1.0 if prob is None else float(prob), 0.5 if switch is None else float(switch))
