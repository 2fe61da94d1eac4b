"""DS-ViT++-S/16 on ImageNet, Stage I started from timm's DeiT-S or ViT-S (fine-tuning).

    python -m dsnet_jax.tools.convert_pretrained --model=deit_small_patch16_224 --out=ckpt/deit_s
    python train.py --config=configs/vit_s_finetune.py:ckpt/deit_s --workdir=gs://BUCKET/ds_vit_s_ft

The argument after ':' is the imported checkpoint (`config.init_checkpoint`); it is required.
From `vit_small_patch16_224` (AugReg) weights add `--config.data.normalization=inception`
(they expect mean = std = 0.5). configs/vit_s.py's recipe, shortened for a trained start (a
starting point, not tuned on ImageNet here): 100 Stage I epochs (not 300) at a fifth of its
peak learning rate (1e-4 per 512 images), a 2-epoch warm-up, cosine; MvCo, mixup/cutmix and
RandAugment as there. No gate attention head (it would change 'largest').
"""
import os

from dsnet_jax import config_lib


def get_config(arg=None):
  return config_lib.finetune_recipe(
      config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'vit_s.py')), arg,
      epochs=100.0, lr_factor=0.2, warmup_epochs=2.0)
