"""The training config's schema: defaults, and validation that names the bad key.

Config files start from `defaults()` (a locked ConfigDict, so a misspelt key fails where it is
written) and `validate()` checks any ConfigDict, e.g. one built in a notebook, before work
starts: unknown keys, wrong types and out-of-range values raise `ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import types
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from dsnet_jax import models
from dsnet_jax.data.input_pipeline import (DataSpec, check_available, check_name, num_examples,
                                           preprocessing)
from dsnet_jax.errors import ConfigError
from dsnet_jax.escalation import AUTO as AUTO_CHAIN, CONFIDENCES
from dsnet_jax.optim import OptimizerSpec
from dsnet_jax.routes import AUTO, RouteTable
from dsnet_jax.train_steps import GateRecipe, SupernetRecipe

STAGES = ('supernet', 'recalibrate', 'gate')
SGS_TARGETS = ('smallest_wrong', 'widest_helps')
# gate.budget as a fraction of 'largest' MAdds, in MAdds, or in ms on this device (latency.json).
BUDGET_UNITS = ('largest', 'madds', 'ms')



def _section(fields: Mapping[str, tuple[type, Any]], values: Mapping[str, Any], what: str
             ) -> ml_collections.ConfigDict:
  """A section holding every field: `values`, else the default; an unset (None) field is a
  typed placeholder, so that `--config.<section>.<key>=...` can set it."""
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f'unknown config key {what}.{unknown[0]}; valid: {", ".join(fields)}')
  section = {}
  for key, (kind, default) in fields.items():
    value = values.get(key, default)
    section[key] = placeholder(kind) if value is None else value
  return ml_collections.ConfigDict(section)


def data_section(**values) -> ml_collections.ConfigDict:
  """`config.data` with every field of DataSpec: `values`, the rest at their defaults."""
  return _section(DATA_FIELDS, values, 'data')


def data_spec(data: ml_collections.ConfigDict) -> DataSpec:
  """The frozen DataSpec of a (validated) `config.data`."""
  return DataSpec(**data.to_dict())


def _fields(cls, skip: tuple[str, ...] = ()) -> dict[str, tuple[type, Any]]:
  """{field: (type, default)} of a dataclass: the schema of the config section it is built
  from."""
  hints = typing.get_type_hints(cls)
  fields = {}
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    default = field.default
    fields[field.name] = (type(default) if default is not None
                          else _concrete_type(hints[field.name]), default)
  return fields


def model_fields(model_name: str) -> dict[str, tuple[type, Any]]:
  """{field: (type, default)} of `models.<model_name>.Model`; `dtype` by name ('float32')."""
  model_cls = importlib.import_module(f'dsnet_jax.models.{model_name}').Model
  fields = _fields(model_cls, skip=('parent', 'name'))
  if 'dtype' in fields:
    fields['dtype'] = (str, 'float32')
  return fields


def _concrete_type(hint) -> type:
  """int | None -> int; tuple[int, ...] | None -> tuple."""
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    hint = next(h for h in typing.get_args(hint) if h is not type(None))
  return typing.get_origin(hint) or hint


# Every key of config.data as (type, default): DataSpec's fields.
DATA_FIELDS = _fields(DataSpec)
DATA_KEYS = tuple(DATA_FIELDS)


def with_defaults(tree: dict[str, Any]) -> dict[str, Any]:
  """A config as JSON data (e.g. a checkpoint's) with every key it leaves unset at its
  default (`defaults()`; the model section: the fields of its `model_name`'s model), so that
  one written before a key existed compares equal to one that sets the default."""
  reference = json.loads(defaults().to_json())
  name = tree.get('model_name', reference['model_name'])
  reference['model'] = (json.loads(_section(model_fields(name), {}, 'model').to_json())
                        if name in models.available_models() else {})
  return _merged(reference, tree)


def _merged(reference, tree):
  if not (isinstance(reference, dict) and isinstance(tree, dict)):
    return tree
  return {**reference, **{k: _merged(reference.get(k), v) for k, v in tree.items()}}


def _fits(value, hint) -> bool:
  """Whether `value` (as a config holds it: tuples, ints, floats, strings) is of type `hint`."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is Any:
    return True
  if origin is typing.Union or isinstance(hint, types.UnionType):
    return any(_fits(value, a) for a in args)
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_fits(v, args[0]) for v in value)
    return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args))
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, origin or hint)


def _hint_name(hint) -> str:
  return getattr(hint, '__name__', None) if not typing.get_args(hint) else str(hint)


def set_model(config: ml_collections.ConfigDict, model_name: str, **values) -> None:
  """Sets `config.model_name` and `config.model`: every field of that model's `Model`, at
  `values` or its default."""
  if model_name not in models.available_models():
    raise ConfigError(f'unknown model {model_name!r}; available: '
                      f'{", ".join(models.available_models())}')
  config.model_name = model_name
  config.model = _section(model_fields(model_name), values, 'model')


def _optimizer(**overrides) -> ml_collections.ConfigDict:
  # lr_batch_size: the batch size `lr` is for (0: lr as given); train time scales lr linearly
  # to config.batch_size. warmup_epochs, when > 0, sets warmup_steps (see resolve_durations).
  opt = dict(name='sgd', lr=0.08, lr_batch_size=0, end_lr=1e-5, warmup_steps=0,
             warmup_epochs=0.0, momentum=0.9, nesterov=True, b1=0.9, b2=0.999,
             weight_decay=1e-4, param_groups=(('.*', 1.0),))
  opt.update(overrides)
  return ml_collections.ConfigDict(opt)


def _unmixed_single_view() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(views=1, mixup_alpha=0.0, cutmix_alpha=0.0))


def stage_data(config: ml_collections.ConfigDict, stage: str) -> DataSpec:
  """The DataSpec of `stage`'s batches: `config.data` for the supernet; for later stages
  without mixup/cutmix and with one view unless `config.<stage>.data` says otherwise, then
  with the rest of `config.<stage>.data` applied."""
  data = config.data.to_dict()
  if stage != 'supernet':
    data.update(_unmixed_single_view().to_dict())
    data.update(config[stage].data.to_dict())
  return DataSpec(**data)


def supernet_recipe(config: ml_collections.ConfigDict) -> SupernetRecipe:
  """What a Stage I step does: `config.supernet`'s fields of the same names."""
  return _recipe(SupernetRecipe, config.supernet)


def gate_recipe(config: ml_collections.ConfigDict) -> GateRecipe:
  """What a Stage II step does: `config.gate`'s fields of the same names."""
  return _recipe(GateRecipe, config.gate)


def _recipe(cls, section: ml_collections.ConfigDict):
  return cls(**{field.name: section[field.name] for field in dataclasses.fields(cls)})


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file given as 'path' or 'path:arg' (as --config takes it;
  a relative path not found here is looked up in the repository), unlocked."""
  path, _, arg = spec.partition(':')
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
  if not os.path.isfile(path):
    raise ConfigError(f'no config file {spec}')
  module_spec = importlib.util.spec_from_file_location('loaded_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.unlock()
  return config


def defaults() -> ml_collections.ConfigDict:
  """Every key a config may set, at its default (the reference recipe's choices)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Keyword arguments of models.<model_name>.Model (all of them: set_model), and `dtype`: the
  # compute dtype, by name, 'float32' or 'bfloat16'. Parameters, optimizer state, BatchNorm
  # statistics, the EMA, logits, losses and the gate's routing stay float32 either way.
  set_model(c, 'ds_mbnet')
  c.data = data_section()
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_devices = 0  # 0: every device.
  c.stages = STAGES
  c.init_checkpoint = ''  # Variables to start from (e.g. an imported checkpoint).

  # A training stage lasts `steps`, or `epochs` of its training examples when > 0 (then
  # steps must be 0); resolve_durations turns epochs into steps at the final batch size.
  c.supernet = ml_collections.ConfigDict(dict(
      steps=1000, epochs=0.0, num_random_routes=2, label_smoothing=0.1, ema_decay=0.997,
      ensemble_ib=False, mvco=False, optimizer=_optimizer(),
      # In-place bootstrapping: routes but 'largest' learn the EMA teacher's soft targets
      # (False: every route learns the labels, the ablation of reference section 4).
      inplace_bootstrapping=True,
      # A route name: train only that route, on the labels (the same network trained alone,
      # the baseline a supernet's routes are compared with); '': the sandwich rule.
      train_route=''))
  # `data` of a later stage overrides config.data for that stage's batches. The default is the
  # authors' gate stage: the supernet's augmentation, but no mixup/cutmix and one view.
  # `examples` > 0 sets num_batches (examples / batch_size, rounded up).
  c.recalibrate = ml_collections.ConfigDict(dict(num_batches=20, examples=0,
                                                 data=_unmixed_single_view()))
  c.gate = ml_collections.ConfigDict(dict(
      steps=500, epochs=0.0, gumbel_tau=1.0, ce_weight=1.0, gate_ce_weight=1.0, madds_weight=0.5,
      madds_scale=1e9, madds_target=0.0, double_softmax=False, data=_unmixed_single_view(),
      # The authors' gate stage (reference section 5): label smoothing in both CEs, an EMA of
      # the model whose gated metrics are reported, Gumbel noise on the gate loss's logits.
      label_smoothing=0.1, ema_decay=0.997, gumbel_gate_loss=True,
      # 'smallest_wrong' (the authors' SGS: hard = the smallest route is wrong) or
      # 'widest_helps' ([ours]: hard = the smallest is wrong and the widest routed one right).
      sgs_targets='smallest_wrong',
      # [ours] The average cost the routed model must have (0: none; the MAdds penalty above
      # then applies): held by dual ascent (dual_lr) in training, then per-route logit offsets
      # calibrated on the last `calibration_examples` of the training split, which the gate
      # stage does not train on (dsnet_jax.budget).
      budget=0.0, budget_unit='largest', dual_lr=0.05, calibration_examples=5000,
      # The authors' Stage II exactly (DS-MBNet): their gate loss's double softmax and their
      # mask placement in the masked suffix (MaskedWidth.authors: the same values, their
      # gradient in the route weights); with their MAdds penalty (no budget), SGS targets and
      # Gumbel noise on the gate loss, which the keys above must then keep.
      authors_mode=False,
      optimizer=_optimizer(lr=0.08, weight_decay=0.01,
                           param_groups=(('.*routing_head.*', 1.0), ('.*', None)))))

  # [ours] An escalation router calibrated after the last stage (dsnet_jax.escalation): the
  # `chain` of routing-space routes (cheapest first; () = none; ('auto',): the most accurate
  # chain on the calibration images), to spend `budget` (a fraction
  # of 'largest''s MAdds, or MAdds with budget_unit='madds') on average, with thresholds on
  # `confidence` fitted on the last `calibration_examples` images of `calibration_split`
  # (another split than 'train': images Stage I never saw).
  c.escalation = ml_collections.ConfigDict(dict(
      chain=(), budget=0.0, budget_unit='largest', confidence='max_softmax',
      calibration_examples=5000, calibration_split='train'))
  c.log_every_steps = 50
  c.eval_every_steps = 0  # 0: evaluate at the end of each stage only.
  c.eval_every_epochs = 0.0  # > 0: sets eval_every_steps (in supernet epochs).
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.lock()
  return c


def fashion_mnist_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CPU-sized Fashion-MNIST recipe the demo configs share (both stages in minutes)."""
  config.data = data_section(name='fashion_mnist', image_size=28, num_classes=10,
                            augment='pad_crop_flip', in_memory=True)
  config.batch_size = 128
  config.eval_batch_size = 500
  config.supernet.steps = 800
  config.supernet.ema_decay = 0.98
  opt = config.supernet.optimizer
  opt.lr, opt.warmup_steps, opt.weight_decay = 0.1, 50, 5e-5
  config.recalibrate.num_batches = 10
  config.gate.steps = 300
  # The authors' gate recipe, held to a budget: 40 % of the largest route's MAdds on average.
  config.gate.budget = 0.4
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config


def imagenet_recipe(config: ml_collections.ConfigDict, arg: str | None
                    ) -> ml_collections.ConfigDict:
  """What the ImageNet configs share once `batch_size` and `supernet` are set: Stage II (30
  epochs, SGD 0.08, weight decay 0.01, MAdds in G), logging, and `:runlocal` shrinking."""
  config.gate.steps, config.gate.epochs = 0, 30.0
  config.gate.optimizer.lr = 0.08
  config.gate.optimizer.weight_decay = 0.01
  config.gate.madds_scale = 1e9
  config.log_every_steps = 100
  config.eval_every_epochs = 10.0
  config.checkpoint_every_steps = 2000
  if arg == 'runlocal':
    config.batch_size = config.eval_batch_size = 8
    for stage, steps in (('supernet', 10), ('gate', 5)):
      config[stage].steps, config[stage].epochs = steps, 0.0
      config[stage].optimizer.warmup_steps, config[stage].optimizer.warmup_epochs = 1, 0.0
      config[stage].optimizer.end_lr = 0.0  # Batch 8 scales lr below the default end.
    config.recalibrate.num_batches, config.recalibrate.examples = 2, 0
    config.log_every_steps = config.checkpoint_every_steps = 5
    config.eval_every_epochs = 0.0
  return config


def finetune_recipe(config: ml_collections.ConfigDict, checkpoint: str | None, epochs: float,
                    lr_factor: float, warmup_epochs: float) -> ml_collections.ConfigDict:
  """An ImageNet config's Stage I shortened for a start from an imported network: `checkpoint`
  (the config file's argument) as `init_checkpoint`, `epochs` of Stage I at `lr_factor` x its
  peak learning rate after `warmup_epochs`, and no gate attention head (so that 'largest'
  starts as exactly the imported network).

  Raises:
    ConfigError: no checkpoint given (training would silently start from scratch at a
      fine-tuning learning rate).
  """
  if not checkpoint:
    raise ConfigError('a fine-tuning config needs the imported checkpoint after a colon, e.g. '
                      '--config=configs/resnet50_finetune.py:ckpt/resnet50_tv (write it with '
                      'python -m dsnet_jax.tools.convert_pretrained)')
  config.init_checkpoint = checkpoint
  config.model.gate_attention = False
  config.supernet.epochs = epochs
  config.supernet.optimizer.lr *= lr_factor
  config.supernet.optimizer.warmup_epochs = warmup_epochs
  return config


TRAINED_STAGES = ('supernet', 'gate')


def counts_in_epochs(config: ml_collections.ConfigDict) -> bool:
  """Whether a duration is given in epochs (resolving it needs the training split's size)."""
  return bool(config.eval_every_epochs or any(
      config[s].epochs or config[s].optimizer.warmup_epochs for s in TRAINED_STAGES))


def resolve_durations(config: ml_collections.ConfigDict,
                      train_examples: Mapping[str, int] | None
                      ) -> ml_collections.ConfigDict:
  """A copy of `config` with every duration in steps at its batch size (big_vision's
  `utils.steps`): `<stage>.epochs` -> `<stage>.steps`, `optimizer.warmup_epochs` ->
  `warmup_steps`, `recalibrate.examples` -> `num_batches`, `eval_every_epochs` ->
  `eval_every_steps`; and `optimizer.lr` for `optimizer.lr_batch_size` scaled linearly to
  `batch_size` (Goyal et al. 2017; lr_batch_size then reads batch_size). Idempotent.

  Args:
    config: a validated training config.
    train_examples: {'supernet': n, 'gate': n} the examples an epoch of that stage covers;
      None: durations in epochs stay unresolved (the rest is resolved).
  Raises:
    ConfigError: a duration given both in steps and in epochs, or one that rounds to 0 steps;
      an end learning rate above the (scaled) peak.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  batch_size = config.batch_size

  def steps(epochs: float, examples: int, what: str) -> int:
    count = int(epochs * examples / batch_size)
    if count < 1:
      raise ConfigError(f'config key {what}={epochs} is {epochs * examples:.0f} examples, less '
                        f'than one batch of {batch_size}')
    return count

  def from_epochs(section, steps_key: str, epochs_key: str, examples: int | None, path: str):
    if not section[epochs_key] or examples is None:
      return
    count = steps(section[epochs_key], examples, f'{path}{epochs_key}')
    if section[steps_key] not in (0, count):
      raise ConfigError(f'config keys {path}{steps_key}={section[steps_key]} and '
                        f'{path}{epochs_key}={section[epochs_key]} are both set; set one (the '
                        f'other to 0), e.g. --config.{path}{steps_key}=0')
    section[steps_key] = count

  train_examples = train_examples or {}
  for stage in TRAINED_STAGES:
    section, examples = config[stage], train_examples.get(stage)
    from_epochs(section, 'steps', 'epochs', examples, f'{stage}.')
    from_epochs(section.optimizer, 'warmup_steps', 'warmup_epochs', examples,
                f'{stage}.optimizer.')
    opt = section.optimizer
    if opt.lr_batch_size:
      opt.lr, opt.lr_batch_size = opt.lr * batch_size / opt.lr_batch_size, batch_size
    if opt.end_lr > opt.lr:
      raise ConfigError(
          f'config key {stage}.optimizer.end_lr={opt.end_lr:g} is above the peak learning rate '
          f'{opt.lr:g} (lr scaled to batch_size={batch_size}): the cosine "decay" would rise; '
          f'set --config.{stage}.optimizer.end_lr below it')
  from_epochs(config, 'eval_every_steps', 'eval_every_epochs', train_examples.get('supernet'),
              '')
  if config.recalibrate.examples:
    config.recalibrate.num_batches = math.ceil(config.recalibrate.examples / batch_size)
  return config


# Keys resolve_durations derives from others: allowing one to change allows its derived key.
DERIVED_KEYS = {'epochs': 'steps', 'warmup_epochs': 'warmup_steps', 'examples': 'num_batches',
                'eval_every_epochs': 'eval_every_steps'}


def with_derived_keys(keys) -> tuple[str, ...]:
  """`keys` (config paths) and the keys resolve_durations derives from them."""
  out = list(keys)
  for key in keys:
    head, _, last = key.rpartition('.')
    if last in DERIVED_KEYS:
      out.append(f'{head}.{DERIVED_KEYS[last]}' if head else DERIVED_KEYS[last])
  return tuple(out)


def _walk(config, reference, prefix=''):
  for key, value in config.items():
    path = f'{prefix}{key}'
    if key not in reference:
      raise ConfigError(f'unknown config key {path!r}; valid keys here: '
                        f'{", ".join(sorted(reference.keys()))}')
    default = reference[key]
    if key == 'data':
      _check_data_keys(value, path)
      continue
    if key == 'model' and not prefix:
      continue
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f'config key {path!r} must be a section, got {value!r}')
      _walk(value, default, path + '.')
    elif default is not None and not _type_ok(value, default):
      raise ConfigError(f'config key {path!r} must be {type(default).__name__}, got {value!r}')


def _check_data_keys(data, path: str) -> None:
  for key in data:
    if key not in DATA_KEYS:
      raise ConfigError(f'unknown config key {path}.{key}; valid: {", ".join(DATA_KEYS)}')


def _type_ok(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first unknown key or unusable value, naming it."""
  _walk(config, defaults())
  if config.model_name not in models.available_models():
    raise ConfigError(f'config key model_name={config.model_name!r}: unknown model; available: '
                      f'{", ".join(models.available_models())}')
  model_cls = importlib.import_module(f'dsnet_jax.models.{config.model_name}').Model
  fields = model_fields(config.model_name)
  for key in config.model:
    if key not in fields:
      owners = [m for m in models.available_models() if key in model_fields(m)]
      hint = (f' (a field of {", ".join(owners)}: the model section was built for another '
              'model; use a config for this one, or config_lib.set_model)') if owners else ''
      raise ConfigError(f'unknown config key model.{key} for {config.model_name}{hint}; valid: '
                        f'{", ".join(sorted(fields))}')
  hints = typing.get_type_hints(model_cls)
  for key, value in config.model.items():
    if key != 'dtype' and not (value is None and fields[key][1] is None) and not _fits(
        value, hints[key]):
      raise ConfigError(f'config key model.{key}={value!r}: must be {_hint_name(hints[key])}')
  groups = {k: len(v) for k, v in config.model.items()
            if k.startswith('group_') and isinstance(v, (tuple, list))}
  if len(set(groups.values())) > 1:
    raise ConfigError(f'config keys {", ".join(f"model.{k}" for k in groups)}: one entry per '
                      f'group each, got lengths {", ".join(map(str, groups.values()))}')
  dtype = config.model.get('dtype')
  if dtype is not None and dtype not in models.COMPUTE_DTYPES:
    raise ConfigError(f'config key model.dtype={dtype!r}: use one of '
                      f'{", ".join(map(repr, models.COMPUTE_DTYPES))} (by name; float16 is not '
                      'offered: training has no loss scaling)')
  try:
    models.get_model(config.model_name, **config.model).routes  # Builds the route table.
  except (KeyError, ValueError, IndexError, TypeError) as e:
    raise ConfigError(f'config section model: {e}') from None
  bad_stages = [s for s in config.stages if s not in STAGES]
  if (bad_stages or not config.stages or len(set(config.stages)) != len(config.stages)
      or list(config.stages) != sorted(config.stages, key=STAGES.index)):
    raise ConfigError(f'config key stages={tuple(config.stages)}: use {STAGES} or an ordered '
                      'subset of them, each stage once')
  check_name(config.data.name)
  for stage in STAGES:  # Each stage's preprocessing as its pipeline will build it.
    try:
      preprocessing(stage_data(config, stage))
    except ValueError as e:  # ConfigError included.
      where = 'config.data' + ('' if stage == 'supernet' else f' with config.{stage}.data')
      raise ConfigError(f'{e} ({where})') from None
  model_classes = config.model.get('num_classes')
  data_classes = config.data.get('num_classes')
  if model_classes and data_classes and model_classes != data_classes:
    raise ConfigError(f'config keys model.num_classes={model_classes} and data.num_classes='
                      f'{data_classes} differ: the labels must fit the model\'s logits')
  if config.num_devices < 0:
    raise ConfigError(f'config key num_devices must be >= 0 (0: every device), got '
                      f'{config.num_devices}')
  non_negative = ['eval_every_epochs', 'recalibrate.examples'] + [
      f'{stage}.{key}' for stage in TRAINED_STAGES
      for key in ('epochs', 'optimizer.warmup_epochs', 'optimizer.warmup_steps',
                  'optimizer.lr_batch_size')]
  for path in non_negative:
    value = _get(config, path)
    if value is not None and not 0 <= value < float('inf'):
      raise ConfigError(f'config key {path} must be finite and >= 0, got {value}')
  for stage in TRAINED_STAGES:
    if config[stage].steps < 0 or config[stage].epochs < 0 or not (
        config[stage].steps or config[stage].epochs):
      raise ConfigError(f'config keys {stage}.steps={config[stage].steps} and {stage}.epochs='
                        f'{config[stage].epochs}: set one > 0 (the other 0)')
  positive = ['batch_size', 'eval_batch_size', 'data.image_size',
              'recalibrate.num_batches', 'log_every_steps', 'checkpoint_every_steps',
              'keep_checkpoints', 'gate.gumbel_tau', 'supernet.optimizer.lr', 'gate.optimizer.lr']
  for path in positive:
    value = _get(config, path)
    if value is not None and value <= 0:
      raise ConfigError(f'config key {path!r} must be > 0, got {value}')
  if config.supernet.ensemble_ib and not config.supernet.inplace_bootstrapping:
    raise ConfigError('config key supernet.ensemble_ib needs supernet.inplace_bootstrapping: '
                      'the ensemble is of bootstrapping teachers')
  if config.supernet.train_route:
    names = [r.name for r in models.get_model(config.model_name, **config.model).routes]
    if config.supernet.train_route not in names:
      raise ConfigError(f'config key supernet.train_route={config.supernet.train_route!r}: not '
                        f'a route of this model; routes: {", ".join(names)}')
  if config.supernet.mvco and config.data.get('views', 1) != 2:
    raise ConfigError('config key supernet.mvco needs data.views = 2 (two augmented views)')
  _validate_budget(config.gate)
  if (RouteTable.spec(config.model.get('routing_space', ())) == AUTO
      and not config.gate.budget):
    raise ConfigError("config key model.routing_space='auto' needs gate.budget: the routing "
                      'space is chosen for the budget')
  if config.gate.sgs_targets not in SGS_TARGETS:
    raise ConfigError(f'config key gate.sgs_targets={config.gate.sgs_targets!r}: use one of '
                      f'{", ".join(SGS_TARGETS)}')
  _validate_authors_mode(config)
  _validate_escalation(config.escalation)
  for stage in ('supernet', 'gate'):
    if not 0 <= config[stage].ema_decay < 1:
      raise ConfigError(f'config key {stage}.ema_decay must be in [0, 1), got '
                        f'{config[stage].ema_decay}')
  # Last, so that a key's own check names its range first. A NaN passes every bound.
  for path, value in flat_items(config.to_dict()).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'config key {path}={value}: not a finite number')


def _validate_authors_mode(config: ml_collections.ConfigDict) -> None:
  gate = config.gate
  if not gate.get('authors_mode', False):
    return
  ours = {'model_name': (config.model_name, 'ds_mbnet'), 'gate.budget': (gate.budget, 0.0),
          'gate.sgs_targets': (gate.sgs_targets, 'smallest_wrong'),
          'gate.gumbel_gate_loss': (gate.gumbel_gate_loss, True)}
  differ = [f'{k}={v!r} (theirs: {want!r})' for k, (v, want) in ours.items() if v != want]
  if differ:
    raise ConfigError(f"config key gate.authors_mode=True is the authors' Stage II of their "
                      f'DS-MBNet, but {", ".join(differ)}')


def _validate_escalation(section: ml_collections.ConfigDict) -> None:
  if section.confidence not in CONFIDENCES:
    raise ConfigError(f'config key escalation.confidence={section.confidence!r}: use one of '
                      f'{", ".join(CONFIDENCES)}')
  if section.calibration_examples < 1:
    raise ConfigError('config key escalation.calibration_examples must be >= 1, got '
                      f'{section.calibration_examples}')
  if not section.chain:
    if section.budget:  # Set for a router that is not asked for: say so, do not ignore it.
      raise ConfigError(f'config key escalation.budget={section.budget} without '
                        "escalation.chain: set the chain (e.g. (0, 6) or ('auto',)), or the "
                        'budget to 0')
    return
  if tuple(section.chain) != AUTO_CHAIN and (len(section.chain) < 2
                                       or len(set(map(str, section.chain))) != len(section.chain)):
    raise ConfigError(f'config key escalation.chain={tuple(section.chain)}: two or more '
                      "distinct routes of the routing space, cheapest first, or ('auto',)")
  if not 0 < section.budget < float('inf') or section.budget_unit not in ('largest', 'madds'):
    raise ConfigError(f'config keys escalation.budget={section.budget} and '
                      f"escalation.budget_unit={section.budget_unit!r}: a budget > 0 as a "
                      "fraction of 'largest''s MAdds ('largest') or in MAdds ('madds')")


def _validate_budget(gate: ml_collections.ConfigDict) -> None:
  if gate.budget < 0:
    raise ConfigError(f'config key gate.budget must be >= 0 (0: no budget), got {gate.budget}')
  if gate.budget_unit not in BUDGET_UNITS:
    raise ConfigError(f'config key gate.budget_unit={gate.budget_unit!r}: use one of '
                      f'{", ".join(BUDGET_UNITS)}')
  if not gate.budget:
    return
  if gate.budget_unit == 'largest' and gate.budget > 1:
    raise ConfigError(f'config key gate.budget={gate.budget} is a fraction of the largest '
                      "route's MAdds (budget_unit='largest'), so at most 1; for MAdds per image "
                      "set gate.budget_unit='madds'")
  if gate.madds_target:
    raise ConfigError('config keys gate.budget and gate.madds_target are both set: the budget '
                      'replaces the MAdds penalty; set madds_target = 0')
  if gate.calibration_examples < 1 or not 0 <= gate.dual_lr < float('inf'):
    raise ConfigError('with gate.budget set, gate.calibration_examples must be >= 1 and '
                      f'gate.dual_lr finite and >= 0, got {gate.calibration_examples} and '
                      f'{gate.dual_lr}')


def check_key_paths(config: ml_collections.ConfigDict, paths, what: str) -> None:
  """Raises ConfigError for a path ('a.b', or a 'section.' prefix) that names no config key."""
  leaves = flat_items(config.to_dict())
  for path in paths:
    key = path.rstrip('.')
    if key not in leaves and not any(leaf.startswith(key + '.') for leaf in leaves):
      raise ConfigError(f'{what} {path!r} is not a config key')


def flat_items(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b.c': leaf} of a nested dict (an empty section is a leaf {})."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flat_items(value, f'{prefix}{key}.'))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def validate_devices(config: ml_collections.ConfigDict, available: int,
                     num_processes: int = 1) -> None:
  """Raises ConfigError for more devices than there are, a subset of the devices when there
  are several processes (each needs its own), or batch sizes that do not split evenly over
  the devices and hosts."""
  if config.num_devices > available:
    raise ConfigError(f'config key num_devices={config.num_devices}: only {available} devices '
                      'are available')
  if num_processes > 1 and config.num_devices not in (0, available):
    raise ConfigError(f'config key num_devices={config.num_devices}: with {num_processes} '
                      f'processes the mesh must hold every device (0, or {available})')
  validate_batch_sizes(config, config.num_devices or available, num_processes)


def validate_batch_sizes(config: ml_collections.ConfigDict, num_devices: int,
                         num_processes: int = 1) -> None:
  """Raises ConfigError unless both batch sizes split evenly over the devices and hosts."""
  for key in ('batch_size', 'eval_batch_size'):
    for count, what in ((num_devices, 'devices of the mesh'), (num_processes, 'processes')):
      if config[key] % count:
        raise ConfigError(f'config key {key}={config[key]} is not divisible by the {count} '
                          f'{what}; use a multiple of {count} (or set num_devices)')


def _get(config, path: str):
  for part in path.split('.'):
    if part not in config:
      return None
    config = config[part]
  return config


# --- the resolved run: frozen specs ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SupernetSpec:
  """Stage I, resolved: its steps, optimizer, batches and what each step trains."""
  steps: int
  optimizer: OptimizerSpec
  data: DataSpec
  recipe: SupernetRecipe


@dataclasses.dataclass(frozen=True)
class RecalibrateSpec:
  """BN recalibration, resolved: how many batches of which data."""
  num_batches: int
  data: DataSpec


@dataclasses.dataclass(frozen=True)
class GateSpec:
  """Stage II, resolved: its steps, optimizer, batches, what each step trains, and the budget
  (`budget` in `budget_unit`, 0: none) with the training images held out to calibrate it
  (`held_out`, the last ones of the training split; 0 without a budget)."""
  steps: int
  optimizer: OptimizerSpec
  data: DataSpec
  recipe: GateRecipe
  budget: float
  budget_unit: str
  held_out: int


@dataclasses.dataclass(frozen=True)
class EscalationSpec:
  """The escalation router to calibrate after the last stage (config.escalation)."""
  chain: tuple[str, ...]
  budget: float
  budget_unit: str
  confidence: str
  calibration_examples: int
  calibration_split: str


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a run needs, resolved once from a config (`resolve`): durations in steps,
  learning rates scaled, each stage's data fixed, the model built. `config_json` is the
  resolved config as checkpoints record it and as resumes compare it."""
  config_json: str
  seed: int
  model_name: str
  model: Any  # The Flax module (hashable).
  stages: tuple[str, ...]
  batch_size: int
  eval_batch_size: int
  num_devices: int  # 0: every device.
  init_checkpoint: str
  supernet: SupernetSpec
  recalibrate: RecalibrateSpec
  gate: GateSpec
  eval_data: DataSpec
  log_every_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  escalation: EscalationSpec | None = None

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The resolved config (a fresh copy: the spec stays frozen)."""
    return from_json(self.config_json)

  def stage_steps(self, stage: str) -> int:
    """The step at which `stage` is finished."""
    return {'supernet': self.supernet.steps, 'recalibrate': self.recalibrate.num_batches,
            'gate': self.gate.steps}[stage]


def _tuples(tree):
  """JSON's lists back to the tuples configs hold (model fields must be hashable)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config saved as JSON (a checkpoint's meta), with its tuples restored."""
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


def optimizer_spec(section: ml_collections.ConfigDict) -> OptimizerSpec:
  """The OptimizerSpec of a resolved `<stage>.optimizer` section."""
  return _recipe(OptimizerSpec, section)


def resolve(config: ml_collections.ConfigDict) -> RunSpec:
  """The run `config` describes, validated and resolved (`resolve_config`), as frozen specs.

  Raises:
    ConfigError: an invalid config, or a budget's held-out images that leave the gate stage
      less than one batch; FileNotFoundError: data needed to resolve epochs is missing.
  """
  config = resolve_config(config)
  held_out = config.gate.calibration_examples if config.gate.budget else 0
  if held_out and not counts_in_epochs(config):  # Else resolve_config checked it.
    _check_held_out(config, num_examples(stage_data(config, 'supernet'), 'train'))
  return RunSpec(
      config_json=config.to_json(), seed=config.seed, model_name=config.model_name,
      model=models.get_model(config.model_name, **config.model), stages=tuple(config.stages),
      batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      num_devices=config.num_devices, init_checkpoint=config.init_checkpoint,
      supernet=SupernetSpec(config.supernet.steps, optimizer_spec(config.supernet.optimizer),
                            stage_data(config, 'supernet'), supernet_recipe(config)),
      recalibrate=RecalibrateSpec(config.recalibrate.num_batches,
                                  stage_data(config, 'recalibrate')),
      gate=GateSpec(config.gate.steps, optimizer_spec(config.gate.optimizer),
                    stage_data(config, 'gate'), gate_recipe(config), float(config.gate.budget),
                    config.gate.budget_unit, held_out),
      eval_data=data_spec(config.data), log_every_steps=config.log_every_steps,
      eval_every_steps=config.eval_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps,
      keep_checkpoints=config.keep_checkpoints,
      escalation=EscalationSpec(
          tuple(str(r) for r in config.escalation.chain), float(config.escalation.budget),
          config.escalation.budget_unit, config.escalation.confidence,
          config.escalation.calibration_examples, config.escalation.calibration_split)
      if config.escalation.chain else None)


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config as training runs it: validated, with every duration in steps at its batch
  size (`resolve_durations`; an epoch of the gate stage leaves out the examples held out to
  calibrate the budget).

  Raises:
    ConfigError: an invalid config; FileNotFoundError: the data is missing.
  """
  validate(config)
  if not counts_in_epochs(config):  # The data's size is not needed.
    return resolve_durations(config, None)
  check_available(data_spec(config.data), 'train')
  examples = num_examples(stage_data(config, 'supernet'), 'train')
  held_out = config.gate.calibration_examples if config.gate.budget else 0
  if held_out:
    _check_held_out(config, examples)
  return resolve_durations(config, {'supernet': examples, 'gate': examples - held_out})


def _check_held_out(config: ml_collections.ConfigDict, examples: int) -> None:
  held_out = config.gate.calibration_examples
  if examples - held_out < config.batch_size:
    raise ConfigError(
        f'config key gate.calibration_examples={held_out} leaves fewer than one batch of the '
        f'{examples} training examples for the gate stage')
