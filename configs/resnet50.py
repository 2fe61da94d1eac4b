"""DS-ResNet-50 on ImageNet, with the DS-MBNet recipe (reference sections 4-6).

    python train.py --config=configs/resnet50.py --workdir=gs://BUCKET/ds_resnet50

Needs imagenet2012 prepared with tfds as ArrayRecord (see README). Stage I: 150 epochs at
batch 1024, SGD Nesterov 0.4 (0.1 x batch/256), 5 warm-up epochs, cosine; Stage II: 30 epochs.
"""
from dsnet_jax import config_lib

def get_config(arg=None):
  config = config_lib.defaults()
  config.model_name = 'ds_resnet'
  # dtype: the compute dtype; 'bfloat16' on accelerators (parameters stay float32).
  config.model = dict(num_classes=1000, routing_space=(0, 1, 2, 3), dtype='float32')
  config.data = dict(name='imagenet2012', image_size=224, num_classes=1000, augment='rrc_flip',
                     num_threads=32, prefetch=4)
  config.batch_size = 1024
  config.eval_batch_size = 1024
  steps_per_epoch = config_lib.IMAGENET_TRAIN_IMAGES // config.batch_size

  config.supernet.steps = 150 * steps_per_epoch
  config.supernet.ema_decay = 0.9998
  opt = config.supernet.optimizer
  opt.lr, opt.weight_decay, opt.warmup_steps = 0.4, 1e-4, 5 * steps_per_epoch
  config.recalibrate.num_batches = 1001 * 256 // config.batch_size
  return config_lib.imagenet_recipe(config, arg)
