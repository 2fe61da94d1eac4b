"""Times every route and the routed model on this device; writes latency.json.

    python -m dsnet_jax.tools.latency --config=configs/ds_mbnet_fmnist.py \
        --workdir=workdir/ds_mbnet_fmnist             # writes workdir/.../latency.json
    python -m dsnet_jax.tools.latency --config=configs/ds_mbnet_fmnist.py \
        --output=workdir/ds_mbnet_fmnist/latency.json   # before training: random weights
    python -m dsnet_jax.tools.latency --model=ds_mbnet --image_size=224 --output=latency.json

What is measured, and how: `dsnet_jax.latency`.
"""
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags
import numpy as np

from dsnet_jax import (bn_calibration, config_lib, errors, escalation, eval_lib, inference,
                       latency, paths, stand_in)
from dsnet_jax.data import input_pipeline
from dsnet_jax.models import available_models, get_model
from dsnet_jax.tools import cli

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file('config', None, 'The config --workdir was trained with.')
flags.DEFINE_string('workdir', '', 'Training workdir: its latest stage is timed and '
                    'latency.json written there (without it: random weights of --config\'s '
                    'model).')
flags.DEFINE_string('model', '', 'Instead of a workdir: a model name, random weights.')
flags.DEFINE_integer('image_size', 224, 'With --model: image height and width.')
flags.DEFINE_integer('num_classes', 1000, 'With --model: classes.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'With --model: compute dtype.')
flags.DEFINE_integer('batch', 0, 'Throughput batch (0: 64 on CPU, 256 on accelerators).')
flags.DEFINE_list('batch_sizes', [], 'Batch sizes to time (default: 1 and --batch).')
flags.DEFINE_list('routes', [], 'Routes to time (default: every route of the table).')
flags.DEFINE_integer('rounds', 5, 'Timed rounds (median and p90).')
flags.DEFINE_integer('singles', 8, 'Images per batch-1 round.')
flags.DEFINE_list('escalation_chain', [], 'Also time escalation along these routes, each level '
                  'escalating --escalation_share of the images it sees (thresholds at that '
                  'quantile of their confidences here). A workdir\'s calibrated escalation is '
                  'timed without it.')
flags.DEFINE_float('escalation_share', 0.5, 'With --escalation_chain: the share each level '
                   'escalates.')
flags.DEFINE_string('output', '', 'Where to write the table (default: '
                    '<workdir>/latency.json; with --model: printed only).')


def main(argv):
  f = FLAGS
  if len(argv) > 1:
    raise errors.ConfigError(f'unexpected arguments {argv[1:]}')
  if bool(f.config) == bool(f.model) or (f.workdir and not f.config):
    raise errors.ConfigError('give --config (with --workdir: its trained model; without: random '
                         'weights) or --model (random weights)')
  batch = f.batch or latency.default_throughput_batch()
  try:
    sizes = sorted({int(b) for b in f.batch_sizes} | {1, batch})
  except ValueError:
    raise errors.ConfigError(f'--batch_sizes must be integers, got {f.batch_sizes}') from None
  output = f.output or (f.workdir and os.path.join(f.workdir, latency.LATENCY_FILE))
  paths.check_output(output, 'file', '--output')
  if f.model and (f.image_size < 1 or f.num_classes < 1):
    raise errors.ConfigError('--image_size and --num_classes must be positive')
  if sizes[0] < 1 or f.rounds < 1 or f.singles < 1:
    raise errors.ConfigError(f'batch sizes, --rounds and --singles must be positive, got {sizes}, '
                         f'{f.rounds}, {f.singles}')
  if f.escalation_chain and not 0 <= f.escalation_share <= 1:  # NaN too.
    raise errors.ConfigError(f'--escalation_share={f.escalation_share}: a fraction in [0, 1]')
  count = max(sizes[-1], f.singles)
  if f.model and f.model not in available_models():
    raise errors.ConfigError(f'unknown model {f.model!r}; available: '
                         f'{", ".join(available_models())}')
  rule = None
  if f.config:
    config_lib.validate(f.config)
    data = config_lib.data_spec(f.config.data)
    split = input_pipeline.EVAL_SPLITS[data.name]
    available = input_pipeline.num_examples(data, split)
    if count > available:
      raise errors.ConfigError(
          f'--batch_sizes up to {sizes[-1]} and --singles={f.singles} need {count} evaluation '
          f'images; {data.name} {split} has {available}')
    if f.workdir:
      loaded, pipeline, _ = eval_lib.restore_workdir(f.config, f.workdir)
      model, variables, rule = loaded.model, loaded.variables, loaded.escalation
    else:
      pipeline = eval_lib.eval_pipeline(config_lib.data_spec(f.config.data),
                                        f.config.eval_batch_size)
      model = get_model(f.config.model_name, **f.config.model)
      variables = stand_in.random_variables(model, pipeline.image_shape)
    image_shape = pipeline.image_shape
    images = latency.evaluation_images(pipeline, count)
  else:
    model = latency.model_for(f.model, f.image_size, num_classes=f.num_classes,
                              dtype=f.dtype)
    image_shape = (f.image_size, f.image_size, 3)
    variables = stand_in.random_variables(model, image_shape)
    images = np.random.default_rng(0).normal(size=(count, *image_shape)).astype(np.float32)
  variables = jax.device_put(variables)
  if f.escalation_chain:
    if not f.workdir:  # Random weights: statistics of real activations, so that confidences
      # (and the gate's choices) depend on the image.
      variables = bn_calibration.calibrate_to_batch(model, variables, images[:8],
                                                    [*f.escalation_chain, *f.routes])
    rule = escalation.at_share(model, variables, images, f.escalation_chain, f.escalation_share)
  predictor = inference.RoutedPredictor(model, variables, image_shape, max_batch=sizes[-1],
                                        escalation=rule)
  table = latency.measure(predictor, images, routes=f.routes or None, batch_sizes=sizes,
                          singles=f.singles, rounds=f.rounds)
  print(latency.format_table(table))
  if output:
    latency.save(table, output)
    print(f'wrote {output}')


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(cli.main_errors(main))
