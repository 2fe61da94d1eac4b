"""Fashion-MNIST as ArrayRecord, prepared from the Debian package's IDX files without TensorFlow.

`apt-get install dataset-fashion-mnist` puts four gzipped IDX files in `DEBIAN_DIR`. The builder
below stores them as ArrayRecord with a plain uint8 `Tensor` image feature: tfds's `Image`
feature would need TensorFlow to encode PNGs. Records keep the IDX order (no tfds shuffling), so
record i of a split is image i of its IDX file.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import os
from typing import Any, Callable, Sequence
import zlib

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from dsnet_jax import paths
from dsnet_jax.errors import DataError

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
# Beside the prepared data: the IDX files it was prepared from (their directory and digests).
SOURCE_FILE = 'debian_source.json'
# Split name -> IDX file prefix.
_PREFIXES = {'train': 'train', 'test': 't10k'}
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
MEAN = (0.2860,)
STD = (0.3530,)


def idx_files(debian_dir: str, split: str) -> tuple[str, str]:
  """Paths of a split's (images, labels) IDX files."""
  prefix = _PREFIXES[split]
  return (os.path.join(debian_dir, f'{prefix}-images-idx3-ubyte.gz'),
          os.path.join(debian_dir, f'{prefix}-labels-idx1-ubyte.gz'))


def has_idx_files(debian_dir: str | None) -> bool:
  return bool(debian_dir) and all(
      os.path.isfile(p) for split in _PREFIXES for p in idx_files(debian_dir, split))


def read_idx(path: str, item_shape: tuple[int, ...]) -> np.ndarray:
  """Reads an IDX file of unsigned bytes, gzipped or not, as an array of shape (n, *item_shape).

  Raises:
    DataError naming `path`: corrupt gzip data; not an IDX file of unsigned bytes; a shape other
      than (n, *item_shape); fewer or more bytes of data than the header declares.
  """
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'\x1f\x8b':  # gzip's magic number, whatever the file's name
    try:
      data = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
      raise DataError(f'{path}: corrupt gzip data ({e})') from e
  if len(data) < 4 or data[:2] != b'\0\0':
    raise DataError(f'{path}: not an IDX file (starts with {data[:4]!r}, not 0, 0, dtype, ndim)')
  if data[2] != 0x08:
    raise DataError(f'{path}: IDX dtype code {data[2]:#04x}, expected 0x08 (unsigned byte)')
  ndim, header = data[3], 4 + 4 * data[3]
  if len(data) < header:
    raise DataError(f'{path}: truncated header: {ndim} dimensions need {header} bytes, the file '
                     f'has {len(data)}')
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  if ndim != 1 + len(item_shape) or shape[1:] != item_shape:
    expected = str(('n', *item_shape)).replace("'", '')  # e.g. (n, 28, 28)
    raise DataError(f'{path}: shape {shape}, expected {expected}')
  needed, found = math.prod(shape), len(data) - header
  if found != needed:
    raise DataError(f'{path}: {"truncated" if found < needed else "oversized"}: shape {shape} '
                     f'needs {needed} bytes of data after the header, found {found}')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_split(debian_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A split straight from the IDX files: images (N, 28, 28, 1) uint8, labels (N,) uint8.

  Raises:
    DataError naming the file(s): see `read_idx`; image and label counts differ; a label is not
      in 0..NUM_CLASSES - 1.
  """
  images_path, labels_path = idx_files(debian_dir, split)
  images, labels = read_idx(images_path, IMAGE_SHAPE[:2]), read_idx(labels_path, ())
  if len(images) != len(labels):
    raise DataError(f'{images_path} holds {len(images)} images but {labels_path} holds '
                     f'{len(labels)} labels')
  if (bad := np.flatnonzero(labels >= NUM_CLASSES)).size:
    raise DataError(f'{labels_path}: {bad.size} labels outside 0..{NUM_CLASSES - 1}, the first '
                     f'{labels[bad[0]]} at index {bad[0]}')
  return images[..., None], labels


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files (the `manual_dir`), stored without TensorFlow."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Uint8 Tensor images in IDX order.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'`apt-get install dataset-fashion-mnist` (files land in {DEBIAN_DIR}), or any directory '
      'holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.')
  # tfds 4.9.10 derives the default with `importlib_resources`, which it does not install on
  # Python >= 3.9 (tensorflow/datasets#11212).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: `dataset_info_from_configs` looks for metadata files next to the
    # builder's module, which a builder outside the tfds package does not have.
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST (Xiao et al. 2017), 28x28 grayscale, 10 classes.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(os.fspath(dl_manager.manual_dir), split)
            for split in _PREFIXES}

  def _generate_examples(self, debian_dir: str, split: str):
    images, labels = read_split(debian_dir, split)
    for i in range(len(labels)):
      yield i, {'image': images[i], 'label': int(labels[i])}


def _missing_error(debian_dir: str | None, reason: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'Fashion-MNIST is not available: no IDX files in debian_dir={debian_dir!r}, and {reason}. '
      'Install the files with `apt-get install dataset-fashion-mnist`, or set '
      'config.data.debian_dir to a directory holding train-images-idx3-ubyte.gz, '
      'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.')


def _has_tensorflow() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def _tfds_fashion_mnist(data_dir: str | None, debian_dir: str | None) -> dict[str, Any]:
  """Fallback: tfds's own `fashion_mnist` (download; its PNG encoding needs TensorFlow)."""
  make = lambda: tfds.builder('fashion_mnist', data_dir=data_dir, file_format='array_record')
  if not make().is_prepared() and not _has_tensorflow():
    raise _missing_error(debian_dir, "tfds's `fashion_mnist` download needs TensorFlow "
                         '(`pip install .[tf]`), which is not installed')

  def prepare(builder):
    try:
      builder.download_and_prepare()
    except Exception as e:  # Any failure here (network, TF) means the same thing to the user.
      raise _missing_error(debian_dir, f"tfds's `fashion_mnist` download failed ({e!r})") from e

  return _prepared_once(make, prepare).as_data_source()


def _prepared_once(make_builder: Callable[[], tfds.core.DatasetBuilder],
                   prepare: Callable[[tfds.core.DatasetBuilder], None]) -> tfds.core.DatasetBuilder:
  """`make_builder()`'s builder, prepared by `prepare` unless it is already.

  tfds's preparation fails when two processes race (the second one's rename of its finished
  folder raises FileExistsError), as two trainings started at once on a fresh machine do: under
  an flock beside the data set, one process prepares and the others wait, then read its files.
  A remote data_dir (gs://) has no file locks: its first preparation is the user's to run once.
  """
  builder = make_builder()
  if builder.is_prepared():
    return builder
  root = os.fspath(builder.data_dir_root)
  if paths.is_remote(root):
    prepare(builder)
    return builder
  os.makedirs(root, exist_ok=True)
  lock = os.path.join(root, f'{builder.name}.lock')
  wait = lambda pid: logging.warning('Waiting for another process to prepare %s in %s (PID %s '
                                     'holds %s)', builder.name, root, pid, lock)
  with paths.exclusive_lock(lock, busy=None, wait=wait):
    builder = make_builder()  # A fresh look: the other process may have prepared it.
    if not builder.is_prepared():
      prepare(builder)
    return builder


def data_sources(data_dir: str | None = None,
                 debian_dir: str | None = DEBIAN_DIR) -> dict[str, Sequence[dict[str, Any]]]:
  """Random-access sources {'train', 'test'} of {'image': (28, 28, 1) uint8, 'label': int}.

  Prepares the ArrayRecord files in `data_dir` (tfds's default, ~/tensorflow_datasets, when
  None) on first use; falls back to tfds's `fashion_mnist` when `debian_dir` lacks the files.
  """
  make = lambda: FashionMnistDebian(data_dir=data_dir, file_format='array_record')
  if not make().is_prepared() and not has_idx_files(debian_dir):
    return _tfds_fashion_mnist(data_dir, debian_dir)
  manual = tfds.download.DownloadConfig(manual_dir=debian_dir)

  def prepare(builder):
    for split in _PREFIXES:  # Damaged files fail here, before tfds starts writing.
      read_split(debian_dir, split)
    builder.download_and_prepare(download_config=manual)
    (epath.Path(builder.data_dir) / SOURCE_FILE).write_text(json.dumps(
        {'debian_dir': os.path.abspath(debian_dir), 'sha256': _digests(debian_dir)}))

  try:
    builder = _prepared_once(make, prepare)
  except OSError as e:  # Not writable, under a file, full: the data_dir is the problem.
    where = data_dir or '~/tensorflow_datasets'
    raise DataError(f'cannot prepare Fashion-MNIST in data_dir={where} ({e}): set '
                    'config.data.data_dir to a writable directory') from None
  _check_source(builder, debian_dir)
  return builder.as_data_source()


def _digests(debian_dir: str) -> dict[str, str]:
  return {os.path.basename(path): hashlib.sha256(open(path, 'rb').read()).hexdigest()
          for split in _PREFIXES for path in idx_files(debian_dir, split)}


def _check_source(builder, debian_dir: str | None) -> None:
  """Refuses prepared data made from other IDX files than `debian_dir` holds (a data_dir
  prepared from another copy would otherwise be used silently, and the run's config would
  name the wrong source)."""
  record = epath.Path(builder.data_dir) / SOURCE_FILE
  if not record.exists() or not has_idx_files(debian_dir):
    return  # Prepared before sources were recorded, or from tfds: nothing to compare.
  source = json.loads(record.read_text())
  if source['sha256'] != _digests(debian_dir):
    raise DataError(
        f'{builder.data_dir} was prepared from the IDX files in {source["debian_dir"]}, and '
        f'debian_dir={debian_dir} holds other files: set config.data.data_dir to another '
        'directory for this copy (or delete the prepared one)')
