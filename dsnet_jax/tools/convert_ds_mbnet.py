"""Imports the authors' PyTorch DS-MBNet weights (github.com/changlin31/DS-Net) as an orbax
checkpoint of `ds_mbnet.Model()` (`dsnet_jax.convert.ds_mbnet_torch` says how).

    python -m dsnet_jax.tools.convert_ds_mbnet --input=DS_MBNet-70_1.pth.tar --out=DIR \
        [--weights=ema|plain]
"""
from __future__ import annotations

import argparse
from typing import Sequence

import jax

from dsnet_jax.convert import ds_mbnet_torch
from dsnet_jax.tools import cli


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(prog='python -m dsnet_jax.tools.convert_ds_mbnet',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--input', required=True,
                      help='PyTorch checkpoint (.pth.tar, .pth; needs torch) or .npz state dict')
  parser.add_argument('--out', required=True, help='new or empty directory for the checkpoint')
  parser.add_argument('--weights', choices=list(ds_mbnet_torch.CHECKPOINT_KEYS), default='ema',
                      help='which weights of a training checkpoint (default: ema)')
  args = parser.parse_args(argv)
  state_dict = ds_mbnet_torch.load_state_dict(args.input, args.weights)
  variables = ds_mbnet_torch.convert_state_dict(state_dict)
  directory = ds_mbnet_torch.save_checkpoint(variables, args.out)
  dropped = sum(k.endswith('.num_batches_tracked') for k in state_dict)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  print(f'converted {len(state_dict) - dropped} tensors (dropped {dropped} num_batches_tracked): '
        f'{count(variables["params"]):,} params, {count(variables["batch_stats"]):,} batch '
        f'statistics -> {directory}')


if __name__ == '__main__':
  cli.main_errors(main, ImportError)()
