"""Imports a timm ViT or DeiT (class-token models) into DS-ViT++ of the matching variant.

    python -m dsnet_jax.tools.convert_pretrained --model=deit_small_patch16_224 \
        --input=model.safetensors --out=DIR

timm names that map (`model_for`): `vit_{tiny,small,base}_patch{P}_{S}` and
`deit_{tiny,small,base}_patch{P}_{S}` (e.g. `deit_small_patch16_224`, `vit_base_patch16_384`),
with or without a pretrained tag (`.augreg_in21k_ft_in1k`). The distilled DeiTs (a second,
distillation token) and the other ViT families (relative position, register tokens, global
average pooling) do not. The ViT weights (`vit_*` from AugReg) expect inputs normalised with
mean = std = 0.5 (`data.normalization='inception'`), the DeiT weights ImageNet's mean and std.

The state dict fills the full-width parameters: `qkv` splits into our query, key and value
(timm's output layout is (3, heads, head_dim), ours head-major per projection), Linear weights
transpose to (in, out), the patch conv OIHW -> HWIO. The model must have no gate attention head
(`gate_attention=False`): then 'largest' computes exactly the source network, and the gate
(timm has no counterpart) starts from a fresh init.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax

from dsnet_jax import errors
from dsnet_jax.convert import state_dict as state_dict_lib
from dsnet_jax.convert.state_dict import Source
from dsnet_jax.models import ds_vit

_NAME = re.compile(r'(vit|deit)_(tiny|small|base)_patch(\d+)_(\d+)')
_VARIANTS = {'tiny': 'Ti', 'small': 'S', 'base': 'B'}
_QKV = {'query': 0, 'key': 1, 'value': 2}


def model_for(timm_name: str, num_classes: int = 1000, **fields) -> ds_vit.DSViT:
  """The DS-ViT whose 'largest' is timm's `timm_name` (no gate attention head).

  Raises:
    errors.ConfigError: a timm model this importer does not map, naming the ones it does.
  """
  match = _NAME.fullmatch(timm_name.split('.')[0])
  if match is None:
    raise errors.ConfigError(
        f'timm model {timm_name!r} does not map onto DS-ViT++; these do: '
        '{vit,deit}_{tiny,small,base}_patch<P>_<size> (class-token models, e.g. '
        'deit_small_patch16_224), not the distilled DeiTs or other ViT families')
  _, size, patch, image_size = match.groups()
  if int(patch) < 1 or int(image_size) < 1 or int(image_size) % int(patch):
    raise errors.ConfigError(f'timm model {timm_name!r}: image size {image_size} is not a '
                             f'positive multiple of the patch size {patch}')
  return ds_vit.Model(variant=f'{_VARIANTS[size]}/{patch}', image_size=int(image_size),
                      num_classes=num_classes, gate_attention=False, **fields)


def normalization(timm_name: str) -> str:
  """The `data.normalization` the released weights of `timm_name` expect: 'inception' (mean =
  std = 0.5) for the AugReg ViTs, '' (ImageNet's) for DeiT."""
  return 'inception' if timm_name.startswith('vit_') else ''


def image_shape(model: ds_vit.DSViT) -> tuple[int, int, int]:
  return (model.image_size, model.image_size, model.in_channels)


def _source(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct, width: int) -> Source:
  """Where one of our (non-gate) parameters comes from in timm's state dict."""
  *module, name = path
  if module == [] and name in ('cls_token', 'pos_embed'):
    return {name: leaf.shape}, lambda t: t[0]
  if module == ['patch_embed']:
    if name == 'bias':
      return {'patch_embed.proj.bias': leaf.shape}, lambda t: t[0]
    p, _, c_in, d = leaf.shape
    return {'patch_embed.proj.weight': (d, c_in, p, p)}, lambda t: t[0].transpose(2, 3, 1, 0)
  prefix = '.'.join(m.replace('blocks_', 'blocks.') for m in module)
  prefix = prefix.replace('.out', '.proj')
  if module[-1] in _QKV:  # One third of timm's fused qkv: rows [i * width, (i + 1) * width).
    i = _QKV[module[-1]]
    qkv = prefix.rsplit('.', 1)[0] + '.qkv'
    if name == 'bias':
      return {f'{qkv}.bias': (3 * width,)}, lambda t: t[0][i * width:(i + 1) * width]
    return ({f'{qkv}.weight': (3 * width, width)},
            lambda t: t[0][i * width:(i + 1) * width].T)
  if name in ('scale', 'bias') and 'norm' in module[-1]:
    return {f'{prefix}.{"weight" if name == "scale" else "bias"}': leaf.shape}, lambda t: t[0]
  if name == 'bias':
    return {f'{prefix}.bias': leaf.shape}, lambda t: t[0]
  if name == 'kernel' and leaf.ndim == 2:  # (in, out) <- Linear (out, in)
    return {f'{prefix}.weight': leaf.shape[::-1]}, lambda t: t[0].T
  raise NotImplementedError(f'no timm source known for {"/".join(path)}')


def convert_state_dict(state_dict: Mapping[str, Any], model: ds_vit.DSViT,
                       seed: int = 0) -> dict[str, Any]:
  """Maps a timm ViT/DeiT state dict (name -> array) to `model`'s variables.

  Args:
    state_dict: timm's key names and layouts (`timm.create_model(name).state_dict()`).
    model: a DS-ViT with `gate_attention=False` of the source's sizes (`model_for(name)`).
    seed: the fresh init of the gate.
  Returns:
    {'params': ..., 'batch_stats': {}} of NumPy arrays in the model's dtypes and shapes.
  Raises:
    errors.ConfigError: the model has a gate attention head.
    state_dict.StateDictMismatchError: naming every missing, unexpected and mis-shaped key and
      every tensor that is not floating point or not finite.
  """
  if model.gate_attention:
    raise errors.ConfigError("importing timm weights needs the DS-ViT without a gate attention "
                             "head (model.gate_attention=False): with it, 'largest' would not "
                             'compute the imported network')
  fresh = model.init_variables(jax.random.key(seed), image_shape(model))
  width = model.size.width
  return state_dict_lib.assemble_over(
      state_dict, fresh, lambda path, leaf: None if path[1] == 'gate' else _source(
          path[1:], leaf, width))
