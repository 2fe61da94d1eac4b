"""DS-ResNet on Fashion-MNIST, both stages on a 2-core CPU: a narrow bottleneck ResNet
([1, 1, 2, 1] blocks, inner widths 8..64) with the DS-ResNet-50 mechanics.

    python train.py --config=configs/ds_resnet_fmnist.py --workdir=workdir/ds_resnet_fmnist
"""
from dsnet_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.fashion_mnist_recipe(config_lib.defaults())
  # routing_space: what budget.propose_routing_space picks for the 40 % budget from a measured
  # run (route 1 is no more accurate than a mix of routes 0 and 2).
  config_lib.set_model(
      config, 'ds_resnet', num_classes=10, in_channels=1, stem_features=16,
      group_inner_features=(8, 16, 32, 64), group_depths=(1, 1, 2, 1), group_strides=(1, 1, 2, 1),
      route_ratios=(0.25, 0.5, 0.625, 0.75), channel_multiple=4, routing_space=(0, 2, 3),
      dtype='float32')
  # No numbered route runs the later groups at full width: their BN statistics rows would be
  # shared with 'largest', whose prefix is twice as wide (see the README's notes).
  config.supernet.steps = 1500
  return config
