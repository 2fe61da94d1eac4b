"""ImageNet-1k through tfds's own `imagenet2012` builder, prepared by the user beforehand.

Preparing needs TensorFlow (the builder reads the archives with `tf.io` and re-encodes a few
CMYK/PNG images). Reading does not: from ArrayRecord files tfds decodes the JPEG feature with
Pillow (or OpenCV). `check_available` says which of these is missing before anything is built.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import tensorflow_datasets as tfds

NAME = 'imagenet2012'
NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _prepare_hint(data_dir: str | None) -> str:
  data_dir_flag = f' --data_dir={data_dir}' if data_dir else ''
  return ('Prepare it once, with TensorFlow installed (`pip install .[tf]`): '
          f'`tfds build {NAME} --manual_dir=DIR{data_dir_flag} --file_format=array_record`, '
          'where DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.')


def check_available(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared `imagenet2012` builder at `data_dir`, or a clear error saying what to do."""
  builder = tfds.builder(NAME, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'{NAME} is not prepared in data_dir={str(builder.data_dir_root)!r} (version '
        f'{builder.version}). {_prepare_hint(data_dir)}')
  formats = {f.value for f in builder.info.available_file_formats()}
  if 'array_record' not in formats:
    raise ValueError(
        f'{NAME} at {builder.data_dir} is stored as {sorted(formats)}; the input pipeline needs '
        'ArrayRecord for random access (and TFRecord would need TensorFlow to read). Convert it: '
        f'`tfds convert_format --dataset_version_dir={builder.data_dir} '
        '--out_file_format=array_record`.')
  if not any(importlib.util.find_spec(m) for m in ('PIL', 'cv2', 'tensorflow')):
    raise ImportError(f'Decoding {NAME} JPEGs needs Pillow or OpenCV: `pip install pillow` '
                      '(or `pip install .[tf]`).')
  return builder


def data_sources(data_dir: str | None = None) -> dict[str, Sequence[dict[str, Any]]]:
  """Random-access sources {'train', 'validation', ...} of {'image': HWC uint8, 'label': int}."""
  return check_available(data_dir).as_data_source(file_format='array_record')

