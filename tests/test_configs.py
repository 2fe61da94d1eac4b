"""Every shipped config validates; ImageNet configs stop at once when the data is missing."""
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import pytest

from checks import ROOT
from dsnet_jax import config_lib, rundir, train_lib

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


def test_an_unset_compute_dtype_compares_as_float32():
  """Checkpoints written before the configs set model.dtype resume under one that sets
  'float32'; 'bfloat16' is a difference."""
  config = load(pathlib.Path(__file__).parents[1] / 'configs/tiny.py')
  saved = config.to_dict()
  del saved['model']['dtype']
  assert rundir.config_differences(json.dumps(saved), config) == []
  config.model.dtype = 'bfloat16'
  assert rundir.config_differences(json.dumps(saved), config) == [
      "model.dtype: 'float32' -> 'bfloat16'"]


def test_print_config_shows_the_overrides_and_exits_without_a_workdir():
  for script in ('train.py', 'eval.py'):
    done = subprocess.run([sys.executable, script, '--config=configs/tiny.py',
                           '--config.batch_size=4', '--print_config'], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert 'batch_size: 4\n' in done.stdout and 'model_name: ds_mbnet' in done.stdout
    missing = subprocess.run([sys.executable, script, '--config=configs/tiny.py'], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and '--workdir is required' in missing.stderr
