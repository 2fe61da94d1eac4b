"""Trains a DS-Net supernet and its gate as the config says (resumes from --workdir).

    python train.py --config=configs/ds_mbnet_fmnist.py --workdir=workdir/ds_mbnet_fmnist
    python -m dsnet_jax.tools.train ...   # the same
"""
from dsnet_jax import huge_pages

if __name__ == '__main__':
  huge_pages.relaunch()  # First: the imports below would otherwise run twice.

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dsnet_jax import config_lib, train_lib  # noqa: E402
from dsnet_jax.tools import cli  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and eval results go here.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host); on '
                  'TPU VMs and SLURM it finds its peers, elsewhere give the three flags below.')
flags.DEFINE_string('coordinator_address', None, 'With --distributed: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'With --distributed: how many processes.')
flags.DEFINE_integer('process_id', None, 'With --distributed: this process\'s index.')
flags.DEFINE_list('allow_config_change', [], 'Config keys (or "section." prefixes) that may '
                  'differ from the workdir\'s checkpoints, e.g. supernet.steps to extend a stage.')
flags.DEFINE_bool('print_config', False, 'Print the config (after overrides, durations '
                  'resolved into steps) and exit.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  if not cli.start(flags.FLAGS, config_lib.resolve_config):
    return
  cli.start_distributed(flags.FLAGS)
  train_lib.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir,
                               flags.FLAGS.allow_config_change)


def run():
  app.run(cli.main_errors(main), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
