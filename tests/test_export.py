"""Export of one route: sliced and BN-folded params, logits equal to the supernet's route."""
import importlib.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsnet_jax import bn_calibration, checkpointing, export, stand_in
from dsnet_jax.models import ds_mbnet, get_model

IMAGE = (32, 32, 3)


def images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *IMAGE)).astype(np.float32)


@pytest.fixture(scope='module')
def setup():
  model = ds_mbnet.Model(num_classes=10)
  variables = stand_in.random_variables(model, IMAGE)
  # Real activation statistics, so that a wrong BN row or fold shows in the logits.
  variables = bn_calibration.calibrate_to_batch(model, variables, images(8), [2, 'largest'])
  return model, variables


def route_logits(model, variables, route, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, route=route))(variables, x))


def exact_static_logits(config, variables, model, route, x):
  """The static net's math in float64, folded in float64: the reference both float32 nets
  (supernet route, static export) are measured against."""
  with jax.enable_x64(True):
    variables64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    params64, _ = export.static_route(model, variables64, route)
    config64 = {**config, 'dtype': 'float64'}
    return np.asarray(jax.jit(lambda p, x: export.static_forward(config64, p, x))(
        params64, x.astype(np.float64)))


@pytest.mark.parametrize('route', [2, 'largest'])
def test_export_equals_supernet_route(setup, tmp_path, route):
  model, variables = setup
  x = images(8)
  exported = export.export_route(model, variables, route, str(tmp_path), IMAGE)
  widths = model.routes[route].widths

  params = exported.params
  assert params['stem']['kernel'].shape == (3, 3, 3, widths[0])
  assert params['block_0']['dw']['kernel'].shape == (3, 3, 1, widths[0])
  assert params['classifier']['kernel'].shape == (widths[-1], 10)
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert names == {'kernel', 'bias'}  # No BatchNorm left: folded into the convs.
  count = sum(p.size for p in jax.tree.leaves(params))
  assert count == exported.config['params'] < exported.config['supernet_params']

  supernet = route_logits(model, variables, route, x)
  static = np.asarray(exported.forward_python(x))
  exact = exact_static_logits(exported.config, variables, model, route, x)
  scale = np.abs(exact).max()

  def error(logits, n=8):
    return float(np.abs(np.asarray(logits) - exact[:n]).max() / scale)
  print(f'route {route}, error of the logit scale against the float64 value: supernet '
        f'{error(supernet):.1e}, static {error(static):.1e}, |static - supernet| '
        f'{np.abs(static - supernet).max() / scale:.1e}')
  # Same math as the supernet's route (a wrong slice, row or fold would be O(1) off), and
  # float32-exact like it: each is about 1e-5 of the logit scale off the float64 value here
  # (15 layers whose BN statistics come from 8 images amplify rounding).
  assert error(supernet) < 5e-5
  assert error(static) < 5e-5
  np.testing.assert_allclose(static, supernet, rtol=1e-4, atol=5e-5 * scale)

  # The serialized jax.export artifact, alone: any batch size, the same logits.
  pytest.importorskip('flatbuffers', reason='jax.export serialization needs flatbuffers')
  loaded = export.load_exported(str(tmp_path))
  assert loaded.config['route'] == model.routes[route].name
  assert loaded.exported.platforms == ('cpu', 'cuda')
  for n in (8, 3, 1):
    assert error(loaded(x[:n]), n) < 5e-5
  assert error(loaded.forward_python(x[:2]), 2) < 5e-5


@pytest.mark.slow
def test_cli_exports_a_route_of_a_training_workdir_in_the_configs_dtype(tmp_path):
  pytest.importorskip('flatbuffers', reason='jax.export serialization needs flatbuffers')
  root = pathlib.Path(__file__).parents[1]
  config = _load_config(root / 'configs/tiny.py')
  model = get_model(config.model_name, **config.model)
  image_shape = (16, 16, 1)
  variables = stand_in.random_variables(model, image_shape, seed=3)
  workdir = tmp_path / 'work'
  with checkpointing.Checkpointer(workdir / 'checkpoints' / 'recalibrate') as ckpt:
    ckpt.save(2, variables, {'stage': 'recalibrate'})
  out = tmp_path / 'route1'
  subprocess.run([sys.executable, '-m', 'dsnet_jax.export', f'--config={root}/configs/tiny.py',
                  '--config.model.dtype=bfloat16', f'--workdir={workdir}', '--route=1',
                  f'--out={out}', '--platforms=cpu'], check=True, cwd=root)
  loaded = export.load_exported(str(out))
  assert loaded.config['dtype'] == 'bfloat16'
  x = jax.random.normal(jax.random.key(0), (3, *image_shape))
  supernet = np.asarray(model.apply(variables, x, route=1))  # float32
  logits = loaded(x)  # float32 images in, float32 logits out, bfloat16 inside.
  assert logits.dtype == np.float32
  # Within bfloat16's rounding of the float32 route: 2^-5 of the logit scale is eight 2^-8
  # roundings of the largest logit (a wrong slice or fold is off by O(1) of it).
  scale = np.abs(supernet).max()
  print(f'|bfloat16 export - float32 route| = {np.abs(logits - supernet).max() / scale:.2e} of '
        'the logit scale')
  np.testing.assert_allclose(logits, supernet, rtol=0, atol=2.0 ** -5 * scale)

  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  again = subprocess.run([sys.executable, '-m', 'dsnet_jax.export',
                          f'--config={root}/configs/tiny.py', f'--workdir={workdir}', '--route=2',
                          f'--out={out}', '--platforms=cpu'], cwd=root, capture_output=True,
                         text=True)
  assert again.returncode != 0 and 'is not empty; pass --overwrite' in again.stderr
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def _load_config(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_unknown_route_and_model(setup, tmp_path):
  model, variables = setup
  with pytest.raises(KeyError, match='unknown route 14'):
    export.export_route(model, variables, 14, str(tmp_path), IMAGE)

  class Other(ds_mbnet.DSMBNet):
    pass
  with pytest.raises(NotImplementedError, match='no static exporter for Other'):
    export.static_route(Other(num_classes=10), variables, 2)
