"""Stage I step efficiency: one sandwich step against its parts and against a plain step.

A Stage I step (`train_steps.SupernetFunctions.step`) is a chain of compiled pieces: the
teacher's forward on route 'largest', a zero gradient accumulator, one `route_grad` program per
route of the sandwich (each adds its gradients to the accumulator on the device), and one
`update`; the routes are drawn on the host, and the key folding and the loss sum between the
pieces are small eager ops. Times, warm (after compiling), several rounds:
  sandwich step   the step as Stage I runs it (its key from `Run.step_key` included), pieces
                  dispatched back to back;
  sum of parts    the same step with every piece timed alone: its inputs ready first, then the
                  piece until its outputs are ready (teacher, zeros, each route_grad, update);
  plain step      route 'largest' alone: one route_grad + one update (the accumulator it
                  needs made outside the timing).
Overhead = sandwich step - sum of parts (per round, paired), as % of the step: what having
one program per route, the host-side draw and accumulation, the eager ops between the pieces
and dispatch cost beyond the pieces' own time. It can be negative where dispatching the next
piece overlaps the device's work on the previous one.

Model FLOPs per image: forward = 2 * MAdds (complexity.route_complexity), forward + backward =
3 x forward; the teacher is one forward (two views with MvCo count twice). MFU divides
FLOP/s by a peak: `--peak_tflops`, else a small table of dense tensor-core peaks by device kind
(bf16 for a bfloat16 model, else TF32, what XLA's default precision uses for float32 matmuls
on these GPUs), else 'n/a' (CPUs).

Batches are synthetic (the config's data swapped for random images of its shape, the config's
views and label mixing kept): a step's time does not depend on pixel values, and the input
pipeline is not timed. The routes of each timed step come from `--draws` step indices (the
sandwich draw is a function of (seed, step)), cycled over the rounds; every configuration runs
once per round, round-robin, so slow phases of a shared machine hit all alike.

    python benchmarks/train_step.py                                  # the demo config
    python benchmarks/train_step.py --config=configs/ds_mbnet_imagenet.py --batch=256

Needs what train_lib needs (ml_collections, grain, tensorflow_datasets, PIL among them):
train_lib imports its config and data code at the top, so a machine with only jax, flax,
optax, orbax and chex cannot run this without installing them.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsnet_jax import (config_lib, huge_pages, sharding, stand_in, train_lib,  # noqa: E402
                       train_steps)
from dsnet_jax.complexity import route_complexity  # noqa: E402

DEFAULT_CONFIG = 'configs/ds_mbnet_fmnist.py'
# Dense peak TFLOP/s by device kind (substring, first match): (bf16, TF32).
PEAK_TFLOPS = (('H100 PCIe', (756.0, 378.0)), ('H100', (989.0, 494.0)),
               ('H200', (989.0, 494.0)), ('A100', (312.0, 156.0)))
PARTS = ('teacher', 'zeros', 'route_grad', 'update')  # SupernetFunctions' compiled pieces.
# jax.monitoring's event for lowering a program to MLIR: once per program compiled.
LOWERING_EVENT = 'jaxpr_to_mlir_module'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default=DEFAULT_CONFIG,
                 help="a training config file, 'path' or 'path:arg' (as train.py's --config)")
  p.add_argument('--batch', type=int, default=0, help="global batch (0: the config's)")
  p.add_argument('--image_size', type=int, default=0, help="(0: the config's)")
  p.add_argument('--num_devices', type=int, default=-1, help="(-1: the config's)")
  p.add_argument('--dtype', default='', help="compute dtype, 'float32' or 'bfloat16' (default: "
                 "the config's model.dtype)")
  p.add_argument('--rounds', type=int, default=10, help='timed rounds (median, p90)')
  p.add_argument('--draws', type=int, default=2,
                 help='sandwich draws (step indices 0..draws-1) cycled over the rounds')
  p.add_argument('--profile', action='store_true',
                 help="top XLA ops of one sandwich step (jax.profiler), by fusion kind")
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help='peak TFLOP/s for MFU (0: by device kind where known, else n/a)')
  args = p.parse_args(argv)
  if args.rounds < 1 or args.draws < 1:
    p.error('--rounds and --draws must be >= 1')
  return args


def benchmark_config(config, args):
  """The config with the flags' overrides and synthetic data of its shape (Stage I only)."""
  if args.batch:
    config.batch_size = args.batch
    config.eval_batch_size = args.batch
  if args.num_devices >= 0:
    config.num_devices = args.num_devices
  if args.dtype:
    config.model.dtype = args.dtype
  if args.image_size and 'image_size' in config.model:  # ViTs are built for one image size.
    config.model.image_size = args.image_size
  data = config.data
  channels = data.get('channels') or config.model.get('in_channels') or 3
  num_classes = data.get('num_classes') or config.model.get('num_classes')
  # make_run holds the gate's calibration examples out of the training split.
  held_out = config.gate.calibration_examples if config.gate.budget else 0
  data.update(dict(name='synthetic', image_size=args.image_size or data.get('image_size') or 224,
                   channels=channels, num_classes=num_classes,
                   synthetic_num_examples=config.batch_size + held_out))
  config.stages = ('supernet',)
  return config


@dataclasses.dataclass
class Call:
  part: str
  route: Any  # A Route, or None for zeros and update.
  seconds: float


class PartTimer:
  """While `timing()`, each compiled piece of `fns` runs alone: its inputs are waited for
  (untimed), then it is timed until its outputs are ready; `calls` lists them in order."""

  def __init__(self, fns: train_steps.SupernetFunctions):
    self.fns = fns
    self.calls: list[Call] = []

  def _wrap(self, part: str, jitted: Callable) -> Callable:
    def timed(*args, **kwargs):
      jax.block_until_ready((args, kwargs))
      start = time.perf_counter()
      out = jax.block_until_ready(jitted(*args, **kwargs))
      self.calls.append(Call(part, kwargs.get('route'), time.perf_counter() - start))
      return out
    return timed

  @contextlib.contextmanager
  def timing(self):
    self.calls = []
    originals = {part: getattr(self.fns, part) for part in PARTS}
    try:
      for part, jitted in originals.items():
        setattr(self.fns, part, self._wrap(part, jitted))
      yield self.calls
    finally:
      for part, jitted in originals.items():
        setattr(self.fns, part, jitted)


@contextlib.contextmanager
def counting_lowerings():
  """[count] of programs lowered meanwhile (each program compiled, or read from a persistent
  compilation cache, is lowered once)."""
  count, active = [0], [True]

  def listener(event, *_, **__):
    if active[0] and LOWERING_EVENT in event:
      count[0] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    active[0] = False
    unregister = getattr(jax.monitoring, 'unregister_event_duration_listener', None)
    if unregister:
      unregister(listener)


def cache_sizes(fns) -> dict[str, int] | None:
  """Programs each compiled piece holds (None where jax's jit has no `_cache_size`)."""
  try:
    return {part: getattr(fns, part)._cache_size() for part in PARTS}
  except AttributeError:
    return None


def peak_tflops(args, device, dtype: str) -> float | None:
  if args.peak_tflops:
    return args.peak_tflops
  if device.platform != 'gpu':
    return None
  kind = getattr(device, 'device_kind', '')
  for name, (bf16, tf32) in PEAK_TFLOPS:
    if name in kind:
      return bf16 if 'bfloat16' in dtype else tf32
  return None


def top_ops(fn: Callable[[], Any], count: int = 12) -> list[tuple[str, float, int]]:
  """(op kind, ms, calls) of the XLA ops one call of `fn` runs, most time first: the compiled
  programs' thunks as jax.profiler traces them (perfetto trace), grouped by kind (a fusion's
  name without its '.N' suffix, e.g. 'multiply_add_fusion'); Python, dispatch and the
  executor's own spans left out."""
  with tempfile.TemporaryDirectory() as out:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      jax.block_until_ready(fn())
    with gzip.open(glob.glob(f'{out}/**/*.trace.json.gz', recursive=True)[0]) as f:
      events = json.load(f)['traceEvents']
  skip = ('$', 'Pjit', 'ThunkExecutor', 'end: ', 'Slinky', 'CommonPjRt', 'ParseArguments')
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and not e['name'].startswith(skip):
      kind = re.sub(r'\.\d+$', '', e['name'])
      total[kind] += e['dur'] / 1e3
      calls[kind] += 1
  return [(kind, ms, calls[kind]) for kind, ms in total.most_common(count)]


def percentile(values, q: float) -> float:
  return float(np.percentile(np.asarray(values), q))


def part_label(call: Call, calls: list[Call], table) -> str:
  """A piece's row, by its position in the step (draws vary the middle routes)."""
  same = [c for c in calls if c.part == call.part]
  name = call.part
  if len(same) > 1:
    name += f' #{next(k for k, c in enumerate(same) if c is call)}'
  if call.route is None:
    return name
  role = ('largest' if call.route == table.largest else
          'smallest' if call.route == table.smallest else 'random')
  return f'{name} ({role})'


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  config = benchmark_config(config_lib.load_config_file(args.config), args)
  with tempfile.TemporaryDirectory() as workdir:  # make_run reads none; nothing is saved.
    run = train_lib.make_run(config, workdir)
  cfg, table, mesh = config.supernet, run.table, run.mesh
  image_shape = run.train_data.image_shape
  # Random variables of the model's shapes (a step's time does not depend on their values),
  # and the fresh state built in one program (not leaf by leaf: one compile, not dozens).
  variables = stand_in.random_variables(run.model, image_shape, config.seed)
  tx = train_lib.supernet_optimizer(run)
  fresh_state = jax.jit(functools.partial(train_steps.TrainState.create, tx=tx, with_ema=True),
                        out_shardings=sharding.replicated(mesh))
  fns = train_steps.SupernetFunctions(run.model, tx, run.spec.supernet.recipe, mesh)
  timer = PartTimer(fns)
  batch = next(run.batches(0))
  batch_size = int(batch['image'].shape[0])
  views = len(train_steps.training_views(batch, cfg.mvco))
  dtype = str(config.model.get('dtype') or 'float32')

  # One state per configuration: each step donates the one it is given.
  states = {name: fresh_state(variables) for name in ('sandwich', 'parts', 'plain')}
  steps = list(range(args.draws))

  def sandwich(s: int, name: str = 'sandwich'):
    states[name], metrics = fns.step(states[name], batch, table, config.seed, s,
                                     run.step_key(s, 0))
    return states[name], metrics

  # The plain step's inputs besides its state: the teacher's output stands in for the targets
  # (route 'largest' trains on the labels; same shapes, so the sandwich's program is reused).
  targets = fns.teacher(states['plain'].ema, batch, route=table.largest)
  plain_key = jax.random.fold_in(run.step_key(0, 0), 0)

  def plain():
    state = states['plain']
    grads = jax.block_until_ready(fns.zeros(state.params))
    start = time.perf_counter()
    grads, batch_stats, _ = fns.route_grad(state.params, state.batch_stats, batch, targets,
                                           plain_key, grads, route=table.largest)
    states['plain'] = jax.block_until_ready(fns.update(state, grads, batch_stats))
    return time.perf_counter() - start

  def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  # Warm-up: every draw's programs compiled (the first step's lowerings counted).
  start = time.perf_counter()
  with counting_lowerings() as first_step_lowerings:
    timed(lambda: sandwich(steps[0]))
  draws = {}
  for s in steps:
    timed(lambda: sandwich(s))
    with timer.timing() as calls:
      timed(lambda: sandwich(s, 'parts'))
    draws[s] = [c.route for c in calls if c.part == 'route_grad']
  plain()
  warmup_s = time.perf_counter() - start

  step_times, plain_times, rounds = [], [], []
  with counting_lowerings() as timed_lowerings:
    for r in range(args.rounds):
      s = steps[r % len(steps)]
      step_times.append(timed(lambda: sandwich(s)))
      with timer.timing() as calls:
        sandwich(s, 'parts')
      rounds.append(calls)
      plain_times.append(plain())
  part_sums = [sum(c.seconds for c in calls) for calls in rounds]
  overheads = [(t - p) / t for t, p in zip(step_times, part_sums)]
  num_parts = len(rounds[0])
  part_times: dict[str, list[float]] = {}
  part_calls: dict[str, list[Call]] = {}
  for calls in rounds:
    for c in calls:
      label = part_label(c, calls, table)
      part_times.setdefault(label, []).append(c.seconds)
      part_calls.setdefault(label, []).append(c)

  # FLOPs per call: forward 2 MAdds per image, forward + backward 3x that.
  madds = {}

  def flops(call: Call) -> float:
    if call.route is None:
      return 0.0
    if call.route not in madds:
      madds[call.route] = route_complexity(run.model, call.route, image_shape).madds
    per_image = 2.0 * madds[call.route] * (3 if call.part == 'route_grad' else 1)
    return per_image * batch_size * views

  device = jax.devices()[0]
  peak = peak_tflops(args, device, dtype)
  med = {'sandwich step': float(np.median(step_times)), 'sum of parts': float(np.median(part_sums)),
         'plain step (largest)': float(np.median(plain_times))}
  p90 = {'sandwich step': percentile(step_times, 90), 'sum of parts': percentile(part_sums, 90),
         'plain step (largest)': percentile(plain_times, 90)}
  step_flops = float(np.mean([sum(flops(c) for c in calls) for calls in rounds]))
  plain_flops = flops(Call('route_grad', table.largest, 0.0))
  row_flops = {'sandwich step': step_flops, 'sum of parts': step_flops,
               'plain step (largest)': plain_flops}
  row_calls = {'sandwich step': 1, 'sum of parts': num_parts, 'plain step (largest)': 2}
  for label, times in part_times.items():
    med[f'· {label}'] = float(np.median(times))
    p90[f'· {label}'] = percentile(times, 90)
    row_flops[f'· {label}'] = float(np.mean([flops(c) for c in part_calls[label]]))
    row_calls[f'· {label}'] = 1
  order = ['sandwich step', 'sum of parts', *[f'· {l}' for l in part_times],
           'plain step (largest)']

  per_step = {(c.part, c.route) for c in rounds[-1]}
  cached = cache_sizes(fns)
  overhead_s = float(np.median(np.subtract(step_times, part_sums)))
  overhead = float(np.median(overheads))
  command = ' '.join(sys.argv[1:] if argv is None else argv)

  print('# Stage I step: sandwich vs its parts vs a plain step\n')
  print('| | |\n|---|---|')
  for key, value in (
      ('command', f'`python benchmarks/train_step.py {command}`'.replace('|', '\\|')),
      ('date', datetime.datetime.now().strftime('%Y-%m-%d %H:%M')),
      ('backend', f'{jax.default_backend()}, {mesh.size} of {len(jax.devices())} devices'),
      ('device kind', f'{getattr(device, "device_kind", device.platform)} '
                      f'({os.cpu_count()} host cores, {platform.machine()})'),
      ('GLIBC_TUNABLES', os.environ.get('GLIBC_TUNABLES') or 'unset (4 KiB pages)'),
      ('jax', jax.__version__),
      ('config', f'{args.config}: {config.model_name}, batch {batch_size} x {views} view(s) of '
                 f'{tuple(image_shape)}, dtype {dtype}, {cfg.num_random_routes} random routes'
                 f'{", ensemble_ib" if cfg.ensemble_ib else ""}'),
      ('draws (step: routes)', '; '.join(f'{s}: {" ".join(r.name for r in routes)}'
                                         for s, routes in draws.items())),
      ('timing', f'{args.rounds} rounds, round-robin, after a warm-up of {warmup_s:.1f} s '
                 '(compiles)'),
      ('peak', f'{peak:g} TFLOP/s' if peak else 'n/a (--peak_tflops)')):
    print(f'| {key} | {value} |')
  print('\n| what | calls | median ms | p90 ms | img/s | GFLOP | TFLOP/s | MFU |')
  print('|---|---|---|---|---|---|---|---|')
  for name in order:
    t, f = med[name], row_flops[name]
    rate = f / t / 1e12 if f else 0.0
    images = f'{batch_size / t:.1f}' if 'step' in name or name == 'sum of parts' else ''
    print(f'| {name} | {row_calls[name]} | {t * 1e3:.2f} | {p90[name] * 1e3:.2f} | {images} | '
          f'{f / 1e9:.3g} | {rate:.3g} | {f"{rate / peak:.1%}" if peak and f else "n/a"} |')
  print(f'\noverhead (sandwich step - sum of parts, per round): median {overhead_s * 1e3:.2f} ms '
        f'= {overhead:.1%} of the step (p90 {percentile(overheads, 90):.1%}); target < 10%: '
        f'{"met" if overhead < 0.10 else "NOT met"}')
  print(f'sandwich vs plain step: time {med["sandwich step"] / med["plain step (largest)"]:.2f}x, '
        f'model FLOPs {step_flops / plain_flops:.2f}x')
  # No lowering event at all in a first step: this jax reports lowerings under another name.
  lowered = (f'the first step lowered {first_step_lowerings[0]} programs (its pieces and the '
             f'eager ops between them), the timed rounds {timed_lowerings[0]}'
             if first_step_lowerings[0] else 'lowerings n/a (no jax.monitoring event)')
  print(f'programs: a step runs {num_parts} pieces, {len(per_step)} distinct compiled programs '
        f'(' + ', '.join(f'{p} {sum(q == p for q, _ in per_step)}' for p in PARTS) + '); ' +
        lowered +
        ('' if cached is None else '; compiled per piece after the run: ' +
         ', '.join(f'{p} {n}' for p, n in cached.items()) +
         f' (route_grad: one per route seen, at most {len(table)})'))
  ops = []
  if args.profile:
    ops = top_ops(lambda: sandwich(steps[0]))
    op_time = sum(ms for _, ms, _ in ops)
    print(f'\ntop XLA ops of one sandwich step (jax.profiler; {op_time:.0f} ms in these):\n')
    print('| op kind | ms | % of these | calls |\n|---|---|---|---|')
    for kind, ms, n in ops:
      print(f'| {kind} | {ms:.1f} | {100 * ms / op_time:.1f} | {n} |')
  return {'step_times': step_times, 'part_sums': part_sums, 'plain_times': plain_times,
          'top_ops': ops,
          'part_times': part_times, 'num_parts': num_parts, 'overhead': overhead,
          'draws': draws, 'step_flops': step_flops, 'plain_flops': plain_flops,
          'programs_per_step': len(per_step), 'first_step_lowerings': first_step_lowerings[0],
          'timed_lowerings': timed_lowerings[0], 'cache_sizes': cached, 'mfu_peak': peak,
          'batch_size': batch_size}


if __name__ == '__main__':
  huge_pages.relaunch()  # As train.py runs.
  main()
