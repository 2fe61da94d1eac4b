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
  <program>.onnx      ONNX (format 'onnx', `pip install .[export]`), batch dimension dynamic;
                      runs in onnxruntime. Its weights are inside, or (tensors over 1 MB) in
                      <program>.onnx.data beside it, which onnxruntime reads from there.

Programs: a route export has 'route' (images -> logits). The routed bundle has 'prefix'
(images -> hidden, routing_index: the gate's argmax after the calibrated offsets) and
'suffix_<i>' for each routing index i (hidden -> logits): run the prefix, group the images by
routing index, run each group's suffix, scatter back (the README's reference router).

    python -m dsnet_jax.tools.export --config=C --workdir=DIR --route=1 --out=OUT \
        [--format=jax,onnx]
    python -m dsnet_jax.tools.export --config=C --workdir=DIR --routed --out=OUT
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax import escalation as escalation_lib
from dsnet_jax import paths
from dsnet_jax.complexity import route_complexity
from dsnet_jax.errors import ConfigError, ExportDependencyError, ExportError
from dsnet_jax.layers.linear import depthwise_implementation
from dsnet_jax.progress import say
from dsnet_jax.specialize import StaticProgram, specialize

MANIFEST = 'manifest.json'
FORMATS = ('jax', 'onnx')
# What loading each format needs, without dsnet_jax (the manifest's `requires`): jax
# deserialises with flatbuffers, which it does not install; a jax.export artifact loads in the
# jax that wrote it or a later one.
REQUIRES = {'jax': (f'jax>={jax.__version__}', 'flatbuffers', 'numpy'),
            'onnx': ('onnxruntime', 'numpy')}
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
FORMAT_VERSION = 1


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

  Raises (before any work):
    UnknownRouteError: `route` is not one of the model's.
    FileExistsError: `out_dir` is a file, or a non-empty directory and not `overwrite`.
    ExportError: an unknown format or platform, a batch size < 1, preprocessing that is not
      JSON, an `out_dir` holding a manifest that is not an export's.
    ExportDependencyError: 'onnx' in `formats` without jax2onnx installed.
  """
  route = model.routes[route]
  request = Request.check(formats, platforms, batch_size, preprocessing, out_dir, overwrite)
  _check_onnx_dtype(model, request)
  manifest = _manifest('route', model, variables, image_shape, request, [route])
  with _staged(out_dir) as staging:
    program = route_program(model, variables, route, image_shape, batch_size)
    manifest['programs'] = {'route': _write(program, staging, 'route', request, ['images'],
                                            ['logits'])}
    _write_manifest(staging, manifest)
  if verbose:
    say(describe(manifest, out_dir))
  return manifest


def export_routed(model, variables, out_dir: str, image_shape: Sequence[int], *,
                  formats: Sequence[str] = ('jax',), platforms: Sequence[str] = ('cpu', 'cuda'),
                  batch_size: int | None = None, preprocessing: Mapping[str, Any] | None = None,
                  overwrite: bool = False, verbose: bool = True,
                  escalation: escalation_lib.Escalation | None = None) -> dict:
  """Writes the routed model as a bundle (prefix + one suffix per routing index, see the
  module doc); returns the manifest. `batch_size` fixes the prefix's batch only: a suffix
  runs on the images routed to it, any number. With `escalation`, the manifest's
  'escalation' ({'chain': routing indices, 'thresholds', 'confidence', 'level_madds'}) says
  how to route instead of the prefix's routing index. Raises as `export_route`."""
  request = Request.check(formats, platforms, batch_size, preprocessing, out_dir, overwrite)
  _check_onnx_dtype(model, request)
  space = model.routes.routing_space
  manifest = _manifest('routed', model, variables, image_shape, request, space)
  if escalation is not None:
    names = [r.name for r in space]
    manifest['escalation'] = {
        'chain': [names.index(r) for r in escalation.chain],
        'thresholds': list(escalation.thresholds), 'confidence': escalation.confidence,
        'level_madds': escalation_lib.level_costs(model, escalation.chain,
                                                  image_shape).tolist()}
  with _staged(out_dir) as staging:
    prefix = prefix_program(model, variables, image_shape, batch_size)
    programs = {'prefix': _write(prefix, staging, 'prefix', request, ['images'],
                                 ['hidden', 'routing_index'])}
    hidden_spec = jax.eval_shape(lambda x: model.apply_prefix(variables, x)[0],
                                 _images_spec(image_shape, None))
    for i, route in enumerate(space):
      program = suffix_program(model, variables, route, hidden_spec)
      programs[f'suffix_{i}'] = _write(program, staging, f'suffix_{i}', request, ['hidden'],
                                       ['logits'])
    manifest['programs'] = programs
    _write_manifest(staging, manifest)
  if verbose:
    say(describe(manifest, out_dir))
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
    routed = manifest['kind'] == 'routed'
    lines.append(f'  route {route["name"]}'
                 + (f' (routing index {route["routing_index"]})' if routed else '')
                 + f': widths {route["widths"]}, {route["madds"] / 1e6:.4g} MMAdds per image'
                 + (f' ({route["madds_with_gate"] / 1e6:.4g} with the gate)' if routed else ''))
  lines.append(f'  the supernet: {manifest["supernet_params"]:,} parameters')
  return '\n'.join(lines)


def _check_onnx_dtype(model, request: Request) -> None:
  """ONNX of a bfloat16 model would fail onnx.checker and onnxruntime (bfloat16 Einsum)."""
  dtype = jnp.dtype(getattr(model, 'dtype', None) or jnp.float32)
  if 'onnx' in request.formats and dtype != jnp.float32:
    raise ExportError(f'ONNX export of a model that computes in {dtype.name}: onnxruntime does '
                      'not run its ops (Einsum) in that dtype. Export --format=jax, or export '
                      'the same checkpoint with --config.model.dtype=float32 (its variables are '
                      'float32 either way)')


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
  """('jax', 'onnx') subset, in that order. Raises ExportError on an unknown one and
  ExportDependencyError for 'onnx' without jax2onnx."""
  if isinstance(formats, str):
    formats = formats.split(',')
  formats = [f.strip() for f in formats if f.strip()]
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ExportError(f'unknown export format {", ".join(unknown) or "(none)"}; valid: '
                     f'{", ".join(FORMATS)}')
  if 'onnx' in formats:
    _jax2onnx()
  return tuple(f for f in FORMATS if f in formats)


def check_platforms(platforms: Sequence[str] | str) -> tuple[str, ...]:
  """The platforms a jax.export is lowered for, checked. Raises ExportError."""
  if isinstance(platforms, str):
    platforms = platforms.split(',')
  platforms = tuple(dict.fromkeys(p.strip().lower() for p in platforms if p.strip()))
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ExportError(f'unknown platform {", ".join(unknown) or "(none)"}; valid: '
                      f'{", ".join(PLATFORMS)}')
  return platforms


def check_output_dir(out_dir: str, overwrite: bool) -> None:
  """Raises FileExistsError unless `out_dir` is missing, empty, or may be overwritten, and
  ExportError where it cannot be a directory or holds a manifest that is not an export's."""
  if not out_dir:
    raise ExportError('--out is empty: name the directory to write')
  try:
    paths.check_output(out_dir, 'dir', '--out')
  except ConfigError as e:
    raise ExportError(str(e)) from None
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f'--out {out_dir} is not empty; pass --overwrite to replace what it '
                            'holds')
    _previous_files(out_dir)  # Raises now, not after the work, on a foreign manifest.


def _previous_files(out_dir: str) -> list[str]:
  """The files a previous export in `out_dir` wrote (its manifest's), [] where there is none.
  Raises ExportError on a manifest.json that is not an export's."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return []
  try:
    manifest = load_manifest(out_dir)
    files = [os.path.basename(f) for p in manifest['programs'].values()
             for f in p['files'].values()]
    if 'format_version' not in manifest or not all(isinstance(f, str) for f in files):
      raise ValueError('not written by dsnet_jax.export')
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ExportError(f'{path} is not the manifest of an export ({type(e).__name__}: {e}); '
                      'remove it or choose another --out') from e
  return [MANIFEST, *files]


def load_manifest(out_dir: str) -> dict:
  with open(os.path.join(out_dir, MANIFEST)) as f:
    return json.load(f)


def load_program(out_dir: str, name: str):
  """A program of an export directory as a function of its inputs (the jax.export artifact
  called on its saved parameters).

  Raises:
    FileNotFoundError: a file is missing.
    ExportError: no such program, no jax.export of it, or a file that cannot be read.
  """
  programs = load_manifest(out_dir)['programs']
  if name not in programs:
    raise ExportError(f'{out_dir} has no program {name!r}; it has {", ".join(programs)}')
  files = programs[name]['files']
  if 'jax' not in files:
    raise ExportError(f'{out_dir} holds {name} as {", ".join(sorted(set(files) & set(FORMATS)))} '
                      'only; export it with --format=jax to load it in JAX')
  path = os.path.join(out_dir, files['jax'])
  with open(path, 'rb') as f:
    serialized = bytearray(f.read())
  try:
    exported = jax.export.deserialize(serialized)
  except Exception as e:  # flatbuffers raises struct.error, IndexError, ... on damage.
    raise ExportError(f'{path} is not a readable jax.export artifact (truncated or corrupt: '
                      f'{type(e).__name__})') from e
  path = os.path.join(out_dir, files['params'])
  if not os.path.exists(path):
    raise FileNotFoundError(f'no parameters file {path}')
  try:
    with np.load(path, allow_pickle=False) as data:
      params = jax.device_put(dict(data))  # Once, not at every call.
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ExportError(f'{path} is not a readable .npz of parameters (truncated or corrupt)'
                      ) from e
  call = jax.jit(exported.call)  # Cached per input shape: `exported.call` alone re-traces.
  return lambda *inputs: call(params, *inputs)


# --- internals ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Request:
  """An export's options, checked before any work."""
  formats: tuple[str, ...]
  platforms: tuple[str, ...]
  batch_size: int | None
  preprocessing: dict

  @classmethod
  def check(cls, formats, platforms, batch_size, preprocessing, out_dir, overwrite) -> Request:
    formats = check_formats(formats)
    platforms = check_platforms(platforms)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
        batch_size, (int, np.integer)) or batch_size < 1):
      raise ExportError(f'batch size {batch_size!r} is not an integer >= 1 (None: any)')
    try:
      preprocessing = json.loads(json.dumps(dict(preprocessing or {}), default=_to_json))
    except (TypeError, ValueError) as e:
      raise ExportError(f'preprocessing must be JSON data (numbers, strings, lists): {e}') from e
    check_output_dir(out_dir, overwrite)
    return cls(formats, platforms, None if batch_size is None else int(batch_size),
               preprocessing)


@contextlib.contextmanager
def _staged(out_dir: str):
  """A hidden directory beside `out_dir` to write into; on success the previous export's
  files leave `out_dir` and the new ones move in, so an interrupted export changes nothing."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out_dir))}.',
                             dir=parent)
  try:
    yield staging
    os.makedirs(out_dir, exist_ok=True)
    for name in _previous_files(out_dir):
      if os.path.isfile(os.path.join(out_dir, name)):
        os.remove(os.path.join(out_dir, name))
    for name in sorted(os.listdir(staging), key=lambda n: n == MANIFEST):  # Manifest last.
      os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _to_json(value):
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} {value!r} is not JSON')


def _specialize(fn, variables, *specs) -> StaticProgram:
  # Depthwise convs are traced as convs, so that BatchNorm folds into their kernels; the
  # program picks taps on CPU when it is lowered.
  with depthwise_implementation('conv'):
    return specialize(fn, variables, *specs)


def _images_spec(image_shape, batch_size):
  batch = jax.export.symbolic_shape('batch')[0] if batch_size is None else int(batch_size)
  return jax.ShapeDtypeStruct((batch, *(int(d) for d in image_shape)), jnp.float32)


def _write(program: StaticProgram, out_dir: str, name: str, request: Request,
           input_names: list[str], output_names: list[str]) -> dict:
  files = {'params': f'{name}.npz'}
  np.savez(os.path.join(out_dir, files['params']), **program.params)
  if 'jax' in request.formats:
    files['jax'] = f'{name}.jaxexport'
    with open(os.path.join(out_dir, files['jax']), 'wb') as f:
      f.write(program.export(request.platforms).serialize())
  if 'onnx' in request.formats:
    files['onnx'] = f'{name}.onnx'
    _to_onnx(program, os.path.join(out_dir, files['onnx']), name, input_names, output_names)
    if os.path.exists(os.path.join(out_dir, f'{name}.onnx.data')):
      files['onnx_data'] = f'{name}.onnx.data'  # Weights over 1 MB, read from beside the .onnx.
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


def _manifest(kind, model, variables, image_shape, request: Request, routes) -> dict:
  image_shape = [int(d) for d in image_shape]
  space = [r.name for r in model.routes.routing_space]
  entries = []
  for route in routes:
    entry = {'name': route.name, 'widths': json.loads(json.dumps(route.widths, default=_to_json)),
             'madds': int(route_complexity(model, route, tuple(image_shape)).madds)}
    if kind == 'routed':
      entry['routing_index'] = space.index(route.name)
      entry['madds_with_gate'] = int(route_complexity(model, route, tuple(image_shape),
                                                      with_gate=True).madds)
    entries.append(entry)
  offsets = variables.get('routing', {}).get('offsets')
  return {
      'format_version': FORMAT_VERSION, 'kind': kind, 'model': type(model).__name__,
      'dtype': jnp.dtype(getattr(model, 'dtype', None) or jnp.float32).name,
      'input': {'name': 'images', 'shape': [request.batch_size, *image_shape], 'layout': 'NHWC',
                'dtype': 'float32', 'preprocessing': request.preprocessing},
      'num_classes': int(model.num_classes),
      'platforms': list(request.platforms),
      'routes': entries,
      **({'routing_offsets': None if offsets is None else np.asarray(offsets).tolist()}
         if kind == 'routed' else {}),
      'supernet_params': int(sum(np.size(p) for p in jax.tree.leaves(variables['params']))),
  }


def _write_manifest(out_dir: str, manifest: dict) -> None:
  manifest['formats'] = sorted({f for p in manifest['programs'].values() for f in p['files']}
                               & set(FORMATS), key=FORMATS.index)
  manifest['requires'] = {f: list(REQUIRES[f]) for f in manifest['formats']}
  with open(os.path.join(out_dir, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1)
