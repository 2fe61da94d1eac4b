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

`--train` times Stage I instead, on a spec written with `route_layers.py --sandwich_draws=N`:
a sandwich step as `dsnet_jax.train_steps` does it (the EMA teacher's softmax on 'largest' in
eval mode; 'largest' on the labels with label smoothing 0.1, the other routes of the draw on the
teacher's probabilities; the gradients summed, one SGD step (Nesterov momentum 0.9, weight
decay 1e-4), the teacher's EMA update), cycling over the spec's draws as `benchmarks/
train_step.py --draws=N` does, and a plain step ('largest' alone on the labels). Each route is
its own network here (the supernet's shared weights sliced would do the same arithmetic; the
optimizer steps each drawn network's parameters). `--profile` prints torch.profiler's top ops of
one sandwich step.

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
  p.add_argument('--train', action='store_true',
                 help="time Stage I's sandwich step (needs the spec's sandwich draws)")
  p.add_argument('--train_batch', type=int, default=32, help='batch of --train')
  p.add_argument('--profile', action='store_true', help='with --train: top ops of one step')
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

  if args.train:
    if not spec.get('sandwich'):
      raise SystemExit(f'{args.spec} has no sandwich draws: write it with route_layers.py '
                       '--sandwich_draws=N')
    names = list(by_name)
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
  if args.train:
    return train_main(args, spec, models, madds, threads, memory_format)

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


def sandwich_step(models: dict[str, nn.Module], teacher: nn.Module, optimizer, images, labels,
                  draw: list[str], ema_decay: float = 0.997):
  """One Stage I step of the routes `draw` ('largest' first, as drawn)."""
  with torch.no_grad():
    targets = torch.softmax(teacher(images), -1)
  optimizer.zero_grad(set_to_none=True)
  for name in draw:
    logits = models[name](images)
    if name == 'largest':
      loss = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    else:
      loss = -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()
    loss.backward()
  optimizer.step()
  with torch.no_grad():
    torch._foreach_lerp_(list(teacher.parameters()), list(models['largest'].parameters()),
                         1.0 - ema_decay)


def train_main(args, spec, models, madds, threads, memory_format) -> dict[str, Any]:
  """Times the sandwich step over the spec's draws and the plain step, round-robin."""
  import copy  # pylint: disable=import-outside-toplevel
  b, size = args.train_batch, spec['image_size']
  gen = torch.Generator().manual_seed(1)
  images = torch.randn(b, spec['in_channels'], size, size, generator=gen).contiguous(
      memory_format=memory_format)
  labels = torch.randint(0, spec['num_classes'], (b,), generator=gen)
  teacher = copy.deepcopy(models['largest']).eval()
  for model in models.values():
    model.train()
  params = [p for m in models.values() for p in m.parameters()]
  optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
  draws = spec['sandwich']
  step_no = [0]

  def sandwich():
    sandwich_step(models, teacher, optimizer, images, labels, draws[step_no[0] % len(draws)])
    step_no[0] += 1

  def plain():
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(models['largest'](images), labels).backward()
    optimizer.step()

  start = time.perf_counter()
  times = timed_round_robin({'sandwich step': sandwich, 'plain step (largest)': plain},
                            args.rounds, max(args.warmup, len(draws)))
  run_s = time.perf_counter() - start
  # Model FLOPs as train_step.py counts them: forward 2 MAdds per image, forward + backward 3x.
  draw_flops = [2.0 * b * (madds['largest']['total'] + 3 * sum(madds[n]['total'] for n in d))
                for d in draws]
  flops = {'sandwich step': float(np.mean(draw_flops)),
           'plain step (largest)': 6.0 * b * madds['largest']['total']}
  rows = []
  for name, t in times.items():
    ms = np.asarray(t) * 1e3
    rows.append(dict(what=name, ms_median=float(np.median(ms)),
                     ms_p90=float(np.percentile(ms, 90)), img_per_s=1e3 * b / float(np.median(ms)),
                     gflop=flops[name] / 1e9, gflop_per_s=flops[name] / float(np.median(ms)) / 1e6,
                     rounds_ms=ms.tolist()))
  result = dict(date=str(datetime.date.today()), torch=torch.__version__, threads=threads,
                cpu_count=os.cpu_count(), machine=platform.machine(),
                omp_wait_policy=os.environ.get('OMP_WAIT_POLICY', 'unset'), image_size=size,
                batch=b, draws=draws, rounds=args.rounds, run_s=run_s, rows=rows,
                memory_format=str(memory_format).split('.')[-1])
  lines = [f"# PyTorch {result['torch']} Stage I step, {result['date']}, {threads} threads, "
           f"float32, {result['memory_format']}, batch {b} at {size}x{size}, draws {draws}, "
           f"{args.rounds} rounds round-robin, OMP_WAIT_POLICY {result['omp_wait_policy']}", '',
           '| what | median ms | p90 ms | img/s | GFLOP | GFLOP/s |', '|---|---|---|---|---|---|']
  lines += [f"| {r['what']} | {r['ms_median']:.1f} | {r['ms_p90']:.1f} | {r['img_per_s']:.1f} | "
            f"{r['gflop']:.0f} | {r['gflop_per_s']:.1f} |" for r in rows]
  if args.profile:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      sandwich()
    table = prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15)
    result['profile'] = table
    lines += ['', 'Top ops of one sandwich step (torch.profiler, by self CPU time):', '', table]
  print('\n'.join(lines))
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
