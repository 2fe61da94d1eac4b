"""MAdds saving vs real speedup, per model family, in one run on the present device.

    python benchmarks/speed.py --models=ds_mbnet,ds_resnet,ds_vit --image_size=224

For each model (random weights: speed does not depend on values), `dsnet_jax.latency.measure`
times the full model (route 'largest'), the reference route (`--reference_route`), every route
of the routing space and the routed model on a forced route mix (`--mix`: the gate still runs
and its argmax still comes to the host, so routing costs what it costs in use), at batch 1
(each image alone) and at each of `--batch_sizes`; `timing.time_calls` times the masked approach
(every example at the routing space's widest route with per-example channel masks, as the
authors' gated mode) at the largest batch. Printed per model:
- the speed table: MAdds, the MAdds saving vs 'largest', ms/image per batch size, the speedup
  vs 'largest' at the largest batch and its share of the MAdds saving (100 % = time proportional
  to MAdds);
- the routing overhead: routed time vs the mix-weighted time of the static routes at the same
  batch (what grouping, the host sync, gathers and smaller per-route batches add);
- each compiled program alone (static routes, the shared prefix, each route's suffix), ms/image
  by batch size (`chunk_costs`): where the per-image time grows with the batch,
  RoutedPredictor runs big batches as smaller chunks.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsnet_jax import inference, latency, stand_in, timing  # noqa: E402
from dsnet_jax.models import COMPUTE_DTYPES, available_models  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='ds_mbnet,ds_resnet,ds_vit')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--batch_sizes', default='1,8,32,64',
                 help='batch sizes; the largest is the throughput batch of the ratios')
  p.add_argument('--mix', default='0.4,0.3,0.2,0.1', help='route fractions over the routing space')
  p.add_argument('--reference_route', default='',
                 help="a route to show beside 'largest' (default: the widest numbered route)")
  p.add_argument('--rounds', type=int, default=5, help='timed rounds (median)')
  p.add_argument('--singles', type=int, default=8, help='images per batch-1 round')
  p.add_argument('--dtype', default='float32', help="compute dtype: 'float32' or 'bfloat16'")
  args = p.parse_args(argv)
  try:
    sizes = [int(b) for b in args.batch_sizes.split(',')]
    mix = [float(f) for f in args.mix.split(',')]
  except ValueError:
    p.error(f'--batch_sizes must be integers and --mix numbers, got {args.batch_sizes!r}, '
            f'{args.mix!r}')
  if min(sizes) < 1 or args.rounds < 1 or args.singles < 1:
    p.error('--batch_sizes, --rounds and --singles must be positive')
  if not all(0 <= f < float('inf') for f in mix) or sum(mix) <= 0:
    p.error(f'--mix needs finite, non-negative fractions with a positive sum, got {mix}')
  unknown = set(args.models.split(',')) - set(available_models())
  if unknown or args.dtype not in COMPUTE_DTYPES:
    p.error(f'unknown models {sorted(unknown)} (available: {", ".join(available_models())}) '
            f'or --dtype {args.dtype!r} (valid: {", ".join(COMPUTE_DTYPES)})')
  return args


def mix_counts(fractions, n):
  """Largest-remainder rounding of fractions * n."""
  raw = np.asarray(fractions, np.float64) / np.sum(fractions) * n
  counts = np.floor(raw).astype(int)
  counts[np.argsort(-(raw - counts))[:n - counts.sum()]] += 1
  return counts


def speed_of(name: str, args) -> dict:
  """The latency table of one model, with the masked approach timed beside it."""
  model = latency.model_for(name, args.image_size, num_classes=args.num_classes,
                            dtype=args.dtype)
  table = model.routes
  space = table.routing_space
  image_shape = (args.image_size, args.image_size, 3)
  sizes = sorted({1, *(int(b) for b in args.batch_sizes.split(','))})
  count = max(sizes[-1], args.singles)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(count, *image_shape)).astype(np.float32)
  fractions = [float(f) for f in args.mix.split(',')]
  if len(fractions) != len(space):
    raise SystemExit(f'--mix needs {len(space)} fractions for {name}, got {fractions}')
  forced = rng.permutation(np.repeat(np.arange(len(space)), mix_counts(fractions, count)))
  numbered = [r for r in table if r != table.largest]
  reference = table[args.reference_route] if args.reference_route else numbered[-1]
  routes = list(dict.fromkeys([table.largest, reference, *space]))

  variables = jax.device_put(stand_in.random_variables(model, image_shape))
  predictor = inference.RoutedPredictor(model, variables, image_shape, max_batch=sizes[-1])
  result = latency.measure(predictor, images, routes=routes, batch_sizes=sizes,
                           singles=args.singles, rounds=args.rounds, routing_indices=forced)
  masked = jax.jit(lambda v, x, w: model.apply_gated(v, x, lambda _: w)[0])
  batch = jnp.asarray(images[:sizes[-1]])
  onehot = jax.nn.one_hot(forced[:sizes[-1]], len(space))
  seconds = timing.time_calls({'masked': lambda: masked(variables, batch, onehot)}, args.rounds)
  result['masked'] = {'madds': max(model.routing_madds(image_shape)),
                      'ms_per_image': {str(sizes[-1]): timing.summary_ms(seconds['masked'],
                                                                         sizes[-1])}}
  result.update(model=name, reference=reference.name)
  return result


def report(result) -> str:
  sizes = [str(b) for b in result['batch_sizes']]
  big = sizes[-1]
  rows = {f'route {n}': r for n, r in result['routes'].items()}
  rows.update({'routed': result['routed'], 'masked': result['masked']})
  base = rows['route largest']
  ms = lambda row, b: row['ms_per_image'][b]['median'] if b in row['ms_per_image'] else None
  lines = [f'## {result["model"]}: image {tuple(result["image_shape"])}, {result["dtype"]}, '
           f'{result["rounds"]} rounds (median; batch 1 = {result["singles"]} images, each '
           'alone)', '',
           '| config | MAdds/img (M) | MAdds saving vs largest | '
           + ' | '.join(f'ms/img @{b}' for b in sizes)
           + f' | speedup vs largest @{big} | speedup / saving @{big} | speedup @1 |',
           '|---|---|---|' + '---|' * len(sizes) + '---|---|---|']
  for name, row in rows.items():
    saving = base['madds'] / row['madds']
    speedup = ms(base, big) / ms(row, big)
    one = f'{ms(base, "1") / ms(row, "1"):.2f}x' if ms(row, '1') else '-'
    lines.append(f'| {name} | {row["madds"] / 1e6:.1f} | {saving:.2f}x | ' + ' | '.join(
        f'{ms(row, b):.2f}' if ms(row, b) else '-' for b in sizes)
        + f' | {speedup:.2f}x | {speedup / saving:.0%} | {one} |')
  mix = result['routed']['mix']
  for b in (big, '1'):
    ideal = sum(f * ms(result['routes'][n], b) for n, f in mix.items())
    routed = ms(result['routed'], b)
    lines.append(f'\nrouted @{b}: {routed:.2f} ms/img vs the mix-weighted static routes '
                 f'{ideal:.2f} ms/img: routing overhead {(routed - ideal) / routed:+.1%}')
  lines.append('route mix (forced): ' + ', '.join(f'{n}: {f:.0%}' for n, f in mix.items()))
  programs = result['chunk_costs']
  ladder = sorted(int(s) for s in programs['prefix'])
  lines += ['', 'each compiled program alone, one call per batch size (no chunking), ms/img: '
            'route/R is a static route, prefix the shared layers up to the gate, suffix/R a '
            'route from the gate on', '| program | ' + ' | '.join(f'@{s}' for s in ladder) + ' |',
            '|---|' + '---|' * len(ladder)]
  for n, costs in programs.items():
    lines.append(f'| {n} | ' + ' | '.join(f'{costs[str(s)] * 1e3 / s:.2f}' for s in ladder)
                 + ' |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  device = latency.device_description()
  print(f'# speed, {datetime.date.today()}, {device["backend"]} ({device["device_kind"]}, '
        f'{device["host_cores"]} host cores, {device["machine"]}), jax {device["jax"]}')
  print(f'command: python benchmarks/speed.py {" ".join(sys.argv[1:] if argv is None else argv)}')
  for name in args.models.split(','):
    print('\n' + report(speed_of(name, args)), flush=True)


if __name__ == '__main__':
  main()
