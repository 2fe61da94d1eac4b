"""Imports the authors' PyTorch DS-MBNet weights (github.com/changlin31/DS-Net) into our model.

    python -m dsnet_jax.tools.convert_ds_mbnet --input=DS_MBNet-70_1.pth.tar --out=DIR \
        [--weights=ema|plain]

writes an orbax checkpoint of `ds_mbnet.Model()`'s variables (step 0, items `params` and
`batch_stats`). Layouts: convs OIHW -> HWIO (depthwise (C, 1, 3, 3) -> (3, 3, 1, C)); the SE and
gate 1x1 convs and the classifier become Dense kernels (in, out); BatchNorm `aux_bn.{i}` running
statistics become row i of our (n_widths, max_width) statistics (padded with mean 0, var 1), the
shared affine is the last `aux_bn`'s weight and bias; `num_batches_tracked` is dropped. Nothing
is written unless every tensor is floating point and finite, and every running variance positive.
"""
from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsnet_jax.convert import state_dict as state_dict_lib
from dsnet_jax.convert.state_dict import COLLECTIONS, Source
from dsnet_jax.layers import SlicedBatchNorm
from dsnet_jax.models import ds_mbnet

# Our module path ('/'-joined) -> the authors' module name; applied in order.
_MODULE_RENAMES = (
    (r'^stem_conv', 'conv_stem'),
    (r'^stem_bn', 'bn1'),
    (r'^groups_(\d+)_0/', r'blocks.\1.first_block/'),
    (r'^groups_(\d+)_(\d+)/', lambda m: f'blocks.{m[1]}.residual_blocks.{int(m[2]) - 1}/'),
    # The authors name the SE `gate`; in the gate block it is also the gate's attention head.
    (r'(^|/)(gate/)?se/', r'\1gate/'),
    (r'/gate/routing_head$', '/gate/gate.0'),
)
# Dense layers that are nn.Linear in PyTorch; the other Dense layers are 1x1 convs there.
_TORCH_LINEARS = ('classifier',)
CHECKPOINT_KEYS = {'ema': 'state_dict_ema', 'plain': 'state_dict'}
def torch_module_name(path: Sequence[str]) -> str:
  """The authors' name of our module at `path`, e.g. ('groups_3_1', 'se', 'conv_reduce') ->
  'blocks.3.residual_blocks.0.gate.conv_reduce'."""
  name = '/'.join(path)
  for pattern, repl in _MODULE_RENAMES:
    name = re.sub(pattern, repl, name)
  return name.replace('/', '.')


def _source(collection: str, path: tuple[str, ...], leaf: jax.ShapeDtypeStruct,
            norm_widths: Mapping[tuple[str, ...], tuple[int, ...]]) -> Source:
  """Where one of our arrays comes from in the state dict."""
  module, name = path[:-1], path[-1]
  prefix = torch_module_name(module)
  if module in norm_widths:
    widths = norm_widths[module]
    if collection == 'batch_stats':
      stat = {'mean': 'running_mean', 'var': 'running_var'}[name]
      pad = 0.0 if name == 'mean' else 1.0
      return ({f'{prefix}.aux_bn.{i}.{stat}': (w,) for i, w in enumerate(widths)},
              lambda stats: state_dict_lib.statistics_rows(stats, leaf.shape, pad))
    affine = {'scale': 'weight', 'bias': 'bias'}[name]
    return {f'{prefix}.aux_bn.{len(widths) - 1}.{affine}': leaf.shape}, lambda t: t[0]
  if collection == 'params' and name == 'bias':
    return {f'{prefix}.bias': leaf.shape}, lambda t: t[0]
  if collection == 'params' and name == 'kernel' and leaf.ndim == 4:  # HWIO <- OIHW
    h, w, c_in, c_out = leaf.shape
    return {f'{prefix}.weight': (c_out, c_in, h, w)}, lambda t: t[0].transpose(2, 3, 1, 0)
  if collection == 'params' and name == 'kernel' and leaf.ndim == 2:  # (in, out) <- (out, in[,1,1])
    d_in, d_out = leaf.shape
    shape = (d_out, d_in) if prefix in _TORCH_LINEARS else (d_out, d_in, 1, 1)
    return {f'{prefix}.weight': shape}, lambda t: t[0].reshape(d_out, d_in).T
  raise NotImplementedError(f'no PyTorch source known for {collection}/{"/".join(path)}')


def model_layout(model: ds_mbnet.DSMBNet
                       ) -> tuple[dict[str, Any], dict[tuple[str, ...], tuple[int, ...]]]:
  """`model`'s COLLECTIONS as ShapeDtypeStructs, and the widths of each SlicedBatchNorm by path."""
  norm_widths = {}

  def record(f, args, kwargs, context):
    if isinstance(context.module, SlicedBatchNorm):
      norm_widths[context.module.path] = tuple(context.module.widths)
    return f(*args, **kwargs)

  size = model.stem_stride * math.prod(model.group_strides)
  images = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(
        functools.partial(model.init, route='largest', mutable=COLLECTIONS),
        jax.random.key(0), images)
  return variables, norm_widths


def convert_state_dict(state_dict: Mapping[str, Any], model: ds_mbnet.DSMBNet | None = None
                       ) -> dict[str, Any]:
  """Maps a PyTorch DS-MBNet state dict (name -> array) to `model`'s variables.

  Args:
    state_dict: the authors' key names and layouts (e.g. from `load_state_dict`).
    model: a `ds_mbnet.Model`; default: the ImageNet DS-MBNet.
  Returns:
    {'params': ..., 'batch_stats': ...} of NumPy arrays in the model's dtypes and shapes.
  Raises:
    StateDictMismatchError: listing every missing, unexpected and mis-shaped key, and every
      tensor that is not floating point, not finite, or (a running variance) not positive.
  """
  abstract, norm_widths = model_layout(ds_mbnet.Model() if model is None else model)
  leaves = traverse_util.flatten_dict(abstract)
  sources = {path: _source(path[0], path[1:], leaf, norm_widths) for path, leaf in leaves.items()}
  dropped = [f'{torch_module_name(p)}.aux_bn.{i}.num_batches_tracked'
             for p, widths in norm_widths.items() for i in range(len(widths))]
  return state_dict_lib.assemble(state_dict, sources, leaves, dropped)


def select_state_dict(checkpoint: Mapping[str, Any], weights: str = 'ema') -> dict[str, Any]:
  """The state dict in a training checkpoint dict, or `checkpoint` itself if it is one.

  Args:
    checkpoint: {'state_dict': ..., 'state_dict_ema': ..., ...} or a bare state dict.
    weights: 'ema' (the weights the authors report) or 'plain'; a bare state dict has only one.
  Returns:
    The state dict with DataParallel's `module.` prefix stripped.
  """
  if weights not in CHECKPOINT_KEYS:
    raise ValueError(f'weights must be one of {list(CHECKPOINT_KEYS)}, got {weights!r}')
  if any(k in checkpoint for k in CHECKPOINT_KEYS.values()):
    key = CHECKPOINT_KEYS[weights]
    if key not in checkpoint:
      raise ValueError(f'weights={weights!r} reads {key!r}, but the checkpoint holds only '
                       f'{sorted(checkpoint)}')
    checkpoint = checkpoint[key]
  return {k.removeprefix('module.'): v for k, v in checkpoint.items()}


def load_state_dict(path: str | os.PathLike, weights: str = 'ema') -> dict[str, np.ndarray]:
  """Reads a state dict from a PyTorch checkpoint (.pth.tar, .pth; needs torch) or an .npz."""
  checkpoint = state_dict_lib.read_file(path)
  return {k: state_dict_lib.to_numpy(v) for k, v in select_state_dict(checkpoint, weights).items()}


def save_checkpoint(variables: Mapping[str, Any], directory: str | os.PathLike) -> str:
  """Writes `variables` of `ds_mbnet.Model()` as step 0 of a new or empty checkpoint directory
  (`state_dict.save_checkpoint`)."""
  return state_dict_lib.save_checkpoint(variables, directory, ds_mbnet.Model(), (224, 224, 3),
                                        'ds_mbnet', __name__)
