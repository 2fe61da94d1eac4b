"""The demo: a DS-MBNet-shaped supernet for 28x28 Fashion-MNIST, both stages on a 2-core CPU.

Same mechanics as the ImageNet DS-MBNet (SE in every block, no residuals, gate in the first
block of stage 3, per-width BN statistics), with widths and strides sized for 28x28 inputs.

    python train.py --config=configs/ds_mbnet_fmnist.py --workdir=workdir/ds_mbnet_fmnist
"""
from dsnet_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.defaults()
  config.model = dict(
      num_classes=10, in_channels=1, stem_widths=(16, 24), stem_stride=2,
      stage_widths=((24, 32), (32, 48), (48, 64),
                    tuple(range(32, 129, 16)), tuple(range(64, 257, 32))),
      stage_depths=(1, 1, 1, 2, 1), stage_strides=(1, 1, 2, 1, 2), routing_space=(0, 1, 2, 3),
      dropout_rate=0.1)
  config.data = dict(name='fashion_mnist', image_size=28, num_classes=10,
                     augment='pad_crop_flip', in_memory=True, num_threads=2)
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
  config.gate.madds_weight = 0.5
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config
