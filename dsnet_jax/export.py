"""Export one route of a supernet as a standalone static model, for deployment.

`export_route` writes to a directory:
  params.npz     the route's parameters, physically sliced to its widths (a much smaller tree),
                 with each BatchNorm (the route's own per-width statistics and the shared affine)
                 folded into the conv before it: kernel * s and a bias, s = scale/sqrt(var+eps);
  config.json    the route, its widths, the static architecture (strides), shapes, sizes, the
                 compute dtype;
  forward.jaxexport  a serialized `jax.export` of the static forward, batch-polymorphic
                 (`b, H, W, C`), lowered for CPU and CUDA, taking (params, float32 images) and
                 returning float32 logits. It needs jax only: no gate, no supernet, no
                 dsnet_jax code.

The compute dtype is the model's (`config.model.dtype`) unless `export_route` is given one:
with bfloat16 the images are cast to it inside the program and the convs run in it, while the
parameters stay float32 (BatchNorm is folded in float64) and the SE and the classifier run in
float32 on the float32 pooled vector, as in the supernet.

    exported = export_route(model, variables, route=2, out_dir='/tmp/r2', image_shape=(224, 224, 3))
    static = load_exported('/tmp/r2')
    logits = static(images)                  # jax.export artifact
    logits = static.forward_python(images)   # the same static net written in JAX (static_forward)

The static net of a family is written out explicitly (for DS-MBNet: conv+bias -> SiLU, blocks of
dw conv+bias -> SiLU -> SE -> pw conv+bias -> SiLU, pool, linear): folding BatchNorm into a conv
needs the conv to have a bias, which the supernet's convs do not, so reusing the supernet module
at the route's widths could only slice, not fold. `STATIC_BUILDERS` maps a model class to its
builder and `STATIC_FORWARDS` a family to its forward; DS-ResNet and DS-ViT register theirs.

    python -m dsnet_jax.export --config=configs/X.py --workdir=DIR --route=2 --out=DIR2
    python -m dsnet_jax.export --config=configs/X.py --checkpoint=CKPT --route=2 --out=DIR2
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax.layers.attention_heads import global_avg_pool
from dsnet_jax.layers.linear import depthwise_conv_by_taps
from dsnet_jax.models import ds_mbnet

PARAMS_FILE = 'params.npz'
CONFIG_FILE = 'config.json'
FORWARD_FILE = 'forward.jaxexport'


# --- BatchNorm folding ------------------------------------------------------------------------

def fold_batchnorm(kernel: np.ndarray, scale, bias, mean, var, epsilon: float,
                   conv_bias=None) -> tuple[np.ndarray, np.ndarray]:
  """conv (kernel, conv_bias) followed by eval-mode BN -> one conv (kernel', bias').

  BN(y) = (y - mean) * s + bias with s = scale / sqrt(var + eps), per output channel (the
  kernel's last axis), so BN(conv(x)) = conv'(x) with kernel' = kernel * s and
  bias' = (conv_bias - mean) * s + bias. Computed in float64, returned in the kernel's dtype.
  """
  s = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + epsilon)
  b = 0.0 if conv_bias is None else np.asarray(conv_bias, np.float64)
  new_bias = (b - np.asarray(mean, np.float64)) * s + np.asarray(bias, np.float64)
  dtype = np.asarray(kernel).dtype
  return (np.asarray(kernel, np.float64) * s).astype(dtype), new_bias.astype(dtype)


# --- DS-MBNet -----------------------------------------------------------------------------------

def _mbnet_static(model: ds_mbnet.DSMBNet, variables, route) -> tuple[dict, dict]:
  """Sliced, BN-folded parameters of one DS-MBNet route, and its static config."""
  route = model.routes[route]
  widths = route.widths
  params = jax.tree.map(np.asarray, variables['params'])
  stats = jax.tree.map(np.asarray, variables['batch_stats'])
  bound = model.bind(variables)  # To read the layers' widths, strides and eps, not copy them.

  def folded_conv(conv_path, bn_path, bn_module, c_in, c_out, depthwise=False):
    kernel = _get(params, conv_path)['kernel']
    kernel = kernel[..., :c_out] if depthwise else kernel[:, :, :c_in, :c_out]
    affine, bn_stats = _get(params, bn_path), _get(stats, bn_path)
    row = bn_module.row(c_out)  # The route's own statistics for this width.
    k, b = fold_batchnorm(kernel, affine['scale'][:c_out], affine['bias'][:c_out],
                          bn_stats['mean'][row, :c_out], bn_stats['var'][row, :c_out],
                          bn_module.epsilon)
    return {'kernel': k, 'bias': b}

  static = {'stem': folded_conv(('stem_conv',), ('stem_bn',), bound.stem_bn, model.in_channels,
                                widths[0])}
  strides = []
  c_in = widths[0]
  index = 0
  for g, depth in enumerate(model.group_depths):
    c_out = widths[g + 1]
    for b in range(depth):
      name = f'groups_{g}_{b}'
      block = bound.groups[g][b]
      se_path = (name, 'gate', 'se') if block.num_routes else (name, 'se')
      se = _get(params, se_path)
      static[f'block_{index}'] = {
          'dw': folded_conv((name, 'conv_dw'), (name, 'bn1'), block.bn1, c_in, c_in,
                            depthwise=True),
          'se': {'reduce': {'kernel': se['conv_reduce']['kernel'][:c_in],
                            'bias': se['conv_reduce']['bias']},
                 'expand': {'kernel': se['conv_expand']['kernel'][:, :c_in],
                            'bias': se['conv_expand']['bias'][:c_in]}},
          'pw': folded_conv((name, 'conv_pw'), (name, 'bn2'), block.bn2, c_in, c_out),
      }
      strides.append(block.conv_dw.stride)
      c_in = c_out
      index += 1
  static['classifier'] = {'kernel': params['classifier']['kernel'][:c_in],
                          'bias': params['classifier']['bias']}
  config = {'family': 'mbnet', 'stem_stride': bound.stem_conv.stride, 'strides': strides}
  return static, config


def _mbnet_forward(config: dict, params, images):
  """The static DS-MBNet of one route: no gate, no slicing, no BatchNorm."""
  def conv(x, p, stride=1, depthwise=False):
    kernel = p['kernel'].astype(x.dtype)
    k = kernel.shape[0]
    pad = (k - 1) // 2
    if k == 1 and not depthwise:  # Pointwise: a matmul (faster on XLA:CPU, as in the model).
      y = jnp.dot(x[:, ::stride, ::stride], kernel[0, 0])
    else:
      def grouped(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=x.shape[-1] if depthwise else 1)

      def taps(x, kernel):
        return depthwise_conv_by_taps(x, kernel, stride, pad)
      # Depthwise convs run as shifted taps on CPU (XLA:CPU's grouped conv is slow), chosen
      # per platform when the program is lowered, so one artifact serves CPU and GPU.
      y = (jax.lax.platform_dependent(x, kernel, cpu=taps, default=grouped) if depthwise
           else grouped(x, kernel))
    return y + p['bias'].astype(x.dtype)

  def dense(x, p):
    return jnp.dot(x, p['kernel'].astype(x.dtype)) + p['bias'].astype(x.dtype)

  x = nn.silu(conv(images, params['stem'], config['stem_stride']))
  for i, stride in enumerate(config['strides']):
    block = params[f'block_{i}']
    x = nn.silu(conv(x, block['dw'], stride, depthwise=True))
    attention = nn.sigmoid(dense(nn.relu(dense(global_avg_pool(x), block['se']['reduce'])),
                                 block['se']['expand']))
    x = x * attention[:, None, None, :].astype(x.dtype)
    x = nn.silu(conv(x, block['pw']))
  return dense(global_avg_pool(x), params['classifier'])  # The pool is float32 (or wider).


STATIC_BUILDERS: dict[type, Callable[[Any, Any, Any], tuple[dict, dict]]] = {
    ds_mbnet.DSMBNet: _mbnet_static,
}
STATIC_FORWARDS: dict[str, Callable[[dict, Any, Any], jax.Array]] = {
    'mbnet': _mbnet_forward,
}


# --- public API ---------------------------------------------------------------------------------

def static_route(model, variables, route) -> tuple[dict, dict]:
  """(params, config) of `route` as a standalone static net, in memory (NumPy leaves)."""
  builder = STATIC_BUILDERS.get(type(model))
  if builder is None:
    raise NotImplementedError(
        f'no static exporter for {type(model).__name__}; known: '
        f'{", ".join(t.__name__ for t in STATIC_BUILDERS)}. Register one in '
        'dsnet_jax.export.STATIC_BUILDERS / STATIC_FORWARDS.')
  route = model.routes[route]
  params, config = builder(model, variables, route)
  return params, {**config, 'route': route.name, 'widths': list(route.widths)}


def static_forward(config: dict, params, images) -> jax.Array:
  """Runs a static net built by `static_route` (pure JAX, no dsnet_jax model code), in
  `config['dtype']` when set (else in the images' dtype)."""
  if config.get('dtype'):
    images = images.astype(config['dtype'])
  return STATIC_FORWARDS[config['family']](config, params, images)


@dataclasses.dataclass
class ExportedRoute:
  """A loaded static route: call it on (batch, H, W, C) images for logits."""
  config: dict
  params: dict
  exported: jax.export.Exported

  def __call__(self, images) -> jax.Array:
    return self.exported.call(self.params, images)

  def forward_python(self, images) -> jax.Array:
    return static_forward(self.config, self.params, images)


def export_route(model, variables, route, out_dir: str, image_shape: Sequence[int],
                 batch_size: int | None = None, platforms: Sequence[str] = ('cpu', 'cuda'),
                 verbose: bool = True, overwrite: bool = False, dtype: Any = None
                 ) -> ExportedRoute:
  """Writes `route` of the supernet as a standalone static model to `out_dir`.

  The jax.export program takes any batch size (symbolic `b`) unless `batch_size` fixes one,
  and is lowered for every platform in `platforms` (no device of that kind is needed). It
  computes in `dtype` (default: the model's compute dtype, else float32).
  Raises:
    FileExistsError: `out_dir` is a file, or a non-empty directory and not `overwrite`.
  """
  check_output_dir(out_dir, overwrite)
  params, config = static_route(model, variables, route)
  if dtype is None:
    dtype = getattr(model, 'dtype', None)
  config['dtype'] = jnp.dtype(jnp.float32 if dtype is None else dtype).name
  image_shape = tuple(int(d) for d in image_shape)
  batch = jax.export.symbolic_shape('b')[0] if batch_size is None else batch_size
  images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  param_specs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  exported = jax.export.export(jax.jit(lambda p, x: static_forward(config, p, x)),
                               platforms=tuple(platforms))(param_specs, images)

  count = sum(p.size for p in jax.tree.leaves(params))
  supernet = sum(np.size(p) for p in jax.tree.leaves(variables['params']))
  statistics = sum(np.size(p) for p in jax.tree.leaves(variables.get('batch_stats', {})))
  config = {**config, 'model': type(model).__name__, 'image_shape': list(image_shape),
            'batch_size': batch_size, 'platforms': list(exported.platforms), 'params': int(count),
            'params_bytes': int(sum(p.nbytes for p in jax.tree.leaves(params))),
            'supernet_params': int(supernet), 'supernet_batch_stats': int(statistics)}
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, PARAMS_FILE), **_flatten(params))
  with open(os.path.join(out_dir, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=1)
  with open(os.path.join(out_dir, FORWARD_FILE), 'wb') as f:
    f.write(exported.serialize())
  if verbose:
    print(f'route {config["route"]} widths {config["widths"]}: {count:,} parameters '
          f'({config["params_bytes"] / 2**20:.2f} MiB, BatchNorm folded) vs the supernet\'s '
          f'{supernet:,} parameters and {statistics:,} BN statistics ({count / supernet:.1%} '
          f'of its parameters); computes in {config["dtype"]}; wrote {out_dir}')
  return ExportedRoute(config, params, exported)


def check_output_dir(out_dir: str, overwrite: bool) -> None:
  """Raises FileExistsError unless `out_dir` is missing, empty, or may be overwritten."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'--out {out_dir} is a file, not a directory')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f'--out {out_dir} is not empty; pass --overwrite to replace what it '
                          'holds')


def load_exported(out_dir: str) -> ExportedRoute:
  """Loads what `export_route` wrote (config, params, the deserialized jax.export program)."""
  with open(os.path.join(out_dir, CONFIG_FILE)) as f:
    config = json.load(f)
  with np.load(os.path.join(out_dir, PARAMS_FILE)) as data:
    params = _unflatten({k: data[k] for k in data.files})
  with open(os.path.join(out_dir, FORWARD_FILE), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return ExportedRoute(config, params, exported)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}/'))
    else:
      flat[f'{prefix}{key}'] = np.asarray(value)
  return flat


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def main(argv):
  """`python -m dsnet_jax.export --config=C --workdir=DIR --route=R --out=DIR2`."""
  del argv
  from absl import flags
  from dsnet_jax import rundir
  from dsnet_jax.models import get_model
  f = flags.FLAGS
  config = f.config
  check_output_dir(f.out, f.overwrite)
  model = get_model(config.model_name, **config.model)
  size = config.data.get('image_size') or 224
  image_shape = (size, size, config.model.get('in_channels', 3))
  directory = f.checkpoint or rundir.RunDir(f.workdir).latest_stage_dir()
  restored = rundir.restore_variables(directory, model, image_shape, config=config)
  print(f'restored {restored.describe()}')
  export_route(restored.model, restored.variables, f.route, f.out, image_shape,
               batch_size=f.batch_size, platforms=f.platforms, overwrite=f.overwrite)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'The config the checkpoint was trained with.')
  flags.DEFINE_string('workdir', '', 'Training workdir: exports its latest stage checkpoint.')
  flags.DEFINE_string('checkpoint', '', 'A stage checkpoint directory instead of --workdir.')
  flags.DEFINE_string('route', None, "Route to export: 0, 1, ..., 'largest'.")
  flags.DEFINE_string('out', None, 'Output directory (must not exist or be empty).')
  flags.DEFINE_bool('overwrite', False, 'Replace what a non-empty --out holds.')
  flags.DEFINE_integer('batch_size', None, 'Export for this batch size only (default: any).')
  flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'Platforms to lower the forward for.')
  flags.mark_flags_as_required(['config', 'route', 'out'])
  from dsnet_jax import cli
  app.run(cli.main_errors(main))
