"""Calibrates an escalation router for a trained checkpoint (no gate needed) and evaluates it.

    python -m dsnet_jax.tools.escalate --workdir=workdir/ds_mbnet_fmnist --chain=0,6 --budget=0.4

Every image runs the prefix and the chain's first route; the least confident go on to the
next route, as many as the budget pays for on held-out images (the last
--calibration_examples of --calibration_split, the training split by default). Writes
`escalation.json` beside the checkpoint (eval.py, `dsnet_jax.load` and `RoutedPredictor` read
it), then reports on the evaluation split with the budget's error there.
"""
from absl import app, flags
from ml_collections import config_flags

from dsnet_jax import config_lib, errors, escalation, eval_lib, paths, rundir
from dsnet_jax.tools import cli

config_flags.DEFINE_config_file('config', None, 'The config the checkpoint was trained with '
                                '(default: the one saved with it).')
flags.DEFINE_string('workdir', '', 'Training workdir: its latest stage is calibrated.')
flags.DEFINE_string('checkpoint', '', 'A stage checkpoint folder instead of --workdir.')
flags.DEFINE_list('chain', None, 'Routes of the routing space, cheapest first, e.g. 0,6; or '
                  'auto: of every chain that can spend the budget, the most accurate on the '
                  'calibration images.')
flags.DEFINE_float('budget', None, 'Average cost per image to spend.')
flags.DEFINE_enum('budget_unit', 'largest', ['largest', 'madds'],
                  "--budget as a fraction of 'largest''s MAdds, or in MAdds per image.")
flags.DEFINE_enum('confidence', 'max_softmax', list(escalation.CONFIDENCES),
                  'Confidence of a prediction: its largest softmax probability, or the '
                  'margin between its two largest.')
flags.DEFINE_integer('calibration_examples', 5000, 'How many images calibrate the thresholds: '
                     'the last ones of --calibration_split.')
flags.DEFINE_string('calibration_split', 'train', 'The split they come from: another than '
                    "'train' holds images Stage I never saw (the thresholds then hold the budget "
                    'on new images).')
flags.DEFINE_string('output_dir', '', 'Where the evaluation report goes (default: the '
                    'checkpoint\'s folder).')
flags.mark_flags_as_required(['chain', 'budget'])
# A test split whose cost misses the budget by more than this says so.
TOLERANCE = 0.05


def main(argv):
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.checkpoint):
    raise errors.ConfigError('pass exactly one of --workdir and --checkpoint')
  if f.calibration_examples < 1:
    raise errors.ConfigError('--calibration_examples must be positive')
  paths.check_output(f.output_dir, 'dir', '--output_dir')
  directory = f.checkpoint or rundir.RunDir(f.workdir).latest_stage_dir()
  config = f.config
  if config is None:
    config = rundir.saved_config(directory)
  else:  # The rule is read back with the checkpoint's own config: its routing space.
    try:
      saved = rundir.saved_config(directory).model.get('routing_space')
    except errors.ConfigError:  # An imported checkpoint saves none: --config is its config.
      saved = None
    if saved is not None and tuple(map(str, saved)) != tuple(
        map(str, config.model.get('routing_space'))):
      raise errors.ConfigError(
          f'--config has routing space {config.model.routing_space}; {directory} was saved with '
          f'{saved}, with which eval.py and dsnet_jax.load read the rule: calibrate for that one')
  eval_lib.check_calibration_images(config_lib.data_spec(config.data), f.calibration_split,
                                    f.calibration_examples)
  # The rule saved for the checkpoint is not read: it is to be replaced (even a damaged one).
  loaded, pipeline, mesh = eval_lib.restore_workdir(config, f.workdir, f.checkpoint,
                                                    with_escalation=False)
  rule, found = eval_lib.calibrate_escalation(
      loaded.model, loaded.variables, config_lib.data_spec(config.data),
      config.eval_batch_size, f.chain, f.budget, f.budget_unit, f.confidence,
      f.calibration_examples, mesh, f.calibration_split)
  path = rundir.save_escalation(loaded.restored.directory, rule, loaded.restored.step,
                                loaded.model, loaded.image_shape, **found)
  print(f'escalation saved -> {path}')
  report = eval_lib.evaluate_and_report(
      loaded.model, loaded.variables, pipeline, mesh,
      f.output_dir or loaded.restored.directory, gated=loaded.restored.gated,
      budget_meta=eval_lib.calibrated_budget(loaded.restored.meta),
      title=eval_lib.report_title(loaded.model, config, loaded.restored), escalation=rule)
  tested = report['routers']['escalation']['madds']
  if abs(tested / rule.budget - 1) > TOLERANCE:
    print(f'warning: on the evaluation split escalation spends {tested / 1e6:.4g} M MAdds per '
          f'image, {100 * (tested / rule.budget - 1):+.1f} % from the budget: the network is '
          'more confident on images it trained on. Calibrate on images Stage I never saw '
          '(--calibration_split).')


if __name__ == '__main__':
  app.run(cli.main_errors(main))
