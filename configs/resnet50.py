"""DS-ResNet-50 on ImageNet, with the DS-MBNet recipe (reference sections 4-6).

    python train.py --config=configs/resnet50.py --workdir=gs://BUCKET/ds_resnet50

Needs imagenet2012 prepared with tfds as ArrayRecord (see README). Stage I: 150 epochs at
batch 1024, SGD Nesterov 0.4 (0.1 x batch/256), 5 warm-up epochs, cosine; Stage II: 30 epochs.
"""
from dsnet_jax import config_lib

def get_config(arg=None):
  config = config_lib.defaults()
  # dtype: the compute dtype; 'bfloat16' on accelerators (parameters stay float32).
  config_lib.set_model(config, 'ds_resnet', num_classes=1000, routing_space=(0, 1, 2, 3),
                       dtype='float32')
  config.data = config_lib.data_section(name='imagenet2012', image_size=224, num_classes=1000,
                                        augment='rrc_flip', num_threads=32, prefetch=32)
  config.batch_size = 1024
  config.eval_batch_size = 1024

  config.supernet.steps, config.supernet.epochs = 0, 150.0
  config.supernet.ema_decay = 0.9998
  opt = config.supernet.optimizer
  # 0.1 per 256 images, scaled to the batch size at train time.
  opt.lr, opt.lr_batch_size, opt.weight_decay, opt.warmup_epochs = 0.1, 256, 1e-4, 5.0
  config.recalibrate.examples = 1001 * 256
  return config_lib.imagenet_recipe(config, arg)
