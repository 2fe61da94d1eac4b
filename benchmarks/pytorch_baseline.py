"""PyTorch CPU baseline: DS-MBNet static routes as plain torch.nn MobileNetV1s, timed.

Reads the routes' layer lists written by `benchmarks/route_layers.py` (JAX side), so this script
needs torch and numpy only, never dsnet_jax or JAX:

    python benchmarks/route_layers.py --routes=0,3,largest --out=/tmp/routes.json
    /tmp/torchvenv/bin/python benchmarks/pytorch_baseline.py --spec=/tmp/routes.json \
        --batches=1,8,32,64 [--threads=N] [--json=PATH]

Each route is built in eval mode, float32, random weights (speed does not depend on values), and
run under torch.inference_mode. Before timing, its MAdds are counted with forward hooks
(conv: H_out*W_out*C_out*k*k*C_in/groups, linear: in*out, global average pool: C*H_in*W_in, as
dsnet_jax.complexity counts) and must equal the MAdds the spec carries from our model's program,
and its parameter count (BN affine included, running statistics not) the parameters our route
reads; a mismatch is an error, since the timings would then compare different networks. The
routing head is not part of a static route (route_layers.py), so it is neither built nor counted.

Batch 1 is a request's latency: a round runs `--singles` images one at a time (each alone and
finished before the next; PyTorch on CPU is synchronous), ms/img = round time / singles. Other
batches: one call per round. Configurations (route x batch) are timed round-robin, one call of
each in turn, after warm-up calls, so slow phases of a shared machine hit every row alike; each
figure is the median and the 90th percentile over `--rounds` rounds.

On a machine shared with other jobs, OpenMP's default of spinning threads that wait for one
another makes more than one torch thread very slow whenever a core is taken away (10x was seen
on a busy 2-core VM); `OMP_WAIT_POLICY=PASSIVE` in the environment (read when torch loads) or
`--threads=1` avoid it. The policy in effect is printed and written with the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


class SqueezeExcite(nn.Module):
  """x * sigmoid(expand(relu(reduce(avgpool(x))))), the reduce/expand as 1x1 convs with bias."""

  def __init__(self, channels: int, reduced: int):
    super().__init__()
    self.pool = nn.AdaptiveAvgPool2d(1)
    self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
    self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

  def forward(self, x):
    z = torch.relu(self.conv_reduce(self.pool(x)))
    return x * torch.sigmoid(self.conv_expand(z))


def build_layer(layer: dict[str, Any]) -> nn.Module:
  kind = layer['kind']
  if kind == 'conv':
    k = layer['kernel']
    return nn.Conv2d(layer['in'], layer['out'], k, layer['stride'], padding=(k - 1) // 2,
                     groups=layer['groups'], bias=False)
  if kind == 'bn':
    return nn.BatchNorm2d(layer['channels'])
  if kind == 'silu':
    return nn.SiLU()
  if kind == 'se':
    return SqueezeExcite(layer['channels'], layer['reduced'])
  if kind == 'pool':
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
  if kind == 'linear':
    return nn.Linear(layer['in'], layer['out'])
  raise ValueError(f'unknown layer kind {kind!r} in {layer}')


def build_route(layers: list[dict[str, Any]], seed: int = 0) -> nn.Sequential:
  """The static network of one route, eval mode, float32, random weights and BN statistics."""
  torch.manual_seed(seed)
  model = nn.Sequential(*(build_layer(layer) for layer in layers))
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):  # Statistics like trained ones, not the identity.
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
  return model.eval().float()


def count_madds(model: nn.Module, image: torch.Tensor) -> dict[str, int]:
  """MAdds per image by forward hooks: {'conv', 'linear', 'pool', 'total'}."""
  counts = {'conv': 0, 'linear': 0, 'pool': 0}

  def conv_hook(m, inputs, out):
    k_h, k_w = m.kernel_size
    counts['conv'] += out[0].numel() * k_h * k_w * m.in_channels // m.groups

  def linear_hook(m, inputs, out):
    counts['linear'] += m.in_features * m.out_features

  def pool_hook(m, inputs, out):
    counts['pool'] += inputs[0][0].numel()

  hooks = []
  for m in model.modules():
    hook = {nn.Conv2d: conv_hook, nn.Linear: linear_hook,
            nn.AdaptiveAvgPool2d: pool_hook}.get(type(m))
    if hook:
      hooks.append(m.register_forward_hook(hook))
  try:
    with torch.inference_mode():
      model(image[:1])
  finally:
    for h in hooks:
      h.remove()
  return {**counts, 'total': sum(counts.values())}


def timed_round_robin(configs: dict[Any, Callable[[], Any]], rounds: int,
                      warmup: int = 2) -> dict[Any, list[float]]:
  """Seconds per call of each config, `rounds` each, calls interleaved across configs."""
  for _ in range(warmup):
    for fn in configs.values():
      fn()
  times = {key: [] for key in configs}
  for _ in range(rounds):
    for key, fn in configs.items():
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  return times


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--spec', required=True, help="JSON from benchmarks/route_layers.py")
  p.add_argument('--routes', default='', help='comma-separated route names (default: all)')
  p.add_argument('--batches', default='1,8,32,64', help='comma-separated batch sizes')
  p.add_argument('--threads', type=int, default=0, help='torch threads (0: os.cpu_count())')
  p.add_argument('--rounds', type=int, default=10, help='timed rounds (median, p90)')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls of each config first')
  p.add_argument('--singles', type=int, default=8, help='images per batch-1 round')
  p.add_argument('--channels_last', action='store_true', help='NHWC memory format')
  p.add_argument('--json', default='', help='write the numbers here')
  return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  with open(args.spec) as f:
    spec = json.load(f)
  threads = args.threads or os.cpu_count()
  torch.set_num_threads(threads)
  by_name = {r['name']: r for r in spec['routes']}
  names = args.routes.split(',') if args.routes else list(by_name)
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise SystemExit(f'routes {unknown} are not in {args.spec} (it has {list(by_name)})')
  batches = [int(b) for b in args.batches.split(',')]
  size, channels = spec['image_size'], spec['in_channels']
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  gen = torch.Generator().manual_seed(0)
  images = torch.randn(max(batches + [args.singles]), channels, size, size, generator=gen)
  images = images.contiguous(memory_format=memory_format)

  models, madds = {}, {}
  for name in names:
    route = by_name[name]
    model = build_route(route['layers']).to(memory_format=memory_format)
    counted = count_madds(model, images)
    if counted['total'] != route['madds']:
      raise SystemExit(
          f"route {name}: the PyTorch network has {counted['total']} MAdds per image "
          f"({counted}), our model's program {route['madds']}: not the same architecture")
    params = sum(p.numel() for p in model.parameters())
    if 'params' in route and params != route['params']:
      raise SystemExit(f"route {name}: the PyTorch network has {params} parameters, our "
                       f"model's route reads {route['params']}: not the same architecture")
    models[name] = model
    madds[name] = dict(counted, ours=route['madds'], params=params)

  def call(model, x):
    return lambda: model(x)

  def singles(model):
    def run():
      for i in range(args.singles):
        model(images[i:i + 1])
    return run

  configs = {}
  for name in names:
    for b in batches:
      configs[(name, b)] = (singles(models[name]) if b == 1
                            else call(models[name], images[:b]))
  start = time.perf_counter()
  with torch.inference_mode():
    times = timed_round_robin(configs, args.rounds, args.warmup)
  run_s = time.perf_counter() - start

  rows = []
  for (name, b), t in times.items():
    per_call = np.asarray(t) * 1e3
    per_batch = per_call / args.singles if b == 1 else per_call  # batch 1: per image
    rows.append(dict(route=name, batch=b, madds=madds[name]['total'],
                     ms_per_batch_median=float(np.median(per_batch)),
                     ms_per_batch_p90=float(np.percentile(per_batch, 90)),
                     ms_per_img_median=float(np.median(per_batch)) / b,
                     ms_per_img_p90=float(np.percentile(per_batch, 90)) / b,
                     img_per_s=1e3 * b / float(np.median(per_batch)),
                     rounds_ms=per_call.tolist()))
  result = dict(
      date=str(datetime.date.today()), torch=torch.__version__, threads=threads,
      cpu_count=os.cpu_count(), machine=platform.machine(), processor=platform.processor(),
      omp_wait_policy=os.environ.get('OMP_WAIT_POLICY', 'unset'),
      image_size=size, in_channels=channels, memory_format=str(memory_format).split('.')[-1],
      rounds=args.rounds, warmup=args.warmup, singles=args.singles, run_s=run_s,
      command='python benchmarks/pytorch_baseline.py ' + ' '.join(
          sys.argv[1:] if argv is None else argv),
      madds=madds, rows=rows)
  print(format_table(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


def format_table(result: dict[str, Any]) -> str:
  lines = [
      f"# PyTorch {result['torch']} CPU baseline, {result['date']}, {result['threads']} threads "
      f"({result['cpu_count']} cores, {result['machine']}), float32, eval, inference_mode, "
      f"{result['memory_format']}, OMP_WAIT_POLICY {result['omp_wait_policy']}",
      f"image {result['image_size']}x{result['image_size']}x{result['in_channels']}, "
      f"{result['rounds']} rounds round-robin after {result['warmup']} warm-up calls; batch 1: "
      f"rounds of {result['singles']} images run one at a time; {result['run_s']:.0f} s timed",
      '',
      '| route | MAdds/img (M), torch hooks = ours | batch | ms/batch median | ms/batch p90 | '
      'ms/img median | ms/img p90 | img/s |',
      '|---|---|---|---|---|---|---|---|']
  for row in result['rows']:
    lines.append(
        f"| {row['route']} | {row['madds'] / 1e6:.1f} | {row['batch']} | "
        f"{row['ms_per_batch_median']:.2f} | {row['ms_per_batch_p90']:.2f} | "
        f"{row['ms_per_img_median']:.2f} | {row['ms_per_img_p90']:.2f} | "
        f"{row['img_per_s']:.1f} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
