"""DS-ViT++ on Fashion-MNIST, both stages on a 2-core CPU: a 6-block ViT (width 96, 6 heads,
patch 7) in 3 groups of 2 blocks, the gate after group 0.

    python train.py --config=configs/ds_vit_fmnist.py --workdir=workdir/ds_vit_fmnist
"""
from dsnet_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.fashion_mnist_recipe(config_lib.defaults())
  config_lib.set_model(
      config, 'ds_vit', variant=None, width=96, depth=6, num_heads=6, mlp_dim=192, patch_size=7,
      image_size=28, in_channels=1, num_classes=10, group_depths=(2, 2, 2),
      routing_space=(0, 2, 4, 6), drop_path_rate=0.05, dtype='float32')
  opt = config.supernet.optimizer
  opt.name, opt.lr, opt.weight_decay, opt.end_lr = 'adamw', 2e-3, 0.05, 1e-5
  config.recalibrate.num_batches = 1  # No BatchNorm in a ViT: nothing to recalibrate.
  return config
