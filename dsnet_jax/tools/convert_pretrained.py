"""Imports a torchvision ResNet-50 or a timm ViT/DeiT as an orbax checkpoint of the matching
supernet (DS-ResNet-50, DS-ViT++), to start Stage I from (`config.init_checkpoint`).

    python -m dsnet_jax.tools.convert_pretrained --model=resnet50 --input=resnet50.pth --out=DIR
    python -m dsnet_jax.tools.convert_pretrained --model=deit_small_patch16_224 --out=DIR

--input: a state dict file (.pth/.pt/.bin, needs torch; .safetensors; .npz), bare or under
'model' / 'state_dict'. Without it the released weights are fetched (needs a network):
torchvision's `--weights` tag for resnet50, timm's pretrained weights (the name's tag, e.g.
`vit_small_patch16_224.augreg_in21k_ft_in1k`) otherwise. The checkpoint holds no config: train,
eval and export read it with a config of the same model (configs/resnet50_finetune.py,
configs/vit_s_finetune.py); the importer prints the model fields it needs.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from dsnet_jax import errors, paths
from dsnet_jax.convert import resnet_torchvision, state_dict as state_dict_lib, vit_timm
from dsnet_jax.tools import cli

# Where a training checkpoint keeps its state dict(s).
NESTED_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema')


def select_state_dict(stored: Mapping[str, Any], key: str = '') -> dict[str, Any]:
  """The state dict in a file's mapping: under `key`, else under the one of NESTED_KEYS that
  holds a mapping (refused when several do: say which with `key`), else the mapping itself;
  DataParallel's `module.` prefix stripped."""
  nested = [k for k in NESTED_KEYS if isinstance(stored.get(k), Mapping)]
  if key:
    if not isinstance(stored.get(key), Mapping):
      raise errors.ConfigError(f'--key={key}: the file holds no mapping under {key!r}; its '
                               f'top-level keys: {sorted(stored)[:8]}')
    chosen = stored[key]
  elif len(nested) > 1:
    raise errors.ConfigError(f'the file holds several state dicts ({", ".join(nested)}): choose '
                             'one with --key')
  else:
    chosen = stored[nested[0]] if nested else stored
  return {k.removeprefix('module.'): v for k, v in chosen.items()}


def fetch_state_dict(model: str, weights: str) -> dict[str, Any]:
  """The released weights of `model` (torchvision's `weights` tag for resnet50, else timm's
  pretrained weights), downloaded or read from torch hub's / Hugging Face's cache."""
  try:
    if model == 'resnet50':
      import torchvision  # pylint: disable=g-import-not-at-top
      tags = torchvision.models.ResNet50_Weights.__members__
      if weights not in tags:
        raise errors.ConfigError(f'--weights={weights}: torchvision\'s ResNet-50 weights are '
                                 f'{", ".join(tags)}')
      return torchvision.models.resnet50(weights=weights).state_dict()
    import timm  # pylint: disable=g-import-not-at-top
    return timm.create_model(model, pretrained=True).state_dict()
  except ImportError as e:
    raise ImportError(f'fetching {model} needs {e.name}: pip install ".[pretrained]" (or pass '
                      'the weights file as --input)') from None


def _num_classes(state_dict: Mapping[str, Any], key: str) -> int:
  """The classifier's outputs (1000 when it is missing or malformed: the mismatch error then
  names it with the rest)."""
  shape = np.shape(state_dict.get(key))
  if len(shape) == 2 and shape[0] < 1:
    raise state_dict_lib.StateDictMismatchError({}, [], {key: (('num_classes >= 1', shape[1]),
                                                               shape)})
  return int(shape[0]) if len(shape) == 2 else 1000


def convert(model: str, state_dict: Mapping[str, Any], seed: int = 0):
  """(variables, supernet, image shape, model_name, the supernet's fields to configure) of
  `state_dict` of the torchvision/timm model named `model`."""
  arrays = {k: state_dict_lib.to_numpy(v) for k, v in state_dict.items()}
  if model == 'resnet50':
    classes = _num_classes(arrays, 'fc.weight')
    supernet = resnet_torchvision.model_for(classes)
    variables = resnet_torchvision.convert_state_dict(arrays, supernet, seed)
    return (variables, supernet, resnet_torchvision.IMAGE_SHAPE, 'ds_resnet',
            {'num_classes': classes, 'gate_attention': False})
  supernet = vit_timm.model_for(model)  # Refuses a name it does not map, before the head.
  supernet = supernet.clone(num_classes=_num_classes(arrays, 'head.weight'))
  variables = vit_timm.convert_state_dict(arrays, supernet, seed)
  return (variables, supernet, vit_timm.image_shape(supernet), 'ds_vit',
          {'variant': supernet.variant, 'image_size': supernet.image_size,
           'num_classes': supernet.num_classes, 'gate_attention': False})


def _seed(text: str) -> int:
  seed = int(text)
  if not 0 <= seed < 2 ** 32:
    raise argparse.ArgumentTypeError(f'{seed} is not in 0..2**32-1')
  return seed


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(prog='python -m dsnet_jax.tools.convert_pretrained',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True,
                      help="'resnet50' (torchvision) or a timm ViT/DeiT name, e.g. "
                           'deit_small_patch16_224')
  parser.add_argument('--out', required=True, help='new or empty directory for the checkpoint')
  parser.add_argument('--input', default='',
                      help='state dict file (.pth/.pt/.bin, .safetensors, .npz); default: fetch '
                           'the released weights (needs a network)')
  parser.add_argument('--weights', default='IMAGENET1K_V2',
                      help="torchvision's weights tag when fetching resnet50")
  parser.add_argument('--key', default='',
                      help='where the state dict sits in the file (e.g. model_ema) when it holds '
                           'several')
  parser.add_argument('--seed', type=_seed, default=0, help="the gate's fresh init (0..2**32-1)")
  args = parser.parse_args(argv)
  if args.model != 'resnet50':
    vit_timm.model_for(args.model)  # An unknown name fails before any reading or fetching.
  paths.check_output(args.out, 'dir', '--out')
  state_dict_lib.check_new_directory(args.out)
  stored = (select_state_dict(state_dict_lib.read_file(args.input), args.key) if args.input
            else fetch_state_dict(args.model, args.weights))
  variables, supernet, image_shape, model_name, fields = convert(args.model, stored, args.seed)
  directory = state_dict_lib.save_checkpoint(
      variables, args.out, supernet, image_shape, model_name,
      f'{args.model} ({args.input or "released weights"})')
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  print(f'converted {len(stored)} tensors: {count(variables["params"]):,} params -> {directory}\n'
        f'train or evaluate it with model_name={model_name!r} and model fields {fields} '
        '(e.g. --config.init_checkpoint=' + directory + ')')
  if model_name == 'ds_vit' and vit_timm.normalization(args.model):
    print(f"{args.model}'s weights expect inputs normalised with mean = std = 0.5: add "
          "--config.data.normalization=inception")


if __name__ == '__main__':
  cli.main_errors(main, ImportError)()
