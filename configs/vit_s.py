"""DS-ViT++-S/16 on ImageNet: the card's main entry point.

    python train.py --config=configs/vit_s.py --workdir=gs://BUCKET/ds_vit_s
    python train.py --config=configs/vit_s.py:runlocal --workdir=/tmp/ds_vit_s   # a smoke run

Needs imagenet2012 prepared with tfds as ArrayRecord (see README); without it the run stops at
once and says how to prepare it. Recipe (DeiT-S with our DS-Net++ additions, see
dsnet_jax/models/ds_vit.py): AdamW 5e-4 x batch/512, weight decay 0.05, 5 warm-up epochs,
cosine over 300 epochs, label smoothing 0.1, drop path 0.1 on 'largest', mixup 0.8 / cutmix
1.0, RandAugment m9 n2, random erasing 0.25, and multi-view consistency (two views per image,
the IB teacher averaged over them). Expected cost: Stage I is 300 epochs of a sandwich of 4
routes on two views, about 8x the compute of training DeiT-S alone (DeiT-S: ~3 days on 8 V100);
on a v4-32 TPU slice or 8 H100, plan on roughly a week. Stage II: 30 epochs, forward-heavy.
"""
from dsnet_jax import config_lib

def get_config(arg=None):
  config = config_lib.defaults()
  # dtype: the compute dtype; 'bfloat16' on accelerators (parameters stay float32).
  config_lib.set_model(config, 'ds_vit', variant='S/16', image_size=224, num_classes=1000,
                       drop_path_rate=0.1, dtype='float32')
  config.data = config_lib.data_section(
      name='imagenet2012', image_size=224, num_classes=1000, augment='rrc_flip', views=2,
      mixup_alpha=0.8, cutmix_alpha=1.0, randaugment='rand-m9-n2', random_erasing=0.25,
      num_threads=32, prefetch=32)
  config.batch_size = 1024
  config.eval_batch_size = 1024

  config.supernet.steps, config.supernet.epochs = 0, 300.0
  config.supernet.label_smoothing = 0.1
  config.supernet.ema_decay = 0.9998
  config.supernet.mvco = True
  opt = config.supernet.optimizer
  opt.name, opt.end_lr, opt.weight_decay = 'adamw', 1e-5, 0.05
  opt.lr, opt.lr_batch_size = 5e-4, 512  # Scaled to the batch size at train time.
  opt.warmup_epochs = 5.0
  config.recalibrate.num_batches = 1  # No BatchNorm in a ViT: nothing to recalibrate.
  return config_lib.imagenet_recipe(config, arg)
