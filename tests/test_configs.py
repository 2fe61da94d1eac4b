"""Every shipped config validates; ImageNet configs stop at once when the data is missing."""
import importlib.util
import pathlib
import time

import pytest

from dsnet_jax import config_lib, train_lib

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / 'configs').glob('*.py'))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path):
  config_lib.validate(load(path))


@pytest.mark.parametrize('name', ['vit_s', 'resnet50', 'ds_mbnet_imagenet'])
def test_imagenet_missing_fails_at_once_with_instructions(name, tmp_path):
  config = load(pathlib.Path(__file__).parents[1] / f'configs/{name}.py')
  config.data.data_dir = str(tmp_path / 'no_data')
  start = time.perf_counter()
  with pytest.raises(Exception, match='imagenet2012') as error:
    train_lib.train_and_evaluate(config, str(tmp_path / 'work'))
  assert 'tfds build' in str(error.value) or 'prepare' in str(error.value).lower()
  assert time.perf_counter() - start < 10
  assert not (tmp_path / 'work').exists()
