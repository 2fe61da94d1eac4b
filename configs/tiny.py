"""A few steps of every stage on synthetic data, for tests (about a minute on a quiet 2-core CPU).

    python train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""
from dsnet_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.defaults()
  config_lib.set_model(
      config, 'ds_mbnet', num_classes=4, in_channels=1, stem_widths=(4, 8), stem_stride=1,
      group_widths=((8, 12), (8, 12), (12, 16), (8, 12, 16, 20), (16, 20, 24, 28)),
      group_depths=(1, 1, 1, 2, 1), group_strides=(1, 2, 1, 2, 1), routing_space=(0, 1, 2),
      dtype='float32')
  config.data = config_lib.data_section(
      name='synthetic', image_size=16, channels=1, num_classes=4, synthetic_num_examples=64,
      augment='pad_crop_flip')
  config.batch_size = 8
  config.eval_batch_size = 16
  config.supernet.steps = 4
  config.supernet.optimizer.warmup_steps = 1
  config.recalibrate.num_batches = 2
  config.gate.steps = 3
  config.gate.madds_scale = 1e5
  config.gate.calibration_examples = 24  # Of the 64 synthetic examples, when a budget is set.
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  return config
