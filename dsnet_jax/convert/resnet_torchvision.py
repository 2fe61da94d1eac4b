"""Imports a torchvision ResNet-50 (v1.5, `torchvision.models.resnet50`) into DS-ResNet-50.

    python -m dsnet_jax.tools.convert_pretrained --model=resnet50 --input=resnet50.pth --out=DIR

The state dict fills the supernet's full-width parameters: convs OIHW -> HWIO, `fc` -> the
classifier's (in, out) kernel, each BatchNorm's weight and bias -> the shared affine. Every
width a BatchNorm runs at gets the full running statistics' prefix as its row (BN
recalibration, or Stage I, then gives each width its own). The model must have no gate
attention head (`gate_attention=False`): then 'largest' computes exactly the source network,
and the gate's routing head (which torchvision has no counterpart for) starts from a fresh init.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax

from dsnet_jax import errors
from dsnet_jax.convert import state_dict as state_dict_lib
from dsnet_jax.convert.state_dict import Source
from dsnet_jax.layers.norm import statistics_widths
from dsnet_jax.models import ds_resnet

IMAGE_SHAPE = (224, 224, 3)  # Any size: a ResNet's variables do not depend on it.
# Our module path -> torchvision's module name; applied in order.
_MODULE_RENAMES = (
    (r'^stem_conv$', 'conv1'),
    (r'^stem_bn$', 'bn1'),
    (r'^classifier$', 'fc'),
    (r'/shortcut_conv$', '/downsample.0'),
    (r'/shortcut_bn$', '/downsample.1'),
    (r'^groups_(\d+)_(\d+)/', lambda m: f'layer{int(m[1]) + 1}.{m[2]}.'),
)


def torch_module_name(path: str) -> str:
  """torchvision's name of our module at `path`: 'groups_3_0/shortcut_bn' -> 'layer4.0.downsample.1'."""
  for pattern, repl in _MODULE_RENAMES:
    path = re.sub(pattern, repl, path)
  return path


def model_for(num_classes: int = 1000, **fields) -> ds_resnet.DSResNet:
  """DS-ResNet-50 without the gate's attention head: its 'largest' is torchvision's ResNet-50."""
  return ds_resnet.Model(num_classes=num_classes, gate_attention=False, **fields)


def _source(collection: str, path: tuple[str, ...], leaf: jax.ShapeDtypeStruct,
            norm_widths: Mapping[str, list[int]]) -> Source:
  """Where one of our (non-gate) arrays comes from in torchvision's state dict."""
  module, name = '/'.join(path[:-1]), path[-1]
  prefix = torch_module_name(module)
  if module in norm_widths:
    if collection == 'batch_stats':
      full = max(norm_widths[module])
      key = f'{prefix}.running_{name}'
      pad = 0.0 if name == 'mean' else 1.0
      return ({key: (full,)}, lambda t: state_dict_lib.statistics_rows(
          [t[0][:w] for w in norm_widths[module]], leaf.shape, pad))
    return {f'{prefix}.{"weight" if name == "scale" else "bias"}': leaf.shape}, lambda t: t[0]
  if name == 'bias':
    return {f'{prefix}.bias': leaf.shape}, lambda t: t[0]
  if name == 'kernel' and leaf.ndim == 4:  # HWIO <- OIHW
    h, w, c_in, c_out = leaf.shape
    return {f'{prefix}.weight': (c_out, c_in, h, w)}, lambda t: t[0].transpose(2, 3, 1, 0)
  if name == 'kernel' and leaf.ndim == 2:  # (in, out) <- (out, in)
    return {f'{prefix}.weight': leaf.shape[::-1]}, lambda t: t[0].T
  raise NotImplementedError(f'no torchvision source known for {collection}/{"/".join(path)}')


def convert_state_dict(state_dict: Mapping[str, Any], model: ds_resnet.DSResNet | None = None,
                       seed: int = 0) -> dict[str, Any]:
  """Maps a torchvision ResNet-50 state dict (name -> array) to `model`'s variables.

  Args:
    state_dict: torchvision's key names and layouts (`resnet50().state_dict()`).
    model: a DS-ResNet with `gate_attention=False`; default: `model_for()` (1000 classes).
    seed: the fresh init of the gate's routing head (and its reduction layer).
  Returns:
    {'params': ..., 'batch_stats': ...} of NumPy arrays in the model's dtypes and shapes.
  Raises:
    errors.ConfigError: the model has a gate attention head.
    state_dict.StateDictMismatchError: naming every missing, unexpected and mis-shaped key and
      every tensor that is not floating point, not finite, or (a running variance) not positive.
  """
  model = model_for() if model is None else model
  if model.gate_attention:
    raise errors.ConfigError('importing torchvision weights needs the DS-ResNet without a gate '
                             'attention head (model.gate_attention=False): with it, \'largest\' '
                             'would not compute the imported network')
  fresh = model.init_variables(jax.random.key(seed), IMAGE_SHAPE)
  norm_widths = statistics_widths(model, IMAGE_SHAPE)
  dropped = [f'{torch_module_name(p)}.num_batches_tracked' for p in norm_widths]
  return state_dict_lib.assemble_over(
      state_dict, fresh, lambda path, leaf: None if 'gate' in path else _source(
          path[0], path[1:], leaf, norm_widths), dropped)
