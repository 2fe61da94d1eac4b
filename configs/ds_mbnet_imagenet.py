"""DS-MBNet on ImageNet, the reference recipe (reference sections 2, 4, 5).

    python train.py --config=configs/ds_mbnet_imagenet.py --workdir=gs://.../ds_mbnet
    python train.py --config=configs/ds_mbnet_imagenet.py:runlocal --workdir=/tmp/ds_mbnet

Needs imagenet2012 prepared with tfds as ArrayRecord (see README). Stage I: 150 + 10 epochs
at batch 512 with RandAugment m9 and random erasing 0.2; Stage II: 30 epochs.
"""
from dsnet_jax import config_lib

def get_config(arg=None):
  config = config_lib.defaults()
  # dtype: the compute dtype; 'bfloat16' on accelerators (parameters stay float32).
  config_lib.set_model(config, 'ds_mbnet', num_classes=1000, routing_space=(0, 1, 2, 3),
                       dropout_rate=0.2, dtype='float32')
  config.data = config_lib.data_section(
      name='imagenet2012', image_size=224, num_classes=1000, augment='rrc_flip',
      randaugment='rand-m9-mstd0.5', random_erasing=0.2, num_threads=16, prefetch=16)
  config.batch_size = 512
  config.eval_batch_size = 1000

  config.supernet.steps, config.supernet.epochs = 0, 160.0
  config.supernet.num_random_routes = 2
  config.supernet.label_smoothing = 0.1
  config.supernet.ema_decay = 0.997
  opt = config.supernet.optimizer
  opt.name, opt.lr, opt.end_lr, opt.momentum, opt.nesterov = 'sgd', 0.08, 1e-5, 0.9, True
  opt.warmup_epochs = 5.0
  opt.weight_decay = 1e-4
  config.recalibrate.examples = 1001 * 256
  return config_lib.imagenet_recipe(config, arg)
