"""DS-ResNet on Fashion-MNIST, both stages on a 2-core CPU: a narrow bottleneck ResNet
([1, 1, 2, 1] blocks, inner widths 8..64) with the DS-ResNet-50 mechanics.

    python train.py --config=configs/ds_resnet_fmnist.py --workdir=workdir/ds_resnet_fmnist
"""
from dsnet_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.defaults()
  config.model_name = 'ds_resnet'
  config.model = dict(num_classes=10, in_channels=1, stem_features=16,
                      stage_features=(8, 16, 32, 64), stage_depths=(1, 1, 2, 1),
                      stage_strides=(1, 1, 2, 1), route_ratios=(0.25, 0.5, 0.75, 1.0),
                      channel_multiple=4, routing_space=(0, 1, 2, 3))
  config.data = dict(name='fashion_mnist', image_size=28, num_classes=10,
                     augment='pad_crop_flip', in_memory=True)
  config.batch_size = 128
  config.eval_batch_size = 500
  config.supernet.steps = 800
  config.supernet.ema_decay = 0.98
  config.supernet.optimizer.lr = 0.1
  config.supernet.optimizer.warmup_steps = 50
  config.supernet.optimizer.weight_decay = 5e-5
  config.recalibrate.num_batches = 10
  config.gate.steps = 300
  config.gate.optimizer.lr = 0.05
  config.gate.madds_scale = 1e6
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config
