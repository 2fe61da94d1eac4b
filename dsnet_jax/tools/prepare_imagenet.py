"""Prepares ImageNet-1k for training: tfds's own `imagenet2012` builder on the ILSVRC2012
archives, written as ArrayRecord (what the input pipeline reads).

    python -m dsnet_jax.tools.prepare_imagenet --manual_dir=DIR [--data_dir=DATA_DIR]

DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; DATA_DIR is the configs'
`data.data_dir` (default: tfds's, ~/tensorflow_datasets). Needs TensorFlow (`pip install
'.[tf]'`); `tfds build` does the same but needs apache_beam and mlcroissant besides.
"""
from absl import app, flags

from dsnet_jax.data import imagenet
from dsnet_jax.tools import cli

flags.DEFINE_string('manual_dir', None, 'The folder that holds the ILSVRC2012 archives.')
flags.DEFINE_string('data_dir', None, "Where tfds writes the prepared data (tfds's default "
                    'when not given).')
flags.mark_flag_as_required('manual_dir')


def main(argv):
  del argv
  cli.quiet_library_logs()
  builder = imagenet.prepare(flags.FLAGS.manual_dir, flags.FLAGS.data_dir)
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  print(f'{imagenet.NAME} prepared in {builder.data_dir}: {splits}')


if __name__ == '__main__':
  app.run(cli.main_errors(main))
