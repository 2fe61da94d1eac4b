"""ImageNet-1k through tfds's own `imagenet2012` builder, prepared by the user beforehand.

Preparing needs TensorFlow (the builder reads the archives with `tf.io` and re-encodes a few
CMYK/PNG images). Reading does not: from ArrayRecord files tfds decodes the JPEG feature with
Pillow (or OpenCV). `check_available` says which of these is missing before anything is built.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import tensorflow_datasets as tfds

from dsnet_jax import errors

NAME = 'imagenet2012'
NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def _prepare_hint(data_dir: str | None) -> str:
  data_dir_flag = f' --data_dir={data_dir}' if data_dir else ''
  return ("Prepare it once, with TensorFlow installed (`pip install '.[tf]'`): "
          f'`python -m dsnet_jax.tools.prepare_imagenet --manual_dir=DIR{data_dir_flag}`, '
          f'where DIR holds {" and ".join(ARCHIVES)}.')


def prepare(manual_dir: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Runs tfds's own `imagenet2012` builder on the archives in `manual_dir`, writing ArrayRecord
  under `data_dir` (tfds's default when None). What `tfds build` does, without the apache_beam
  and mlcroissant that its command line imports.

  Raises:
    errors.DataError: TensorFlow is missing (the builder reads the archives with tf.io), or an
      archive is, before anything is written.
  """
  if importlib.util.find_spec('tensorflow') is None:
    raise errors.DataError(f"preparing {NAME} needs TensorFlow: pip install '.[tf]'")
  missing = [a for a in ARCHIVES if not os.path.isfile(os.path.join(manual_dir, a))]
  if missing:
    raise errors.DataError(f'{manual_dir} lacks {", ".join(missing)} (the ILSVRC2012 archives '
                           'from image-net.org)')
  builder = tfds.builder(NAME, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def convert_to_array_record(version_dir: str) -> tfds.core.DatasetBuilder:
  """Adds ArrayRecord copies of a TFRecord-prepared dataset's shards beside them (the same
  serialized records, in the same order) and records the format in its dataset_info.json: what
  `tfds convert_format` does, without the apache_beam its command line imports. A shard whose
  copy exists is kept; each copy is written under a temporary name and renamed when complete.

  Raises:
    errors.DataError: TensorFlow is missing (it reads TFRecord), or `version_dir` holds no
      prepared dataset.
  """
  if importlib.util.find_spec('tensorflow') is None:
    raise errors.DataError("reading TFRecord needs TensorFlow: pip install '.[tf]'")
  if not os.path.isfile(os.path.join(version_dir, 'dataset_info.json')):
    raise errors.DataError(f'{version_dir} holds no prepared tfds dataset (no dataset_info.json)')
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel
  builder = tfds.builder_from_directory(version_dir)
  for split in builder.info.splits.values():
    for source in split.filepaths:
      target = os.fspath(source).replace('.tfrecord-', '.array_record-')
      if target == os.fspath(source) or os.path.exists(target):
        continue
      partial = f'{target}.partial'
      records = ((i, r.numpy()) for i, r in enumerate(tf.data.TFRecordDataset(os.fspath(source))))
      file_adapters.ArrayRecordFileAdapter.write_examples(partial, records)
      os.replace(partial, target)
  builder.info.add_alternative_file_format('array_record')
  builder.info.write_to_directory(version_dir)
  return tfds.builder_from_directory(version_dir)


def check_available(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared `imagenet2012` at `data_dir`, read as its files on disk say (so data prepared
  as TFRecord and converted with `tfds convert_format` is found), or a clear error saying what
  to do."""
  registered = tfds.builder(NAME, data_dir=data_dir)
  if not registered.is_prepared():
    raise FileNotFoundError(
        f'{NAME} is not prepared in data_dir={str(registered.data_dir_root)!r} (version '
        f'{registered.version}). {_prepare_hint(data_dir)}')
  builder = tfds.builder_from_directory(registered.data_dir)
  formats = {f.value for f in builder.info.available_file_formats()}
  if 'array_record' not in formats:
    raise errors.DataError(
        f'{NAME} at {builder.data_dir} is stored as {sorted(formats)}; the input pipeline needs '
        'ArrayRecord for random access (and TFRecord would need TensorFlow to read). Convert it '
        "once (with TensorFlow): `python -m dsnet_jax.tools.prepare_imagenet "
        f'--convert={builder.data_dir}`.')
  if not any(importlib.util.find_spec(m) for m in ('PIL', 'cv2', 'tensorflow')):
    raise errors.DataError(f'Decoding {NAME} JPEGs needs Pillow or OpenCV: `pip install pillow` '
                           "(or `pip install '.[tf]'`).")
  return builder


def data_sources(data_dir: str | None = None) -> dict[str, Sequence[dict[str, Any]]]:
  """Random-access sources {'train', 'validation', ...} of {'image': HWC uint8, 'label': int}."""
  return check_available(data_dir).as_data_source(file_format='array_record')

