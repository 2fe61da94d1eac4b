"""The layer list of DS-MBNet static routes, as JSON, for `benchmarks/pytorch_baseline.py`.

A static route is a plain MobileNetV1 at the route's widths. This writes, per route, the layers
that route runs (in order) with our MAdds for it (`dsnet_jax.complexity.route_complexity`), so
the PyTorch side builds the same network without importing dsnet_jax (or JAX) and checks its
own MAdds against ours:

    python benchmarks/route_layers.py --routes=0,3,largest --image_size=224 --out=routes.json
    /tmp/torchvenv/bin/python benchmarks/pytorch_baseline.py --spec=routes.json

Layer kinds (each a dict with 'kind'):
  conv    in, out, kernel, stride, groups (padding (kernel-1)//2, no bias)
  bn      channels (eval-mode BatchNorm)
  silu
  se      channels, reduced: x * sigmoid(expand(relu(reduce(avgpool(x))))), both 1x1 with bias
  pool    global average pool to (batch, channels)
  linear  in, out (with bias)
The static route has no routing head: its logits are dead code in `model.apply(route=r)`, which
is what the route's MAdds count (`with_gate=False`). In the gate block the gate's attention head
is an ordinary SE, so that block is listed as one.

With `--sandwich_draws=N` the spec also lists Stage I's sandwich draws of steps 0..N-1 (seed
`--seed`, `num_random_routes` 2: 'largest', two random routes, the smallest), the routes a
`benchmarks/train_step.py --draws=N` step trains, and holds every route they name, so that
`pytorch_baseline.py --train` times a training step of the same routes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsnet_jax import complexity, config_lib  # noqa: E402
from dsnet_jax.data import input_pipeline  # noqa: E402
from dsnet_jax import routes as routes_lib  # noqa: E402
from dsnet_jax.models import ds_mbnet, get_model  # noqa: E402

Layer = dict[str, Any]


def _conv(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1) -> Layer:
  return dict(kind='conv', **{'in': c_in}, out=c_out, kernel=kernel, stride=stride,
              groups=groups)


def route_layers(model: ds_mbnet.DSMBNet, route) -> list[Layer]:
  """The layers `model.apply(..., route=route)` runs, in order (mirrors `DSMBNet.setup`)."""
  if not isinstance(model, ds_mbnet.DSMBNet):
    raise TypeError(f'route_layers knows DS-MBNet only, got {type(model).__name__}')
  widths = model.routes[route].widths
  layers = [_conv(model.in_channels, widths[0], 3, model.stem_stride),
            dict(kind='bn', channels=widths[0]), dict(kind='silu')]
  c_in, in_widths = widths[0], tuple(model.stem_widths)
  for g, (group, depth, stride) in enumerate(
      zip(model.group_widths, model.group_depths, model.group_strides)):
    c_out = widths[g + 1]
    for b in range(depth):
      # The SE's reduced width is fixed by the supernet's widest input, whatever the route.
      reduced = max(1, round(model.se_ratio * max(in_widths)))
      layers += [_conv(c_in, c_in, 3, stride if b == 0 else 1, groups=c_in),
                 dict(kind='bn', channels=c_in), dict(kind='silu'),
                 dict(kind='se', channels=c_in, reduced=reduced),
                 _conv(c_in, c_out, 1, 1), dict(kind='bn', channels=c_out), dict(kind='silu')]
      c_in, in_widths = c_out, tuple(group)
  return layers + [dict(kind='pool'), dict(kind='linear', **{'in': c_in}, out=model.num_classes)]


def layers_madds(layers: list[Layer], image_size: int) -> int:
  """MAdds per image of a layer list, in complexity.py's convention (convs, linears, pools)."""
  h = w = image_size
  total = channels = 0
  for layer in layers:
    kind = layer['kind']
    if kind == 'conv':
      k, s = layer['kernel'], layer['stride']
      pad = (k - 1) // 2
      h, w = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
      channels = layer['out']
      total += h * w * channels * k * k * layer['in'] // layer['groups']
    elif kind == 'se':
      c, r = layer['channels'], layer['reduced']
      total += c * h * w + 2 * c * r
    elif kind == 'pool':
      total += channels * h * w
      h = w = 1
    elif kind == 'linear':
      total += layer['in'] * layer['out']
  return total


def sandwich_draws(model, seed: int, draws: int) -> list[list[str]]:
  """The route names of Stage I's sandwich at steps 0..draws-1 (two random routes)."""
  return [[r.name for r in routes_lib.sandwich_routes(model.routes, seed, step, 2)]
          for step in range(draws)]


def spec(model, routes, image_size: int, sandwich: list[list[str]] = ()) -> dict[str, Any]:
  """The JSON `pytorch_baseline.py --spec` reads; with `sandwich` draws, every route they name
  is listed too."""
  image_shape = (image_size, image_size, model.in_channels)
  out = dict(model=type(model).__name__, image_size=image_size, in_channels=model.in_channels,
             num_classes=model.num_classes, routes=[], sandwich=[list(d) for d in sandwich])
  routes = list(dict.fromkeys([*routes, *(name for draw in sandwich for name in draw)]))
  for name in routes:
    route = model.routes[name]
    c = complexity.route_complexity(model, route, image_shape)
    out['routes'].append(dict(name=route.name, widths=list(route.widths), madds=c.madds,
                              params=c.params, layers=route_layers(model, route)))
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='ds_mbnet')
  p.add_argument('--config', default='',
                 help="a config file whose model (and image size) to use instead of --model's "
                      'defaults, e.g. configs/ds_mbnet_fmnist.py')
  p.add_argument('--routes', default='0,3,largest', help="comma-separated names, or 'all'")
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--num_classes', type=int, default=0)
  p.add_argument('--sandwich_draws', type=int, default=0,
                  help="Stage I's sandwich draws of steps 0..N-1 (for pytorch_baseline --train)")
  p.add_argument('--seed', type=int, default=0, help='the seed of the sandwich draws')
  p.add_argument('--out', required=True, help='JSON file to write')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  kwargs = {'num_classes': args.num_classes} if args.num_classes else {}
  if args.config:
    config = config_lib.load_config_file(args.config)
    model = get_model(config.model_name, **{**config.model, **kwargs})
    args.image_size = input_pipeline.preprocessing(config_lib.data_spec(config.data)).image_size
  else:
    model = get_model(args.model, **kwargs)
  names = model.routes.names if args.routes == 'all' else args.routes.split(',')
  result = spec(model, names, args.image_size,
                sandwich_draws(model, args.seed, args.sandwich_draws))
  for route in result['routes']:  # The layer list must describe the program that runs.
    listed = layers_madds(route['layers'], args.image_size)
    if listed != route['madds']:
      raise AssertionError(f"route {route['name']}: the layer list has {listed} MAdds, the "
                           f"model's program {route['madds']}")
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f"wrote {len(result['routes'])} routes to {args.out}: " + ', '.join(
      f"{r['name']} ({r['madds'] / 1e6:.1f} M MAdds)" for r in result['routes']))


if __name__ == '__main__':
  main()
