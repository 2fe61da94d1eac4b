"""DS-ViT++ on Fashion-MNIST, both stages on a 2-core CPU: a 6-block ViT (width 96, 6 heads,
patch 7) in 3 stages of 2 blocks, the gate after stage 0.

    python train.py --config=configs/ds_vit_fmnist.py --workdir=workdir/ds_vit_fmnist
"""
from dsnet_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.defaults()
  config.model_name = 'ds_vit'
  config.model = dict(variant=None, width=96, depth=6, num_heads=6, mlp_dim=192, patch_size=7,
                      image_size=28, in_channels=1, num_classes=10, stage_depths=(2, 2, 2),
                      routing_space=(0, 2, 4, 6), drop_path_rate=0.05)
  config.data = dict(name='fashion_mnist', image_size=28, num_classes=10,
                     augment='pad_crop_flip', in_memory=True)
  config.batch_size = 128
  config.eval_batch_size = 500
  config.supernet.steps = 800
  config.supernet.ema_decay = 0.98
  opt = config.supernet.optimizer
  opt.name, opt.lr, opt.weight_decay, opt.warmup_steps, opt.end_lr = 'adamw', 2e-3, 0.05, 50, 1e-5
  config.recalibrate.num_batches = 1  # No BatchNorm in a ViT: nothing to recalibrate.
  config.gate.steps = 300
  config.gate.optimizer.lr = 0.05
  config.gate.madds_scale = 1e6
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config
