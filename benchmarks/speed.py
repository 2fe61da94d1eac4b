"""MAdds saving vs real speedup: static routes, the routed model and the masked approach.

One device, one run: images/s and latency at batch 1 and at a throughput batch for
  (a) the full model (route 'largest') and the reference route (DS-MBNet: 13, the widest
      numbered route),
  (b) every static route of the routing space,
  (c) the routed model (RoutedPredictor: gate once, group by route, padded ladder programs) on a
      route mix: the gate's own choices when a checkpoint (and images) are given, else a forced
      mix (`--mix`): the gate still runs and its decisions still come to the host, so the
      routing overhead is paid,
  (d) the masked approach (full-width compute with per-example channel masks, as the authors'
      dynamic mode does).
Every row shows its MAdds and its time against the full model and against the reference route.
Routing overhead = routed time - ideal time, where ideal = the mix-weighted time of each route's
static program at the throughput batch (as if every group were a perfectly batched static run).

    python benchmarks/speed.py --model=ds_mbnet --image_size=224               # GPU: batch 256
    python benchmarks/speed.py --model=ds_mbnet --batch=64 --image_size=224    # CPU

Configurations are timed round-robin (one call of each in turn), so slow phases of a shared
machine hit every row alike; each figure is a median.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsnet_jax import complexity, inference, stand_in  # noqa: E402
from dsnet_jax.models import get_model  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='ds_mbnet')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=0, help='throughput batch (0: 256 GPU/TPU, 64 CPU)')
  p.add_argument('--mix', default='0.4,0.3,0.2,0.1',
                 help='route fractions over the routing space (when the gate does not choose)')
  p.add_argument('--variables', default='',
                 help='orbax checkpoint of {params, batch_stats}: the gate chooses the routes')
  p.add_argument('--images', default='', help='.npy of preprocessed images (N, H, W, C) for it')
  p.add_argument('--reference_route', default='13', help="widest numbered route ('' for none)")
  p.add_argument('--ladder', default='pow2', help="'pow2' or comma-separated batch sizes")
  p.add_argument('--max_padding', type=float, default=None,
                 help='predictor padding limit (default: 0 on CPU, 0.25 on accelerators)')
  p.add_argument('--runs', type=int, default=5, help='timed calls per configuration (median)')
  p.add_argument('--singles', type=int, default=8, help='images per batch-1 round')
  p.add_argument('--dtype', default='float32', help='model compute dtype, e.g. bfloat16')
  p.add_argument('--num_classes', type=int, default=0)
  return p.parse_args(argv)


def mix_counts(fractions, n):
  """Largest-remainder rounding of fractions * n."""
  raw = np.asarray(fractions, np.float64) / np.sum(fractions) * n
  counts = np.floor(raw).astype(int)
  counts[np.argsort(-(raw - counts))[:n - counts.sum()]] += 1
  return counts


def timed_round_robin(configs: dict, runs: int) -> dict:
  """Median seconds of one call of each config; calls interleaved across configs."""
  for fn in configs.values():  # Compile and warm up.
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {name: [] for name in configs}
  for _ in range(runs):
    for name, fn in configs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def singles(call, images, routes=None):
  """One batch-1 round: each image alone, waited for (a request's latency), in turn."""
  def run():
    out = None
    for i in range(images.shape[0]):
      out = call(images[i:i + 1], None if routes is None else int(routes[i]))
      jax.block_until_ready(out)
    return out
  return run


def main(argv=None):
  args = parse_args(argv)
  backend = jax.default_backend()
  batch = args.batch or (64 if backend == 'cpu' else 256)
  kwargs = {} if args.dtype == 'float32' else {'dtype': jnp.dtype(args.dtype)}
  if args.num_classes:
    kwargs['num_classes'] = args.num_classes
  model = get_model(args.model, **kwargs)
  image_shape = (args.image_size, args.image_size, 3)
  rng = np.random.default_rng(0)

  gate_chooses = bool(args.variables)
  if gate_chooses:
    from dsnet_jax import rundir  # orbax, only for a checkpoint.
    restored = rundir.restore_variables(args.variables, model, image_shape)
    model, variables = restored.model, restored.variables
  else:
    variables = stand_in.random_variables(model, image_shape)  # Speed ignores values.
  table = model.routes
  space = table.routing_space
  variables = jax.device_put(variables)
  if args.images:
    pool = np.load(args.images).astype(np.float32)
    images = pool[rng.integers(0, len(pool), batch)]
  else:
    images = rng.normal(size=(batch, *image_shape)).astype(np.float32)
  images_dev = jax.device_put(images)

  ladder = (inference.powers_of_two(batch) if args.ladder == 'pow2'
            else tuple(int(s) for s in args.ladder.split(',')))
  predictor = inference.RoutedPredictor(model, variables, image_shape, ladder=ladder,
                                        max_padding=args.max_padding)
  start = time.perf_counter()
  predictor.warmup()
  warmup_s = time.perf_counter() - start

  # Route mix: the gate's own choices, or a forced mix.
  if gate_chooses:
    _, routes = predictor.predict(images)
    mix_source = 'gate (checkpoint' + (', given images)' if args.images else ', random images)')
  else:
    fractions = [float(f) for f in args.mix.split(',')]
    if len(fractions) != len(space):
      raise ValueError(f'--mix needs {len(space)} fractions, got {fractions}')
    routes = rng.permutation(np.repeat(np.arange(len(space)), mix_counts(fractions, batch)))
    mix_source = 'forced --mix=' + args.mix
  counts = np.bincount(routes, minlength=len(space))
  fractions = counts / counts.sum()
  single_routes = rng.permutation(
      np.repeat(np.arange(len(space)), mix_counts(fractions, args.singles)))

  # MAdds per image.
  def madds(route, with_gate=False):
    return complexity.route_complexity(model, route, image_shape, with_gate=with_gate).madds
  full = table.largest
  reference = None
  if args.reference_route and args.reference_route in table.names:
    reference = table[args.reference_route]
  elif args.reference_route:
    print(f'(no route {args.reference_route!r} in {args.model}: no reference column)')
  statics = [full] + ([reference] if reference and reference != full else [])
  statics += [r for r in space if r not in statics]
  route_madds = {r.name: madds(r) for r in statics}
  gated_madds = [madds(r, with_gate=True) for r in space]
  routed_madds = float(np.dot(fractions, gated_madds))
  # Masked: every example computes the routing space's widest route (plus gate and masks).
  masked_madds = float(max(gated_madds))

  # Programs.
  # One plain jitted program per static route (no static arguments to hash per call).
  static_fns = {r.name: jax.jit(lambda v, x, r=r: model.apply(v, x, route=r)) for r in statics}
  masked_fn = jax.jit(lambda v, x, w: model.apply_gated(v, x, lambda _: w)[0])
  onehot = jax.device_put(jax.nn.one_hot(routes, len(space)))
  onehot_single = [jax.device_put(w[None]) for w in jax.nn.one_hot(single_routes, len(space))]
  single_images = jax.device_put(images[:args.singles])
  throughput = {f'route {r.name}': (lambda r=r: static_fns[r.name](variables, images_dev))
                for r in statics}
  forced = None if gate_chooses else routes
  throughput['routed'] = lambda: predictor.predict(images_dev, routing_indices=forced)[0]
  # Pure routing cost: the routed path with every example on one route vs that static route.
  same_route = np.zeros(batch, np.int32)
  throughput[f'routed, all on {space[0].name}'] = (
      lambda: predictor.predict(images_dev, routing_indices=same_route)[0])
  # The same two programs with no routing between them: no argmax sync, grouping or gathers.
  prefix_fn = jax.jit(lambda v, x: model.apply_prefix(v, x)[0])
  suffix_fn = jax.jit(lambda v, h: model.apply_suffix(v, h, space[0]))
  split = f'prefix + suffix {space[0].name}, no routing'
  throughput[split] = lambda: suffix_fn(variables, prefix_fn(variables, images_dev))
  throughput['masked'] = lambda: masked_fn(variables, images_dev, onehot)
  latency = {f'route {r.name}': singles(lambda x, _, r=r: static_fns[r.name](variables, x),
                                        single_images) for r in statics}
  latency['routed'] = singles(lambda x, r: predictor.predict_one(x[0], routing_index=r)[0],
                              single_images, None if gate_chooses else single_routes)
  latency[f'routed, all on {space[0].name}'] = singles(
      lambda x, _: predictor.predict_one(x[0], routing_index=0)[0], single_images)
  latency[split] = singles(lambda x, _: suffix_fn(variables, prefix_fn(variables, x)),
                           single_images)
  latency['masked'] = singles(
      lambda x, i: masked_fn(variables, x, onehot_single[i]), single_images,
      np.arange(args.singles))

  t_batch = timed_round_robin(throughput, args.runs)
  t_single = {k: v / args.singles for k, v in timed_round_robin(latency, args.runs).items()}

  # Report.
  rows_madds = {f'route {r.name}': route_madds[r.name] for r in statics}
  rows_madds['routed'] = routed_madds
  rows_madds[f'routed, all on {space[0].name}'] = float(gated_madds[0])
  rows_madds[split] = float(route_madds[space[0].name])
  rows_madds['masked'] = masked_madds
  base, ref_key = f'route {full.name}', reference and f'route {reference.name}'
  device = jax.devices()[0]
  print(f'# {args.model} speed, {datetime.date.today()}, {backend} '
        f'({getattr(device, "device_kind", device.platform)}, {os.cpu_count()} host cores, '
        f'{platform.machine()}), jax {jax.__version__}')
  print(f'command: python benchmarks/speed.py {" ".join(sys.argv[1:] if argv is None else argv)}')
  print(f'image {image_shape}, throughput batch {batch}, dtype {args.dtype}, {args.runs} runs '
        f'(median, round-robin), batch-1 rounds of {args.singles} images')
  print(f'route mix ({mix_source}): ' + ', '.join(
      f'{r.name}: {c}' for r, c in zip(space, counts)) + f' of {batch}')
  print(f'routed predictor: ladder {ladder}, max_padding {predictor.max_padding}, '
        f'{predictor.num_compiles} programs compiled in {warmup_s:.1f} s\n')
  header = ('| config | MAdds/img (M) | MAdds saving vs largest | speedup vs largest @B | '
            'speedup / saving @B | speedup @1 | vs route '
            f'{reference.name if reference else "-"}: saving / speedup @B | img/s @B | '
            'ms/batch @B | ms/img @1 |')
  print(header)
  print('|' + '---|' * 10)
  for name in throughput:
    saving = rows_madds[base] / rows_madds[name]
    speedup = t_batch[base] / t_batch[name]
    speedup1 = t_single[base] / t_single[name]
    vs_ref = (f'{rows_madds[ref_key] / rows_madds[name]:.2f}x / '
              f'{t_batch[ref_key] / t_batch[name]:.2f}x' if ref_key else '-')
    print(f'| {name} | {rows_madds[name] / 1e6:.1f} | {saving:.2f}x | {speedup:.2f}x | '
          f'{speedup / saving:.0%} | {speedup1:.2f}x | {vs_ref} | {batch / t_batch[name]:.1f} | '
          f'{t_batch[name] * 1e3:.1f} | {t_single[name] * 1e3:.2f} |')

  ideal = float(sum(f * t_batch[f'route {r.name}'] for f, r in zip(fractions, space)))
  overhead = (t_batch['routed'] - ideal) / t_batch['routed']
  plan_rows = sum(size for c in counts for size, _ in inference.plan_chunks(
      int(c), ladder, predictor.max_padding))
  ideal1 = float(sum(f * t_single[f'route {r.name}'] for f, r in zip(fractions, space)))
  saving = rows_madds[base] / routed_madds
  speedup = t_batch[base] / t_batch['routed']
  time_saved, madds_saved = 1 - 1 / speedup, 1 - 1 / saving
  print(f'\nrouted @B: {t_batch["routed"] * 1e3:.1f} ms vs ideal (mix-weighted static routes) '
        f'{ideal * 1e3:.1f} ms: routing overhead (gate + host sync + grouping + padding + smaller '
        f'batches) {overhead:.1%} of routed time; suffix rows computed {plan_rows} for {batch} '
        f'images ({plan_rows / batch - 1:.0%} padding)')
  t_same, t_static = t_batch[f'routed, all on {space[0].name}'], t_batch[f'route {space[0].name}']
  t_split = t_batch[split]
  print(f'routed with all {batch} on route {space[0].name}: {t_same * 1e3:.1f} ms vs static route '
        f'{space[0].name} {t_static * 1e3:.1f} ms ({(t_same - t_static) / t_same:.1%}) and vs its '
        f'prefix and suffix programs run back to back {t_split * 1e3:.1f} ms: routing overhead '
        f'(gate head + host sync + grouping + gather/scatter + copy-out) '
        f'{(t_same - t_split) / t_same:.1%}')
  print(f'routed @1: {t_single["routed"] * 1e3:.2f} ms vs ideal {ideal1 * 1e3:.2f} ms: '
        f'overhead {(t_single["routed"] - ideal1) / t_single["routed"]:.1%}')
  print(f'routed vs largest @B: MAdds {saving:.2f}x fewer, time {speedup:.2f}x shorter: speedup / '
        f'MAdds saving = {speedup / saving:.0%}; time saved / MAdds saved = '
        f'{time_saved:.0%} / {madds_saved:.0%} = {time_saved / madds_saved:.0%}')
  if ref_key:
    s_ref = rows_madds[ref_key] / routed_madds
    t_ref = t_batch[ref_key] / t_batch['routed']
    print(f'routed vs route {reference.name} @B: MAdds {s_ref:.2f}x fewer, time {t_ref:.2f}x '
          f'shorter: {t_ref / s_ref:.0%}')
  target = 0.6 if backend == 'cpu' else 0.8
  pure = (t_same - min(t_static, t_split)) / t_same
  print(f'targets ({backend}): speedup / saving >= {target:.0%}: '
        f'{"met" if speedup / saving >= target else "NOT met"}; overhead < 5%: '
        f'{"met" if max(overhead, pure) < 0.05 else "NOT met"} (mix {overhead:.1%}, '
        f'one route {pure:.1%})')


if __name__ == '__main__':
  main()
