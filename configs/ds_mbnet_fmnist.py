"""The demo: a DS-MBNet-shaped supernet for 28x28 Fashion-MNIST, both stages on a 2-core CPU.

Same mechanics as the ImageNet DS-MBNet (SE in every block, no residuals, gate in the first
block of group 3, per-width BN statistics), with widths and strides sized for 28x28 inputs.

    python train.py --config=configs/ds_mbnet_fmnist.py --workdir=workdir/ds_mbnet_fmnist
"""
from dsnet_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.fashion_mnist_recipe(config_lib.defaults())
  config_lib.set_model(
      config, 'ds_mbnet', num_classes=10, in_channels=1, stem_widths=(16, 24), stem_stride=2,
      group_widths=((24, 32), (32, 48), (48, 64),
                    tuple(range(32, 129, 16)), tuple(range(64, 257, 32))),
      group_depths=(1, 1, 1, 2, 1), group_strides=(1, 1, 2, 1, 2), routing_space=(0, 2, 4, 6),
      dropout_rate=0.1, dtype='float32')
  config.data.num_threads = 2
  config.supernet.steps = 1000
  # The router the demo reports first: escalation at the gate's budget (40 % of 'largest''s
  # MAdds) along the chain of the routing space that is most accurate on the last 5000 training
  # images, where it is calibrated (route 0 -> route 6 on seed 0; README, study table 5).
  config.escalation.chain = ('auto',)
  config.escalation.budget = 0.4
  return config
