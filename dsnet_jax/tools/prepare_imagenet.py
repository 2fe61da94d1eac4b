"""Prepares ImageNet-1k for training: tfds's own `imagenet2012` builder on the ILSVRC2012
archives, written as ArrayRecord (what the input pipeline reads).

    python -m dsnet_jax.tools.prepare_imagenet --manual_dir=DIR [--data_dir=DATA_DIR]
    python -m dsnet_jax.tools.prepare_imagenet --convert=DATA_DIR/imagenet2012/5.1.0

DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; DATA_DIR is the configs'
`data.data_dir` (default: tfds's, ~/tensorflow_datasets). --convert adds ArrayRecord to data
already prepared as TFRecord. Needs TensorFlow (`pip install '.[tf]'`); `tfds build` and
`tfds convert_format` do the same but need apache_beam and mlcroissant besides.
"""
from absl import app, flags

from dsnet_jax import errors
from dsnet_jax.data import imagenet
from dsnet_jax.tools import cli

flags.DEFINE_string('manual_dir', None, 'The folder that holds the ILSVRC2012 archives.')
flags.DEFINE_string('data_dir', None, "Where tfds writes the prepared data (tfds's default "
                    'when not given).')
flags.DEFINE_string('convert', None, 'Instead: the version folder of imagenet2012 prepared as '
                    'TFRecord, to add ArrayRecord to.')


def main(argv):
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  if bool(f.manual_dir) == bool(f.convert):
    raise errors.ConfigError('pass exactly one of --manual_dir and --convert')
  if f.convert:
    builder = imagenet.convert_to_array_record(f.convert)
  else:
    builder = imagenet.prepare(f.manual_dir, f.data_dir)
  splits = {str(name): info.num_examples for name, info in builder.info.splits.items()}
  print(f'{imagenet.NAME} prepared in {builder.data_dir}: {splits}')


if __name__ == '__main__':
  app.run(cli.main_errors(main))
