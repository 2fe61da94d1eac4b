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

import argparse
import functools
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsnet_jax import checkpointing, errors
from dsnet_jax.layers import SlicedBatchNorm
from dsnet_jax.layers.norm import statistics_widths
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
# The variable collections a checkpoint holds (not e.g. BN recalibration's `bn_moments`).
COLLECTIONS = ('params', 'batch_stats')

Shape = tuple[int, ...]
# The PyTorch tensors one of our arrays is built from ({key: shape}), and how it is built.
Source = tuple[dict[str, Shape], Callable[[list[np.ndarray]], np.ndarray]]


class StateDictMismatchError(errors.UserError, ValueError):
  """Keys, shapes or values of a state dict do not fit the model; names every offending key."""

  def __init__(self, missing: Mapping[str, Shape], unexpected: Sequence[str],
               wrong_shape: Mapping[str, tuple[Shape, Shape]],
               bad_values: Mapping[str, str] | None = None):
    self.missing = dict(missing)
    self.unexpected = list(unexpected)
    self.wrong_shape = dict(wrong_shape)
    self.bad_values = dict(bad_values or {})
    lines = ['the state dict does not match the model:']
    lines += [f'  missing: {k} {s}' for k, s in self.missing.items()]
    lines += [f'  unexpected: {k}' for k in self.unexpected]
    lines += [f'  wrong shape: {k}: expected {e}, got {g}'
              for k, (e, g) in self.wrong_shape.items()]
    lines += [f'  bad values: {k}: {p}' for k, p in self.bad_values.items()]
    super().__init__('\n'.join(lines))


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

      def rows(stats):
        out = np.full(leaf.shape, pad, np.float64)
        for i, s in enumerate(stats):
          out[i, :len(s)] = s
        return out
      return {f'{prefix}.aux_bn.{i}.{stat}': (w,) for i, w in enumerate(widths)}, rows
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


def _value_problems(key: str, value: np.ndarray) -> str | None:
  """What is wrong with the values of the tensor `key`, or None: not floating point (float16 and
  bfloat16 are fine: the model's variables are float32), not finite in float32, or (a running
  variance) not positive."""
  if not jnp.issubdtype(value.dtype, jnp.floating):
    return f'dtype {value.dtype}, not floating point'
  with np.errstate(over='ignore'):
    value = value.astype(np.float32)
  problems = []
  if nonfinite := np.count_nonzero(~np.isfinite(value)):
    problems.append(f'{nonfinite} values not finite in float32')
  if key.endswith('.running_var') and (nonpositive := np.count_nonzero(value <= 0)):
    problems.append(f'{nonpositive} values <= 0')
  return ', '.join(problems) or None


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
  expected = {k: s for keys, _ in sources.values() for k, s in keys.items()}
  dropped = {f'{torch_module_name(p)}.aux_bn.{i}.num_batches_tracked'
             for p, widths in norm_widths.items() for i in range(len(widths))}
  missing = {k: s for k, s in expected.items() if k not in state_dict}
  unexpected = [k for k in state_dict if k not in expected and k not in dropped]
  arrays = {k: np.asarray(state_dict[k]) for k in expected if k in state_dict}
  wrong_shape = {k: (expected[k], a.shape) for k, a in arrays.items() if a.shape != expected[k]}
  bad_values = {k: p for k, a in arrays.items() if (p := _value_problems(k, a))}
  if missing or unexpected or wrong_shape or bad_values:
    raise StateDictMismatchError(missing, unexpected, wrong_shape, bad_values)
  variables = {path: np.asarray(build([arrays[k] for k in keys]), leaves[path].dtype)
               for path, (keys, build) in sources.items()}
  return traverse_util.unflatten_dict(variables)


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


def _numpy(value: Any) -> np.ndarray:
  """A tensor or array as a NumPy array: floating-point tensors as float32 (NumPy has no
  bfloat16), other dtypes as they are, so that `convert_state_dict` sees e.g. integer weights."""
  if not hasattr(value, 'detach'):
    return np.asarray(value)
  value = value.detach().cpu()
  return (value.float() if value.is_floating_point() else value).numpy()


def load_state_dict(path: str | os.PathLike, weights: str = 'ema') -> dict[str, np.ndarray]:
  """Reads a state dict from a PyTorch checkpoint (.pth.tar, .pth; needs torch) or an .npz."""
  if os.fspath(path).endswith('.npz'):
    with np.load(path) as npz:
      checkpoint = dict(npz)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'reading {path} needs PyTorch: pip install ".[torch]" (or pass an .npz '
                        'of the state dict)') from None
    # Training checkpoints also pickle the run's argparse.Namespace; allow only that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
      checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  return {k: _numpy(v) for k, v in select_state_dict(checkpoint, weights).items()}


def save_checkpoint(variables: Mapping[str, Any], directory: str | os.PathLike) -> str:
  """Writes `variables` as step 0 of a new or empty checkpoint directory (train.py's
  `config.init_checkpoint` and eval.py's `--checkpoint` read it)."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise FileExistsError(f'{directory} is not a directory')
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f'{directory} is not empty; refusing to overwrite it')
  with checkpointing.Checkpointer(directory, keep=None) as ckpt:
    ckpt.save(0, dict(variables), {
        'source': 'dsnet_jax.convert.ds_mbnet_torch', 'model_name': 'ds_mbnet',
        'variables_key': '', 'statistics_widths': statistics_widths(ds_mbnet.Model(),
                                                                      (224, 224, 3))})
  return directory
