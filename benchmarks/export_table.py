"""Every family exported, checked against the supernet, and ONNX timed against JAX, in one run.

    python benchmarks/export_table.py --models=ds_mbnet,ds_resnet,ds_vit --image_size=224
    python benchmarks/export_table.py --config=configs/tiny.py   # a config's model instead
    python benchmarks/export_table.py --config=configs/ds_mbnet_fmnist.py \
        --workdir=workdir/ds_mbnet_fmnist   # its trained weights, on its evaluation images

For each model (random weights, BatchNorm statistics of real activations of 64 random images, and
routing offsets that spread a batch over the routing space, so that a wrong slice, fold or
route shows): route 0, the routing space's middle route, 'largest' and the routed bundle, each
written as jax.export and ONNX (`dsnet_jax.export`). Printed: the max abs logits error of each
artifact against `model.apply(variables, x, route=r)` (the bundle: against
`RoutedPredictor.predict`, routed as the README's reference router does), file sizes and
parameter counts. Then `--timed_route` of `--timed_model` in onnxruntime (CPU) against the same
route's jax.export artifact and the supernet's jitted route, at each of `--timing_batches`,
round-robin in one run (ms per image, median over `--rounds`).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsnet_jax import (bn_calibration, config_lib, eval_lib, export, latency,  # noqa: E402
                       stand_in, timing)
from dsnet_jax.data import input_pipeline  # noqa: E402
from dsnet_jax.inference import RoutedPredictor  # noqa: E402
from dsnet_jax.models import available_models, get_model  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='ds_mbnet,ds_resnet,ds_vit')
  p.add_argument('--config', default='', help="a config file: its model and image shape "
                 'instead of --models, --image_size and --num_classes')
  p.add_argument('--workdir', default='', help='with --config: the trained weights of this '
                 'workdir and its evaluation images instead of random ones')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--images', type=int, default=8, help='images the errors are measured on')
  p.add_argument('--formats', default='jax,onnx')
  p.add_argument('--timed_model', default='ds_mbnet', help="'' to skip the timing")
  p.add_argument('--timed_route', default='0')
  p.add_argument('--timing_batches', default='1,64')
  p.add_argument('--rounds', type=int, default=5)
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m]
  unknown = sorted(set(args.models + [args.timed_model] * bool(args.timed_model))
                   - set(available_models()))
  if unknown or not args.models:
    p.error(f'unknown model {", ".join(unknown) or "(none)"}; available: '
            f'{", ".join(available_models())}')
  try:
    args.timing_batches = [int(b) for b in args.timing_batches.split(',') if b]
    args.formats = export.check_formats(args.formats)
  except (ValueError, ImportError) as e:
    p.error(str(e))
  if args.workdir and not args.config:
    p.error('--workdir needs the --config it was trained with')
  if args.image_size < 16 or args.images < 1 or args.rounds < 1 or (
      args.timing_batches and min(args.timing_batches) < 1):
    p.error('--image_size must be >= 16, --images, --rounds and --timing_batches positive')
  return args


def trained_like(model, image_shape, count: int, seed: int = 0):
  """Random weights, BN statistics of real activations, offsets spreading the routes."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(count, *image_shape)).astype(np.float32)
  variables = stand_in.random_variables(model, image_shape, seed=seed)
  if variables.get('batch_stats'):
    variables = bn_calibration.calibrate_to_batch(model, variables, x, model.routes.names)
  _, logits = jax.jit(model.apply_prefix)(variables, x)
  offsets = -np.median(np.asarray(logits), axis=0).astype(np.float32)
  return {**variables, 'routing': {'offsets': offsets}}


def onnx_session(path):
  import onnxruntime  # pylint: disable=import-outside-toplevel
  return onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def run_onnx(session, *inputs):
  names = [i.name for i in session.get_inputs()]
  outputs = session.run(None, dict(zip(names, inputs)))
  return outputs[0] if len(outputs) == 1 else outputs


def program_runner(out_dir: str, fmt: str):
  if fmt == 'jax':
    return lambda name: export.load_program(out_dir, name)
  return lambda name: (lambda *xs, s=onnx_session(os.path.join(out_dir, f'{name}.onnx')):
                       run_onnx(s, *map(np.asarray, xs)))


def routed(load, manifest, images):
  """The README's reference router over an export's programs."""
  hidden, index = map(np.asarray, load('prefix')(images))
  logits = np.zeros((len(images), manifest['num_classes']), np.float32)
  for i in range(len(manifest['routes'])):
    rows = np.flatnonzero(index == i)
    if rows.size:
      logits[rows] = np.asarray(load(f'suffix_{i}')(hidden[rows]))
  return logits, index


def size_mib(out_dir: str, manifest: dict, fmt: str) -> float:
  """What a deployment in `fmt` ships: jax.export + .npz, or .onnx + .onnx.data."""
  kinds = {'jax': ('jax', 'params'), 'onnx': ('onnx', 'onnx_data')}[fmt]
  files = [f for p in manifest['programs'].values() for k, f in p['files'].items() if k in kinds]
  return sum(os.path.getsize(os.path.join(out_dir, f)) for f in files) / 2**20


def models(args):
  """(name, model, image shape, variables, images) of each model to export."""
  if args.workdir:
    config = config_lib.load_config_file(args.config)
    loaded, pipeline, _ = eval_lib.restore_workdir(config, args.workdir)
    images = latency.evaluation_images(pipeline, args.images)
    yield (config.model_name, loaded.model, images.shape[1:],
           jax.device_get(loaded.variables), images)
    return
  if args.config:
    config = config_lib.load_config_file(args.config)
    shape = input_pipeline.preprocessing(config_lib.data_spec(config.data)).image_shape
    model = get_model(config.model_name, **config.model)
    yield config.model_name, model, shape, trained_like(model, shape, 64), None
    return
  for name in args.models:
    model = latency.model_for(name, args.image_size, num_classes=args.num_classes)
    shape = (args.image_size, args.image_size, 3)
    yield name, model, shape, trained_like(model, shape, 64), None


def family_rows(name: str, model, shape, variables, images, args, root: str) -> list[dict]:
  x = images if images is not None else np.random.default_rng(1).normal(
      size=(args.images, *shape)).astype(np.float32)
  space = model.routes.routing_space
  rows = []
  for route in dict.fromkeys([space[0], space[len(space) // 2], model.routes.largest]):
    out = os.path.join(root, f'{name}_{route.name}')
    manifest = export.export_route(model, variables, route, out, shape, formats=args.formats,
                                   platforms=('cpu',), verbose=False)
    want = np.asarray(jax.jit(lambda v, x, r=route: model.apply(v, x, route=r))(variables, x))
    row = {'model': name, 'what': f'route {route.name}',
           'params': manifest['programs']['route']['params'],
           'logit_scale': float(np.abs(want).max())}
    for fmt in args.formats:
      got = np.asarray(program_runner(out, fmt)('route')(x))
      row[fmt] = (float(np.abs(got - want).max()), size_mib(out, manifest, fmt))
    rows.append(row)
  out = os.path.join(root, f'{name}_routed')
  manifest = export.export_routed(model, variables, out, shape, formats=args.formats,
                                  platforms=('cpu',), verbose=False)
  want, want_index = RoutedPredictor(model, variables, shape).predict(x)
  row = {'model': name, 'what': 'routed bundle',
         'params': sum(p['params'] for p in manifest['programs'].values()),
         'logit_scale': float(np.abs(np.asarray(want)).max()),
         'mix': np.bincount(np.asarray(want_index), minlength=len(space)).tolist()}
  for fmt in args.formats:
    got, index = routed(program_runner(out, fmt), manifest, x)
    same = bool(np.array_equal(index, np.asarray(want_index)))
    row[fmt] = (float(np.abs(got - np.asarray(want)).max()) if same else float('nan'),
                size_mib(out, manifest, fmt))
  rows.append(row)
  for r in rows:
    r['supernet_params'] = manifest['supernet_params']
  return rows


def format_rows(rows: list[dict], formats) -> str:
  head = '| model | exported | parameters | max abs logit | ' + ' | '.join(
      f'{f} max abs error | {f} MiB' for f in formats) + ' |'
  lines = [head, '|' + '---|' * (4 + 2 * len(formats))]
  for r in rows:
    cells = [r['model'], r['what'] + (f' (mix {r["mix"]})' if 'mix' in r else ''),
             f'{r["params"]:,} ({r["params"] / r["supernet_params"]:.0%} of the supernet)',
             f'{r["logit_scale"]:.1f}']
    for f in formats:
      error, mib = r[f]
      cells += [f'{error:.1e}', f'{mib:.2f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def timing_table(args, root: str) -> str:
  """ONNX (onnxruntime) vs jax.export vs the supernet's jitted route, ms per image."""
  if args.config:
    _, model, shape, variables, _ = next(models(args))
  else:
    model = latency.model_for(args.timed_model, args.image_size, num_classes=args.num_classes)
    shape = (args.image_size, args.image_size, 3)
    variables = trained_like(model, shape, 8)
  route = model.routes[args.timed_route]
  out = os.path.join(root, 'timed')
  export.export_route(model, variables, route, out, shape, formats=('jax', 'onnx'),
                      platforms=('cpu',), verbose=False)
  session = onnx_session(os.path.join(out, 'route.onnx'))
  exported = export.load_program(out, 'route')
  supernet = jax.jit(lambda v, x: model.apply(v, x, route=route))
  lines = ['| batch | ONNX Runtime ms/img | jax.export ms/img | supernet route ms/img | '
           'ONNX / jax.export |', '|---|---|---|---|---|']
  for batch in args.timing_batches:
    x = np.random.default_rng(batch).normal(size=(batch, *shape)).astype(np.float32)
    calls = {'onnx': lambda: run_onnx(session, x),
             'jax': lambda: jax.block_until_ready(exported(x)),
             'supernet': lambda: jax.block_until_ready(supernet(variables, x))}
    times = timing.time_calls(calls, rounds=args.rounds, warmup=1)
    ms = {k: float(np.median(v)) * 1e3 / batch for k, v in times.items()}
    lines.append(f'| {batch} | {ms["onnx"]:.2f} | {ms["jax"]:.2f} | {ms["supernet"]:.2f} | '
                 f'{ms["onnx"] / ms["jax"]:.2f} |')
  return (f'{type(model).__name__} route {route.name} at {shape[0]} px, onnxruntime '
          f'{_version("onnxruntime")} vs jax {jax.__version__} on {jax.devices()[0].device_kind}'
          f' ({args.rounds} rounds, round-robin):\n' + '\n'.join(lines))


def _version(package: str) -> str:
  from importlib.metadata import version  # pylint: disable=import-outside-toplevel
  return version(package)


def main(argv=None):
  args = parse_args(argv)
  print(f'# export table, {datetime.date.today()}, jax {jax.__version__}, '
        f'{jax.devices()[0].device_kind}, '
        + (f'{args.config} {args.workdir or "(random weights)"}' if args.config
           else f'{args.image_size} px, {args.num_classes} classes (random weights)')
        + f', errors on {args.images} images')
  with tempfile.TemporaryDirectory() as root:
    rows = []
    for name, model, shape, variables, images in models(args):
      rows += family_rows(name, model, shape, variables, images, args, root)
      print(f'{name}: done', flush=True)
    print(format_rows(rows, args.formats))
    if args.timed_model and args.timing_batches:
      print(timing_table(args, root))


if __name__ == '__main__':
  main()
