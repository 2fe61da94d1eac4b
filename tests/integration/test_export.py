"""Export of every family: a route or the routed bundle, as jax.export and ONNX, loaded without
dsnet_jax; logits against the supernet's own."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checks import ROOT, tiny_config
from dsnet_jax import bn_calibration, errors, escalation, export, stand_in
from dsnet_jax.inference import RoutedPredictor
from dsnet_jax.models import ds_mbnet, ds_resnet, ds_vit, get_model

IMAGE = (16, 16, 1)
HAS_ONNX = importlib.util.find_spec('jax2onnx') is not None and importlib.util.find_spec(
    'onnxruntime') is not None
FORMATS = ('jax', 'onnx') if HAS_ONNX else ('jax',)
# The bound on |exported - supernet| logits, float32.
MAX_ERROR = 1e-4

FAMILIES = {
    'ds_mbnet': lambda: get_model('ds_mbnet', **tiny_config().model),
    'ds_resnet': lambda: ds_resnet.Model(
        num_classes=4, in_channels=1, stem_features=8, group_inner_features=(4, 8, 8, 16),
        group_depths=(1, 1, 1, 1), gate_group=2, prefix_ratio=0.5,
        route_ratios=(0.5, 0.75, 1.0), channel_multiple=2, routing_space=(0, 1, 2)),
    'ds_vit': lambda: ds_vit.Model(
        variant=None, width=24, depth=4, num_heads=3, mlp_dim=48, patch_size=4, image_size=16,
        in_channels=1, num_classes=4, group_depths=(1, 1, 1, 1),
        level_fractions=(1 / 3, 2 / 3, 1.0), routing_space=(0, 2, 4, 6)),
}


def images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *IMAGE)).astype(np.float32)


def trained_like(model, spread_routes=True):
  """Random weights, BatchNorm statistics of real activations (a wrong row or fold shows in
  the logits), and routing offsets that spread a batch over the routing space."""
  variables = stand_in.random_variables(model, IMAGE)
  if variables.get('batch_stats'):
    variables = bn_calibration.calibrate_to_batch(model, variables, images(64, seed=1),
                                                  model.routes.names)
  if spread_routes:
    _, logits = jax.jit(model.apply_prefix)(variables, images(64, seed=2))
    # Offsets that make each route the argmax for some images: minus each route's median.
    offsets = -np.median(np.asarray(logits), axis=0)
    variables = {**variables, 'routing': {'offsets': jnp.asarray(offsets, jnp.float32)}}
  return variables


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family(request):
  model = FAMILIES[request.param]()
  return request.param, model, trained_like(model)


def supernet_logits(model, variables, route, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, route=route))(variables, x))


def onnx_run(path, *inputs):
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  names = [i.name for i in session.get_inputs()]
  return session.run(None, dict(zip(names, inputs)))


def test_every_family_exports_a_middle_route_equal_to_the_supernet(family, tmp_path):
  name, model, variables = family
  route = model.routes.routing_space[1]
  x = images(5)
  manifest = export.export_route(model, variables, route, str(tmp_path), IMAGE, formats=FORMATS,
                                 platforms=('cpu',), verbose=False)
  want = supernet_logits(model, variables, route, x)
  program = manifest['programs']['route']
  files = {p.name for p in tmp_path.iterdir()}
  assert files == {'manifest.json', *program['files'].values()}
  assert manifest['routes'][0]['name'] == route.name
  assert manifest['routes'][0]['widths'] == json.loads(json.dumps(route.widths))
  assert 0 < program['params'] < manifest['supernet_params']
  with np.load(tmp_path / 'route.npz') as saved:  # Nothing of BatchNorm or routing is left.
    assert not any(re.search(r'(^|/|_)bn\d?/|(^|/)(mean|var)$|routing', k)
                   for k in saved.files), saved.files
    assert sum(saved[k].size for k in saved.files) == program['params']
  got = np.asarray(export.load_program(str(tmp_path), 'route')(x))
  error = np.abs(got - want).max()
  print(f'{name} route {route.name}: |jax.export - supernet| = {error:.1e}, logits up to '
        f'{np.abs(want).max():.1f}')
  assert error <= MAX_ERROR
  if HAS_ONNX:
    (onnx_logits,) = onnx_run(tmp_path / 'route.onnx', x)
    assert np.abs(onnx_logits - want).max() <= MAX_ERROR


@pytest.mark.skipif(not HAS_ONNX, reason="needs the export extra: pip install '.[export]'")
def test_onnx_weights_over_1mb_ship_beside_the_model(tmp_path):
  """jax2onnx writes tensors over 1 MB to <program>.onnx.data: the manifest lists it (so
  --overwrite removes it too) and onnxruntime reads it from beside the .onnx."""
  model = FAMILIES['ds_vit']().clone(num_classes=12_000)  # A 24 x 12000 float32 head: 1.1 MB.
  variables = trained_like(model, spread_routes=False)
  manifest = export.export_route(model, variables, 'largest', str(tmp_path / 'big'), IMAGE,
                                 formats=('onnx',), verbose=False)
  files = manifest['programs']['route']['files']
  assert files == {'params': 'route.npz', 'onnx': 'route.onnx', 'onnx_data': 'route.onnx.data'}
  assert (tmp_path / 'big' / 'route.onnx.data').stat().st_size > 2**20
  x = images(2)
  (logits,) = onnx_run(tmp_path / 'big' / 'route.onnx', x)
  want = supernet_logits(model, variables, 'largest', x)
  assert np.abs(logits - want).max() <= MAX_ERROR


def test_routed_bundle_reproduces_the_routed_predictor(family, tmp_path):
  name, model, variables = family
  x = images(24, seed=3)
  manifest = export.export_routed(model, variables, str(tmp_path), IMAGE, formats=FORMATS,
                                  platforms=('cpu',), verbose=False)
  assert list(manifest['programs']) == ['prefix'] + [
      f'suffix_{i}' for i in range(len(model.routes.routing_space))]
  np.testing.assert_allclose(manifest['routing_offsets'],
                             np.asarray(variables['routing']['offsets']), rtol=1e-6)
  want, want_index = RoutedPredictor(model, variables, IMAGE).predict(x)
  assert len(set(np.asarray(want_index).tolist())) >= 2, 'a mix of routes, or nothing is tested'
  hidden, index = export.load_program(str(tmp_path), 'prefix')(x)
  np.testing.assert_array_equal(index, want_index)  # The offsets are in the prefix.
  for i in range(len(model.routes.routing_space)):
    rows = np.flatnonzero(np.asarray(index) == i)
    if rows.size:
      got = export.load_program(str(tmp_path), f'suffix_{i}')(np.asarray(hidden)[rows])
      assert np.abs(np.asarray(got) - np.asarray(want)[rows]).max() <= MAX_ERROR, (name, i)


def readme_block(marker: str) -> str:
  text = (ROOT / 'README.md').read_text()
  match = re.search(rf'<!-- {marker} -->\n```python\n(.*?)```', text, re.S)
  assert match, f'README has no python block after <!-- {marker} -->'
  return match.group(1)


def test_readme_router_runs_the_bundle_without_dsnet_jax(tmp_path):
  """The README's reference router, in a Python that cannot import dsnet_jax, reproduces
  RoutedPredictor.predict from the jax.export files and (with .[export]) the ONNX files."""
  model = FAMILIES['ds_mbnet']()
  variables = trained_like(model)
  x = images(32, seed=4)
  export.export_routed(model, variables, str(tmp_path / 'routed'), IMAGE, formats=FORMATS,
                       platforms=('cpu',), verbose=False)
  export.export_route(model, variables, 'largest', str(tmp_path / 'largest'), IMAGE,
                      formats=FORMATS, platforms=('cpu',), verbose=False)
  logits, index = RoutedPredictor(model, variables, IMAGE).predict(x)
  # An escalation bundle: thresholds at the median confidence, so both levels decide images.
  space = [r.name for r in model.routes.routing_space]
  chain = (space[0], space[-1])
  first = escalation.confidence(model.apply(variables, x, route=chain[0]))
  rule = escalation.Escalation(chain, (float(np.median(first)),))
  export.export_routed(model, variables, str(tmp_path / 'escalated'), IMAGE, formats=FORMATS,
                       platforms=('cpu',), verbose=False, escalation=rule)
  escalated, escalated_index = RoutedPredictor(model, variables, IMAGE,
                                               escalation=rule).predict(x)
  assert sorted(set(escalated_index.tolist())) == [0, len(space) - 1]
  np.save(tmp_path / 'images.npy', x)
  script = tmp_path / 'deploy.py'
  script.write_text(
      'import sys\nsys.modules["dsnet_jax"] = None  # The deployment has no dsnet_jax.\n'
      + readme_block('reference-router')
      + f'\nimages = np.load("images.npy")\nformats = {list(FORMATS)!r}\n'
      'loaders = {"jax": jax_program, "onnx": onnx_program}\n'
      'results = {}\n'
      'for f in formats:\n'
      '  results[f"logits_{f}"], results[f"index_{f}"] = predict("routed", images, loaders[f])\n'
      '  results[f"largest_{f}"] = np.asarray(loaders[f]("largest", "route")(images))\n'
      '  results[f"escalated_{f}"], results[f"escalated_index_{f}"] = predict(\n'
      '      "escalated", images, loaders[f])\n'
      'import shutil\n'  # A manifest that lost a route: refused, not zeros for its images.
      'shutil.copytree("routed", "damaged")\n'
      'manifest = json.load(open("damaged/manifest.json"))\n'
      'manifest["routes"].pop()\n'
      'json.dump(manifest, open("damaged/manifest.json", "w"))\n'
      'try:\n'
      '  predict("damaged", images)\n'
      'except ValueError as e:\n'
      '  results["damaged"] = np.array(str(e))\n'
      'np.savez("results.npz", **results)\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, check=True)
  check = subprocess.run([sys.executable, '-c', 'import dsnet_jax'], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
  assert check.returncode == 0, 'the check above means something only if dsnet_jax is installed'
  results = np.load(tmp_path / 'results.npz')
  largest = supernet_logits(model, variables, 'largest', x)
  for f in FORMATS:
    np.testing.assert_array_equal(results[f'index_{f}'], index)
    assert np.abs(results[f'logits_{f}'] - np.asarray(logits)).max() <= MAX_ERROR, f
    assert np.abs(results[f'largest_{f}'] - largest).max() <= MAX_ERROR, f
    np.testing.assert_array_equal(results[f'escalated_index_{f}'], escalated_index)
    assert np.abs(results[f'escalated_{f}'] - np.asarray(escalated)).max() <= MAX_ERROR, f
  assert 'routes and suffix programs differ in number' in str(results['damaged'])


@pytest.mark.slow
@pytest.mark.parametrize('fmt', FORMATS)
def test_each_format_runs_in_an_empty_venv_with_only_what_the_manifest_requires(tmp_path, fmt):
  model = FAMILIES['ds_mbnet']()
  variables = trained_like(model)
  x = images(8, seed=5)
  manifest = export.export_routed(model, variables, str(tmp_path / 'routed'), IMAGE,
                                  formats=(fmt,), platforms=('cpu',), verbose=False)
  requires = manifest['requires'][fmt]
  assert requires == list(export.REQUIRES[fmt])
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check',
                  *requires], check=True)
  np.save(tmp_path / 'images.npy', x)
  (tmp_path / 'deploy.py').write_text(
      readme_block('reference-router') +
      f'\nlogits, index = predict("routed", np.load("images.npy"), {fmt}_program)\n'
      'np.savez("results.npz", logits=logits, index=index)\n'
      'import importlib.util\n'
      'print("installed:", sorted(m for m in ("jax", "onnxruntime", "dsnet_jax", "flax") '
      'if importlib.util.find_spec(m)))\n')
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  done = subprocess.run([python, 'deploy.py'], cwd=tmp_path, env=env, capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith(f"installed: {['jax'] if fmt == 'jax' else ['onnxruntime']}")
  results = np.load(tmp_path / 'results.npz')
  logits, index = RoutedPredictor(model, variables, IMAGE).predict(x)
  np.testing.assert_array_equal(results['index'], index)
  assert np.abs(results['logits'] - np.asarray(logits)).max() <= MAX_ERROR


def test_bfloat16_route_exports_in_bfloat16(tmp_path):
  model = get_model('ds_mbnet', **{**tiny_config().model, 'dtype': 'bfloat16'})
  variables = trained_like(model, spread_routes=False)
  manifest = export.export_route(model, variables, 1, str(tmp_path), IMAGE, platforms=('cpu',),
                                 verbose=False)
  assert manifest['dtype'] == 'bfloat16'
  x = images(3)
  logits = np.asarray(export.load_program(str(tmp_path), 'route')(x))
  assert logits.dtype == np.float32  # float32 images in and logits out, bfloat16 inside.
  float32 = get_model('ds_mbnet', **tiny_config().model)
  want = supernet_logits(float32, variables, 1, x)
  bfloat16 = supernet_logits(model, variables, 1, x)
  # Within bfloat16's rounding of the float32 route, as the bfloat16 supernet is (2.3e-2 of the
  # logit scale here; the export rounds at other points: folded kernels, its bias adds): 2^-4
  # is sixteen 2^-8 roundings of the largest logit; a wrong slice or fold is off by O(1) of it.
  scale = np.abs(want).max()
  print(f'of the logit scale, |bfloat16 export - float32 route| = '
        f'{np.abs(logits - want).max() / scale:.2e}, |bfloat16 supernet - float32 route| = '
        f'{np.abs(bfloat16 - want).max() / scale:.2e}')
  np.testing.assert_allclose(logits, want, rtol=0, atol=2.0 ** -4 * scale)
  # ONNX of it is refused before anything is written (onnx.checker rejected its bfloat16
  # Einsum, onnxruntime would not load it).
  with pytest.raises(errors.ExportError, match='ONNX export of a model that computes in bfloat16'):
    export.export_routed(model, variables, str(tmp_path / 'onnx'), IMAGE, formats=('onnx',),
                         platforms=('cpu',), verbose=False)
  assert not (tmp_path / 'onnx').exists()


def test_bad_requests_fail_before_writing(tmp_path, monkeypatch):
  model = ds_mbnet.Model(**tiny_config().model)
  variables = stand_in.random_variables(model, IMAGE)
  out = tmp_path / 'out'
  with pytest.raises(KeyError, match='unknown route 14'):
    export.export_route(model, variables, 14, str(out), IMAGE)
  with pytest.raises(errors.ExportError, match='unknown export format tflite'):
    export.export_route(model, variables, 1, str(out), IMAGE, formats=('jax', 'tflite'))
  with pytest.raises(errors.ExportError, match='unknown platform garbage; valid: cpu, cuda'):
    export.export_route(model, variables, 1, str(out), IMAGE, platforms='cpu,garbage')
  for bad in (0, -3, 2.7, True):
    with pytest.raises(errors.ExportError, match='is not an integer >= 1'):
      export.export_route(model, variables, 1, str(out), IMAGE, batch_size=bad)
  with pytest.raises(errors.ExportError, match='preprocessing must be JSON'):
    export.export_route(model, variables, 1, str(out), IMAGE, preprocessing={'f': object()})
  with pytest.raises(errors.ExportError, match='--out is empty'):
    export.export_route(model, variables, 1, '', IMAGE)
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(errors.ExportError, match='is a file'):
    export.export_route(model, variables, 1, str(tmp_path / 'a_file' / 'sub'), IMAGE)
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # As without the export extra.
  with pytest.raises(errors.ExportDependencyError, match=r"pip install '\.\[export\]'"):
    export.export_routed(model, variables, str(out), IMAGE, formats=('onnx',))
  assert not out.exists() and os.listdir(tmp_path) == ['a_file']
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='is not empty; pass --overwrite'):
    export.export_route(model, variables, 1, str(out), IMAGE)
  (out / 'manifest.json').write_text('{"not": "an export"')  # Someone else's, and damaged.
  with pytest.raises(errors.ExportError, match='is not the manifest of an export'):
    export.export_route(model, variables, 1, str(out), IMAGE, overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ['keep.txt', 'manifest.json']


def test_overwrite_replaces_the_previous_export_whole_and_only_on_success(tmp_path, monkeypatch):
  model = ds_mbnet.Model(**tiny_config().model)
  variables = trained_like(model)
  out = tmp_path / 'out'
  export.export_routed(model, variables, str(out), IMAGE, platforms='cpu', verbose=False,
                       preprocessing={'mean': np.float32([0.5])})  # NumPy values become JSON.
  (out / 'notes.txt').write_text('mine')
  bundle = sorted(p.name for p in out.iterdir())
  assert export.load_manifest(str(out))['input']['preprocessing'] == {'mean': [0.5]}

  def fail(*args, **kwargs):
    raise KeyboardInterrupt  # An export stopped halfway changes nothing.
  with monkeypatch.context() as patch:
    patch.setattr(export, '_write_manifest', fail)
    with pytest.raises(KeyboardInterrupt):
      export.export_route(model, variables, 1, str(out), IMAGE, platforms='cpu', overwrite=True,
                          verbose=False)
  assert sorted(p.name for p in out.iterdir()) == bundle
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # No staging left behind.

  export.export_route(model, variables, 1, str(out), IMAGE, platforms='cpu', overwrite=True,
                      verbose=False)
  assert sorted(p.name for p in out.iterdir()) == [
      'manifest.json', 'notes.txt', 'route.jaxexport', 'route.npz']
  manifest = export.load_manifest(str(out))
  assert manifest['kind'] == 'route' and 'routing_offsets' not in manifest


def test_loading_a_damaged_export_says_what_is_wrong(tmp_path):
  model = ds_mbnet.Model(**tiny_config().model)
  variables = stand_in.random_variables(model, IMAGE)
  out = str(tmp_path / 'r')
  export.export_route(model, variables, 1, out, IMAGE, platforms='cpu', verbose=False)
  with pytest.raises(errors.ExportError, match="has no program 'prefix'; it has route"):
    export.load_program(out, 'prefix')
  data = (tmp_path / 'r' / 'route.jaxexport').read_bytes()
  (tmp_path / 'r' / 'route.jaxexport').write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.ExportError, match='not a readable jax.export artifact'):
    export.load_program(out, 'route')
  (tmp_path / 'r' / 'route.jaxexport').write_bytes(data)
  (tmp_path / 'r' / 'route.npz').write_bytes(b'PK\x03\x04 damaged')
  with pytest.raises(errors.ExportError, match='not a readable .npz'):
    export.load_program(out, 'route')
  manifest = export.load_manifest(out)
  del manifest['programs']['route']['files']['jax']
  (tmp_path / 'r' / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(errors.ExportError, match='only; export it with --format=jax'):
    export.load_program(out, 'route')


@pytest.mark.slow
def test_cli_exports_a_trained_workdir(trained, tmp_path):
  """--route and --routed from a training workdir (jax.export: ONNX is tested above); a
  non-empty --out is refused unless --overwrite; no library log lines, a report of what was
  written; --routed refuses a checkpoint without a trained gate."""
  out = tmp_path / 'routed'
  command = [sys.executable, '-m', 'dsnet_jax.tools.export', f'--config={ROOT}/configs/tiny.py',
             f'--workdir={trained.workdir}', '--platforms=cpu', '--format=jax']
  done = subprocess.run([*command, '--routed', f'--out={out}'], cwd=ROOT, capture_output=True,
                        text=True, check=True)
  print(done.stdout, done.stderr)
  assert not re.search(r'^[IW]\d{4}|INFO|WARNING', done.stderr, re.M), done.stderr
  assert re.search(r'prefix: [\d,]+ parameters', done.stdout)
  assert re.search(r'route 0 \(routing index 0\).*MMAdds per image', done.stdout)
  manifest = export.load_manifest(str(out))
  assert manifest['kind'] == 'routed' and manifest['formats'] == ['jax']
  assert manifest['input']['preprocessing']['mean'] == [0.5]

  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  again = subprocess.run([*command, '--route=1', f'--out={out}'], cwd=ROOT,
                         capture_output=True, text=True)
  assert again.returncode == 1 and 'is not empty; pass --overwrite' in again.stderr
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
  both = subprocess.run([*command, '--route=1', '--routed', f'--out={out}'], cwd=ROOT,
                        capture_output=True, text=True)
  assert both.returncode == 1 and 'exactly one of --route=R' in both.stderr
  ungated = subprocess.run(
      [*command[:4], f'--checkpoint={trained.workdir}/checkpoints/supernet', '--routed',
       f'--out={tmp_path / "ungated"}'], cwd=ROOT, capture_output=True, text=True)
  assert ungated.returncode == 1 and 'holds no trained gate' in ungated.stderr, ungated.stderr
  assert not (tmp_path / 'ungated').exists()
  subprocess.run([*command, '--route=1', f'--out={out}', '--overwrite'], cwd=ROOT,
                 capture_output=True, check=True)
  assert export.load_manifest(str(out))['kind'] == 'route'
  assert not list(out.glob('suffix_*')), 'the replaced bundle left files behind'
