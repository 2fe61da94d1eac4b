"""Trains a DS-Net supernet and its gate as the config says (resumes from --workdir); the
command line is `dsnet_jax/tools/train.py`.

    python train.py --config=configs/ds_mbnet_fmnist.py --workdir=workdir/ds_mbnet_fmnist
"""
from dsnet_jax import huge_pages

if __name__ == '__main__':
  huge_pages.relaunch()  # First: the imports below would otherwise run twice.
  from dsnet_jax.tools import train
  train.run()
