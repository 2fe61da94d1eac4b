"""Every shipped config validates and overrides like big_vision's; durations resolve at the
final batch size; ImageNet configs stop at once when the data is missing."""
import dataclasses
import importlib
import importlib.util
import json
import pathlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

from checks import ROOT
from dsnet_jax import config_lib, errors, rundir

CONFIGS = sorted((ROOT / 'configs').glob('*.py'))
# The argument a config file needs (the fine-tuning configs: the imported checkpoint).
CONFIG_ARGS = {'resnet50_finetune': 'ckpt/resnet50_tv', 'vit_s_finetune': 'ckpt/deit_s'}


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path):
  config_lib.validate(load(path, CONFIG_ARGS.get(path.stem)))


@pytest.mark.parametrize('name,base', [('resnet50_finetune', 'resnet50'),
                                       ('vit_s_finetune', 'vit_s')])
def test_finetuning_configs_shorten_stage_one_and_need_the_checkpoint(name, base):
  tuned, scratch = load(ROOT / f'configs/{name}.py', 'ckpt/x'), load(ROOT / f'configs/{base}.py')
  assert tuned.init_checkpoint == 'ckpt/x' and not tuned.model.gate_attention
  assert tuned.supernet.epochs < scratch.supernet.epochs / 2
  assert tuned.supernet.optimizer.lr == pytest.approx(0.2 * scratch.supernet.optimizer.lr)
  assert 0 < tuned.supernet.optimizer.warmup_epochs < scratch.supernet.optimizer.warmup_epochs
  with pytest.raises(errors.ConfigError, match='needs the imported checkpoint'):
    load(ROOT / f'configs/{name}.py')


def test_an_unset_compute_dtype_compares_as_float32():
  """Checkpoints written before the configs set model.dtype resume under one that sets
  'float32'; 'bfloat16' is a difference."""
  config = load(ROOT / 'configs/tiny.py')
  saved = config.to_dict()
  del saved['model']['dtype']
  assert rundir.config_differences(json.dumps(saved), config) == []
  config.model.dtype = 'bfloat16'
  assert rundir.config_differences(json.dumps(saved), config) == [
      "model.dtype: 'float32' -> 'bfloat16'"]


def parse(path, *overrides):
  """The config as train.py's --config flag makes it, overrides applied."""
  arg = CONFIG_ARGS.get(pathlib.Path(path).stem)
  argv = ['train.py', f'--config={path}' + (f':{arg}' if arg else ''), *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_model_and_data_field_overrides_from_the_command_line(path):
  config = parse(path)
  model_cls = importlib.import_module(f'dsnet_jax.models.{config.model_name}').Model
  fields = {f.name for f in dataclasses.fields(model_cls)} - {'parent', 'name'}
  assert set(config.model) == fields
  assert set(config.data) == set(config_lib.DATA_KEYS)
  unset_int = next((k for k, v in config.model.items() if v is None and k != 'variant'), None)
  overrides = ['--config.data.data_dir=/some/dir', '--config.data.mix_prob=0.5',
               '--config.model.num_classes=7', '--config.batch_size=32']
  if unset_int:  # e.g. ds_vit's width: an unset (None) field takes a value too.
    overrides.append(f'--config.model.{unset_int}=5')
  overridden = parse(path, *overrides)
  assert overridden.data.data_dir == '/some/dir' and overridden.data.mix_prob == 0.5
  assert overridden.model.num_classes == 7 and overridden.batch_size == 32
  if unset_int:
    assert overridden.model[unset_int] == 5


def test_set_model_names_the_available_models_on_a_typo():
  config = config_lib.defaults()
  with pytest.raises(errors.ConfigError, match="'ds_mbent'.*ds_mbnet, ds_resnet, ds_vit"):
    config_lib.set_model(config, 'ds_mbent')
  with pytest.raises(errors.ConfigError, match='model.widht'):
    config_lib.set_model(config, 'ds_vit', widht=3)


def test_durations_in_epochs_resolve_at_the_final_batch_size():
  config = config_lib.defaults()
  config.batch_size = 500
  config.supernet.steps, config.supernet.epochs = 0, 2.5
  config.supernet.optimizer.warmup_epochs = 0.5
  config.supernet.optimizer.lr, config.supernet.optimizer.lr_batch_size = 0.1, 250
  config.gate.steps, config.gate.epochs = 0, 1.0
  config.recalibrate.examples = 1001
  config.eval_every_epochs = 1.0
  examples = {'supernet': 60_000, 'gate': 55_000}
  resolved = config_lib.resolve_durations(config, examples)
  assert resolved.supernet.steps == 300  # 2.5 * 60000 / 500
  assert resolved.supernet.optimizer.warmup_steps == 60
  assert resolved.supernet.optimizer.lr == pytest.approx(0.2)  # 0.1 per 250 images.
  assert resolved.supernet.optimizer.lr_batch_size == 500
  assert resolved.gate.steps == 110 and resolved.gate.optimizer.warmup_steps == 0
  assert resolved.recalibrate.num_batches == 3  # 1001 / 500, rounded up.
  assert resolved.eval_every_steps == 120
  assert config.supernet.steps == 0  # The input is left as it was.
  assert config_lib.resolve_durations(resolved, examples).to_dict() == resolved.to_dict()
  config.batch_size = 1000  # As --config.batch_size=1000 would.
  bigger = config_lib.resolve_durations(config, examples)
  assert (bigger.supernet.steps, bigger.supernet.optimizer.lr) == (150, pytest.approx(0.4))
  config.supernet.steps = 10
  with pytest.raises(errors.ConfigError, match='supernet.steps=10 and supernet.epochs=2.5'):
    config_lib.resolve_durations(config, examples)
  config.supernet.steps, config.supernet.epochs = 0, 0.001
  with pytest.raises(errors.ConfigError, match='less than one batch'):
    config_lib.resolve_durations(config, examples)


def test_imagenet_configs_follow_a_batch_size_override():
  for name, epochs, lr in (('resnet50', 150, 0.1 * 512 / 256), ('vit_s', 300, 5e-4)):
    config = parse(ROOT / f'configs/{name}.py',
                   '--config.batch_size=512')
    resolved = config_lib.resolve_durations(config, {'supernet': 1_281_167, 'gate': 1_276_167})
    assert resolved.supernet.steps == int(epochs * 1_281_167 / 512)
    assert resolved.supernet.optimizer.warmup_steps == int(5 * 1_281_167 / 512)
    assert resolved.supernet.optimizer.lr == pytest.approx(lr)
    assert resolved.gate.steps == int(30 * 1_276_167 / 512)


def test_extending_a_stage_in_epochs_allows_its_steps_to_change():
  assert config_lib.with_derived_keys(['supernet.epochs', 'batch_size']) == (
      'supernet.epochs', 'batch_size', 'supernet.steps')


def test_a_saved_config_without_newer_model_and_data_keys_compares_equal():
  config = load(ROOT / 'configs/tiny.py')
  saved = config.to_dict()
  del saved['model']['se_ratio'], saved['data']['switch_prob'], saved['eval_every_epochs']
  del saved['supernet']['epochs'], saved['gate']['optimizer']['lr_batch_size']
  assert rundir.config_differences(json.dumps(saved), config) == []
  config.model.se_ratio = 0.5
  assert rundir.config_differences(json.dumps(saved), config) == ['model.se_ratio: 0.25 -> 0.5']


@pytest.mark.parametrize('section, message', [
    ({'chain': ('0',), 'budget': 0.4}, 'escalation.chain=.*two or more distinct routes'),
    ({'chain': ('0', '0'), 'budget': 0.4}, 'two or more distinct routes'),
    ({'chain': ('0', '6'), 'budget': 0.0}, 'escalation.budget=0.0 .*a budget > 0'),
    ({'chain': ('0', '6'), 'budget': 0.4, 'budget_unit': 'ms'}, "budget_unit='ms'"),
    ({'chain': ('0', '6'), 'budget': 0.4, 'confidence': 'entropy'}, "confidence='entropy'"),
    ({'chain': ('0', '6'), 'budget': 0.4, 'calibration_examples': 0}, 'must be >= 1'),
    ({'chain': ('auto', 'auto'), 'budget': 0.4}, "cheapest first, or \\('auto',\\)"),
])
def test_an_escalation_section_that_cannot_work_is_refused(section, message):
  config = load(ROOT / 'configs/ds_mbnet_fmnist.py')
  config.unlock()
  config.escalation.update(section)
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.validate(config)
  assert config_lib.resolve(load(ROOT / 'configs/ds_mbnet_fmnist.py')).escalation == (
      config_lib.EscalationSpec(('auto',), 0.4, 'largest', 'max_softmax', 5000, 'train'))


def test_a_schedule_that_would_rise_is_refused_and_loaders_keep_every_thread_busy():
  """A small batch scales the learning rate below end_lr: the cosine 'decay' would rise."""
  config = load(ROOT / 'configs/vit_s.py')
  config.unlock()
  config.batch_size = 8
  config.supernet.optimizer.end_lr = 1e-4
  lr = config.supernet.optimizer.lr * 8 / config.supernet.optimizer.lr_batch_size
  assert lr < 1e-4
  with pytest.raises(errors.ConfigError, match=r'supernet.optimizer.end_lr=0.0001 is above the '
                     r'peak learning rate 7.8125e-06 \(lr scaled to batch_size=8\)'):
    config_lib.resolve_durations(config, None)
  # grain warns (once per reader thread) when its prefetch buffer holds fewer than its threads;
  # every shipped config, :runlocal included, resolves (its schedule never rises).
  for path in CONFIGS:
    for arg in [CONFIG_ARGS[path.stem]] if path.stem in CONFIG_ARGS else (None, 'runlocal'):
      config = load(path, arg)
      assert config.data.prefetch >= config.data.num_threads, path.name
      config_lib.resolve_durations(config, {'supernet': 10 ** 6, 'gate': 10 ** 6})


@pytest.mark.parametrize('overrides, message', [
    ({'supernet.optimizer.lr': float('nan')}, 'supernet.optimizer.lr=nan: not a finite number'),
    ({'gate.label_smoothing': float('nan')}, 'gate.label_smoothing=nan: not a finite'),
    ({'supernet.optimizer.weight_decay': float('inf')}, 'weight_decay=inf: not a finite'),
    ({'escalation.budget': 0.5}, 'escalation.budget=0.5 without escalation.chain'),
    ({'escalation.confidence': 'bogus'}, "escalation.confidence='bogus'"),
    ({'escalation.calibration_examples': -3}, 'calibration_examples must be >= 1'),
    ({'data.augment': 'bogus'}, "unknown augment 'bogus'"),
    ({'data.normalization': 'bogus'}, "data.normalization='bogus': valid: '', 'inception' "
     '(config.data)'),
    ({'data.random_erasing': 2.0}, 'random_erasing 2.0 is not a probability'),
])
def test_a_value_that_would_be_ignored_or_poison_training_is_refused(overrides, message):
  config = load(ROOT / 'configs/tiny.py')
  for key, value in overrides.items():
    section, leaf = key.rsplit('.', 1)
    target = config
    for part in section.split('.'):
      target = target[part]
    target[leaf] = value
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_lib.validate(config)


def test_an_auto_escalation_chain_is_a_valid_config():
  config = load(ROOT / 'configs/tiny.py')
  config.escalation.chain, config.escalation.budget = ('auto',), 0.5
  config_lib.validate(config)
  assert config_lib.resolve(config).escalation.chain == ('auto',)
