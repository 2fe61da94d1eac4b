"""DS-ResNet-50 on ImageNet, Stage I started from torchvision's ResNet-50 (fine-tuning).

    python -m dsnet_jax.tools.convert_pretrained --model=resnet50 --out=ckpt/resnet50_tv
    python train.py --config=configs/resnet50_finetune.py:ckpt/resnet50_tv \
        --workdir=gs://BUCKET/ds_resnet50_ft

The argument after ':' is the imported checkpoint (`config.init_checkpoint`); it is required.
'largest' starts as the source network, every other route as its prefix. configs/resnet50.py's
recipe, shortened for a trained start (a starting point, not tuned on ImageNet here): 40 Stage
I epochs (not 150) at a fifth of its peak learning rate (0.02 per 256 images), a 1-epoch
warm-up, cosine; the gate stage as there. No gate attention head (it would change 'largest').
"""
import os

from dsnet_jax import config_lib


def get_config(arg=None):
  return config_lib.finetune_recipe(
      config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'resnet50.py')), arg,
      epochs=40.0, lr_factor=0.2, warmup_epochs=1.0)
