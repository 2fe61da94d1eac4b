"""Evaluates a trained workdir: route table, gated result, eval.json and eval.png.

    python eval.py --config=configs/ds_mbnet_fmnist.py --workdir=workdir/ds_mbnet_fmnist
"""
from absl import app, flags, logging
from ml_collections import config_flags

from dsnet_jax import cli, eval_lib

config_flags.DEFINE_config_file('config', None, 'The config the workdir was trained with.')
flags.DEFINE_string('workdir', None, 'Training workdir to evaluate (results are written there).')
flags.DEFINE_string('checkpoint', '', 'A checkpoint directory (a step folder\'s parent) '
                    'instead of the latest stage in --workdir.')
flags.DEFINE_list('allow_config_change', [], 'Model config keys that may differ from the '
                  'checkpoint\'s saved config.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  eval_lib.evaluate_workdir(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.checkpoint,
                            flags.FLAGS.allow_config_change)


if __name__ == '__main__':
  app.run(cli.main_errors(main))
