"""Evaluates a trained workdir: route table, gated result; eval.json, eval.png, routes.npy.

    python eval.py --workdir=workdir/ds_mbnet_fmnist   # the config saved with its checkpoint
    python eval.py --config=configs/ds_mbnet_fmnist.py --workdir=workdir/ds_mbnet_fmnist

The report goes to --output_dir, by default the evaluated checkpoint's folder
(<workdir>/checkpoints/<stage>), never over what training wrote in the workdir.
"""
from dsnet_jax import huge_pages

if __name__ == '__main__':
  huge_pages.relaunch()  # First: the imports below would otherwise run twice.

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dsnet_jax import eval_lib, paths, rundir  # noqa: E402
from dsnet_jax.tools import cli  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'The config the workdir was trained with '
                                '(default: the one saved with the evaluated checkpoint).')
flags.DEFINE_string('workdir', None, 'Training workdir to evaluate (its latest stage).')
flags.DEFINE_string('checkpoint', '', 'A checkpoint directory (a step folder\'s parent) '
                    'instead of the latest stage in --workdir.')
flags.DEFINE_list('allow_config_change', [], 'Model config keys that may differ from the '
                  'checkpoint\'s saved config.')
flags.DEFINE_string('output_dir', '', 'Where eval.json, eval.png and routes.npy go (default: '
                    'the evaluated checkpoint\'s folder).')
flags.DEFINE_bool('print_config', False, 'Print the config (after overrides) and exit.')


def main(argv):
  del argv
  if not cli.start(flags.FLAGS, needs=('workdir', 'checkpoint')):
    return
  output_dir = flags.FLAGS.output_dir
  paths.check_output(output_dir, 'dir', '--output_dir')
  config = flags.FLAGS.config
  if config is None:
    config = rundir.saved_config(flags.FLAGS.checkpoint
                                 or rundir.RunDir(flags.FLAGS.workdir).latest_stage_dir())
  eval_lib.evaluate_workdir(config, flags.FLAGS.workdir, flags.FLAGS.checkpoint,
                            flags.FLAGS.allow_config_change, flags.FLAGS.output_dir or None)


def run():
  app.run(cli.main_errors(main), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
