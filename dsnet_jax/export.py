"""Deployment: one route, or the whole routed model, as programs that run without dsnet_jax.

Each program is the model's own forward, specialised to the trained variables
(`dsnet_jax.specialize`): prefix slices of the weights, the route's BatchNorm statistics folded
into its convs (kernel * s and a bias), no gate where none runs, no masks, no per-width
statistics. One mechanism serves DS-MBNet, DS-ResNet and DS-ViT. An export directory holds:

  manifest.json       what it is (kind 'route' or 'routed'), the model, the input (shape,
                      layout NHWC, float32, preprocessing constants), its routes (name, widths,
                      MAdds, routing index), the calibrated routing offsets, and per program its
                      files, inputs, outputs and parameter count.
  <program>.npz       the program's parameters, a flat dict name -> array: pass them as
                      loaded, `exported.call(dict(np.load(f)), images)`.
  <program>.jaxexport a serialized `jax.export` (CPU and CUDA, batch dimension symbolic), taking
                      (params, inputs); needs jax only.
  <program>.onnx      ONNX with the parameters inside (format 'onnx', `pip install .[export]`),
                      batch dimension dynamic; runs in onnxruntime.

Programs: a route export has 'route' (images -> logits). The routed bundle has 'prefix'
(images -> hidden, routing_index: the gate's argmax after the calibrated offsets) and
'suffix_<i>' for each routing index i (hidden -> logits): run the prefix, group the images by
routing index, run each group's suffix, scatter back (the README's reference router).

    python -m dsnet_jax.export --config=C --workdir=DIR --route=1 --out=OUT [--format=jax,onnx]
    python -m dsnet_jax.export --config=C --workdir=DIR --routed --out=OUT
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax.layers.linear import depthwise_implementation
from dsnet_jax.specialize import StaticProgram, specialize

MANIFEST = 'manifest.json'
FORMATS = ('jax', 'onnx')
FORMAT_VERSION = 1


class ExportError(ValueError):
  """What was asked of an export cannot be done (a format, the flags)."""


class ExportDependencyError(ImportError):
  """ONNX export asked for without the `export` extra installed."""


def route_program(model, variables, route, image_shape: Sequence[int],
                  batch_size: int | None = None) -> StaticProgram:
  """`route`'s forward, images (batch, H, W, C) float32 -> logits, as a StaticProgram."""
  route = model.routes[route]
  return _specialize(lambda v, x: model.apply(v, x, route=route), variables,
                     _images_spec(image_shape, batch_size))


def prefix_program(model, variables, image_shape: Sequence[int],
                   batch_size: int | None = None) -> StaticProgram:
  """images -> (hidden, routing_index int32): the shared prefix, the gate, its calibrated
  offsets and the argmax over the routing space."""
  def prefix(v, x):
    hidden, routing_logits = model.apply_prefix(v, x)
    return hidden, jnp.argmax(routing_logits, axis=-1).astype(jnp.int32)
  return _specialize(prefix, variables, _images_spec(image_shape, batch_size))


def suffix_program(model, variables, route, hidden_spec) -> StaticProgram:
  """hidden -> logits of `route` (the prefix's hidden features, any batch)."""
  route = model.routes[route]
  return _specialize(lambda v, h: model.apply_suffix(v, h, route), variables, hidden_spec)


def export_route(model, variables, route, out_dir: str, image_shape: Sequence[int], *,
                 formats: Sequence[str] = ('jax',), platforms: Sequence[str] = ('cpu', 'cuda'),
                 batch_size: int | None = None, preprocessing: Mapping[str, Any] | None = None,
                 overwrite: bool = False, verbose: bool = True) -> dict:
  """Writes `route` (a name, an index or a Route) as a standalone static model; returns the
  manifest.

  Raises:
    FileExistsError: `out_dir` is a file, or a non-empty directory and not `overwrite`.
    ExportDependencyError: 'onnx' in `formats` without jax2onnx installed.
    ExportError: an unknown format.
  """
  formats = check_formats(formats)
  check_output_dir(out_dir, overwrite)
  route = model.routes[route]
  program = route_program(model, variables, route, image_shape, batch_size)
  manifest = _manifest('route', model, variables, image_shape, preprocessing, [route])
  _prepare(out_dir)
  manifest['programs'] = {'route': _write(program, out_dir, 'route', formats, platforms,
                                          ['images'], ['logits'])}
  _write_manifest(out_dir, manifest)
  if verbose:
    print(describe(manifest, out_dir))
  return manifest


def export_routed(model, variables, out_dir: str, image_shape: Sequence[int], *,
                  formats: Sequence[str] = ('jax',), platforms: Sequence[str] = ('cpu', 'cuda'),
                  batch_size: int | None = None, preprocessing: Mapping[str, Any] | None = None,
                  overwrite: bool = False, verbose: bool = True) -> dict:
  """Writes the routed model as a bundle (prefix + one suffix per routing index, see the
  module doc); returns the manifest. Raises as `export_route`."""
  formats = check_formats(formats)
  check_output_dir(out_dir, overwrite)
  space = model.routes.routing_space
  prefix = prefix_program(model, variables, image_shape, batch_size)
  manifest = _manifest('routed', model, variables, image_shape, preprocessing, space)
  _prepare(out_dir)
  programs = {'prefix': _write(prefix, out_dir, 'prefix', formats, platforms, ['images'],
                               ['hidden', 'routing_index'])}
  hidden_spec = jax.eval_shape(lambda x: model.apply_prefix(variables, x)[0],
                               prefix.input_specs[0])
  for i, route in enumerate(space):
    program = suffix_program(model, variables, route, hidden_spec)
    programs[f'suffix_{i}'] = _write(program, out_dir, f'suffix_{i}', formats, platforms,
                                     ['hidden'], ['logits'])
  manifest['programs'] = programs
  _write_manifest(out_dir, manifest)
  if verbose:
    print(describe(manifest, out_dir))
  return manifest


def describe(manifest: dict, out_dir: str) -> str:
  """What an export wrote: programs, parameters, MAdds, files."""
  lines = [f'{manifest["kind"]} export of {manifest["model"]} '
           f'({", ".join(manifest["formats"])}, computes in {manifest["dtype"]}) -> {out_dir}']
  for name, program in manifest['programs'].items():
    sizes = ', '.join(f'{f} {os.path.getsize(os.path.join(out_dir, f)) / 2**20:.2f} MiB'
                      for f in program['files'].values())
    lines.append(f'  {name}: {program["params"]:,} parameters; {sizes}')
  for route in manifest['routes']:
    lines.append(f'  route {route["name"]} (routing index {route["routing_index"]}): widths '
                 f'{route["widths"]}, {route["madds"] / 1e6:.4g} MMAdds per image'
                 + (f' ({route["madds_with_gate"] / 1e6:.4g} with the gate)'
                    if manifest['kind'] == 'routed' else ''))
  lines.append(f'  the supernet: {manifest["supernet_params"]:,} parameters')
  return '\n'.join(lines)


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
  """('jax', 'onnx') subset, in that order. Raises ExportError on an unknown one and
  ExportDependencyError for 'onnx' without jax2onnx."""
  if isinstance(formats, str):
    formats = [f for f in formats.split(',') if f]
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ExportError(f'unknown export format {", ".join(unknown) or "(none)"}; valid: '
                     f'{", ".join(FORMATS)}')
  if 'onnx' in formats:
    _jax2onnx()
  return tuple(f for f in FORMATS if f in formats)


def check_output_dir(out_dir: str, overwrite: bool) -> None:
  """Raises FileExistsError unless `out_dir` is missing, empty, or may be overwritten."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'--out {out_dir} is a file, not a directory')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f'--out {out_dir} is not empty; pass --overwrite to replace what it '
                          'holds')


def _remove_previous_export(out_dir: str) -> None:
  """Deletes the files a previous export's manifest lists, so none of them outlives it (a
  bundle's suffixes under a route export). Files of anyone else stay."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    return
  for program in load_manifest(out_dir).get('programs', {}).values():
    for name in program.get('files', {}).values():
      if os.path.isfile(os.path.join(out_dir, os.path.basename(name))):
        os.remove(os.path.join(out_dir, os.path.basename(name)))
  os.remove(path)


def load_manifest(out_dir: str) -> dict:
  with open(os.path.join(out_dir, MANIFEST)) as f:
    return json.load(f)


def load_program(out_dir: str, name: str):
  """A program of an export directory as a function of its inputs (the jax.export artifact
  called on its saved parameters)."""
  files = load_manifest(out_dir)['programs'][name]['files']
  with open(os.path.join(out_dir, files['jax']), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(out_dir, files['params'])) as data:
    params = dict(data)
  return lambda *inputs: exported.call(params, *inputs)


# --- internals ----------------------------------------------------------------------------------

def _prepare(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  _remove_previous_export(out_dir)


def _specialize(fn, variables, *specs) -> StaticProgram:
  # Depthwise convs are traced as convs, so that BatchNorm folds into their kernels; the
  # program picks taps on CPU when it is lowered.
  with depthwise_implementation('conv'):
    return specialize(fn, variables, *specs)


def _images_spec(image_shape, batch_size):
  batch = jax.export.symbolic_shape('batch')[0] if batch_size is None else int(batch_size)
  return jax.ShapeDtypeStruct((batch, *(int(d) for d in image_shape)), jnp.float32)


def _write(program: StaticProgram, out_dir: str, name: str, formats, platforms,
           input_names: list[str], output_names: list[str]) -> dict:
  files = {'params': f'{name}.npz'}
  np.savez(os.path.join(out_dir, files['params']), **program.params)
  if 'jax' in formats:
    files['jax'] = f'{name}.jaxexport'
    with open(os.path.join(out_dir, files['jax']), 'wb') as f:
      f.write(program.export(platforms).serialize())
  if 'onnx' in formats:
    files['onnx'] = f'{name}.onnx'
    _to_onnx(program, os.path.join(out_dir, files['onnx']), name, input_names, output_names)
  specs = [{'name': n, 'shape': [d if isinstance(d, int) else None for d in s.shape],
            'dtype': jnp.dtype(s.dtype).name} for n, s in zip(input_names, program.input_specs)]
  return {'files': files, 'inputs': specs, 'outputs': output_names,
          'params': program.num_params,
          'params_bytes': int(sum(p.nbytes for p in program.params.values()))}


def _jax2onnx():
  try:
    import jax2onnx  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ExportDependencyError(
        "ONNX export needs jax2onnx: pip install '.[export]' (jax2onnx, onnxruntime)") from e
  return jax2onnx


def _to_onnx(program: StaticProgram, path: str, name: str, input_names, output_names):
  to_onnx = _jax2onnx().to_onnx
  with _quiet():
    to_onnx(lambda *inputs: program(program.params, *inputs, onnx=True),
            inputs=list(program.input_specs), input_names=input_names,
            output_names=output_names, model_name=name, return_mode='file', output_path=path)


@contextlib.contextmanager
def _quiet():
  """The converter's INFO lines, its serializer's WARNINGs (unknown value types of shape
  tensors) and jax2onnx 0.12's debug prints are noise to a user: errors only while it runs."""
  previous = logging.root.manager.disable
  logging.disable(logging.WARNING)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logging.disable(previous)


def _manifest(kind, model, variables, image_shape, preprocessing, routes) -> dict:
  from dsnet_jax.complexity import route_complexity  # complexity traces models.
  image_shape = [int(d) for d in image_shape]
  space = [r.name for r in model.routes.routing_space]
  entries = []
  for route in routes:
    entry = {'name': route.name, 'widths': _jsonable(route.widths),
             'routing_index': space.index(route.name) if route.name in space else None,
             'madds': int(route_complexity(model, route, tuple(image_shape)).madds)}
    if kind == 'routed':
      entry['madds_with_gate'] = int(route_complexity(model, route, tuple(image_shape),
                                                      with_gate=True).madds)
    entries.append(entry)
  offsets = variables.get('routing', {}).get('offsets')
  return {
      'format_version': FORMAT_VERSION, 'kind': kind, 'model': type(model).__name__,
      'dtype': jnp.dtype(getattr(model, 'dtype', None) or jnp.float32).name,
      'input': {'name': 'images', 'shape': [None, *image_shape], 'layout': 'NHWC',
                'dtype': 'float32', 'preprocessing': dict(preprocessing or {})},
      'num_classes': int(model.num_classes),
      'routes': entries,
      'routing_offsets': None if offsets is None else np.asarray(offsets).tolist(),
      'supernet_params': int(sum(np.size(p) for p in jax.tree.leaves(variables['params']))),
  }


def _write_manifest(out_dir: str, manifest: dict) -> None:
  manifest['formats'] = sorted({f for p in manifest['programs'].values() for f in p['files']}
                               - {'params'}, key=FORMATS.index)
  with open(os.path.join(out_dir, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1)


def _jsonable(value):
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return int(value) if isinstance(value, (int, np.integer)) else value


def main(argv):
  """`python -m dsnet_jax.export --config=C (--workdir=DIR | --checkpoint=CKPT)
  (--route=R | --routed) --out=OUT [--format=jax,onnx] [--overwrite]`."""
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  from dsnet_jax import cli, rundir  # pylint: disable=import-outside-toplevel
  from dsnet_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from dsnet_jax.models import get_model  # pylint: disable=import-outside-toplevel
  cli.quiet_library_logs()
  f = flags.FLAGS
  if (f.route is None) == (not f.routed):
    raise ExportError('pass exactly one of --route=R (one route) and --routed (the bundle)')
  if bool(f.workdir) == bool(f.checkpoint):
    raise ExportError('pass exactly one of --workdir and --checkpoint')
  formats = check_formats(f.format)
  check_output_dir(f.out, f.overwrite)
  config = f.config
  model = get_model(config.model_name, **config.model)
  preprocess = input_pipeline.preprocessing(config.data)
  image_shape = preprocess.image_shape
  directory = f.checkpoint or rundir.RunDir(f.workdir).latest_stage_dir()
  restored = rundir.restore_variables(directory, model, image_shape, config=config)
  print(f'restored {restored.describe()}')
  kwargs = dict(formats=formats, platforms=f.platforms, batch_size=f.batch_size,
                preprocessing=input_pipeline.describe_preprocessing(preprocess),
                overwrite=f.overwrite)
  if f.routed:
    export_routed(restored.model, restored.variables, f.out, image_shape, **kwargs)
  else:
    export_route(restored.model, restored.variables, f.route, f.out, image_shape, **kwargs)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'The config the checkpoint was trained with.')
  flags.DEFINE_string('workdir', '', 'Training workdir: exports its latest stage checkpoint.')
  flags.DEFINE_string('checkpoint', '', 'A stage checkpoint directory instead of --workdir.')
  flags.DEFINE_string('route', None, "One route to export: 0, 1, ..., 'largest'.")
  flags.DEFINE_bool('routed', False, 'Export the routed model: prefix + one suffix per route.')
  flags.DEFINE_list('format', ['jax'], 'jax (jax.export), onnx (needs .[export]), or both.')
  flags.DEFINE_string('out', None, 'Output directory (must not exist or be empty).')
  flags.DEFINE_bool('overwrite', False, 'Replace what a non-empty --out holds.')
  flags.DEFINE_integer('batch_size', None, 'Export for this batch size only (default: any).')
  flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'Platforms to lower the jax.export for.')
  flags.mark_flags_as_required(['config', 'out'])
  from dsnet_jax import cli
  app.run(cli.main_errors(main, ExportError, ExportDependencyError))
