"""The PyTorch baseline's layer lists (no torch needed) and its script (skipped without torch)."""
import json
import sys

import pytest

from checks import ROOT
from dsnet_jax import complexity
from dsnet_jax.models import ds_mbnet

sys.path.insert(0, str(ROOT / 'benchmarks'))
import route_layers  # noqa: E402

FMNIST = dict(  # configs/ds_mbnet_fmnist.py: one input channel, stride 1 groups, 10 classes.
    num_classes=10, in_channels=1, stem_widths=(16, 24), stem_stride=2,
    group_widths=((24, 32), (32, 48), (48, 64), tuple(range(32, 129, 16)),
                  tuple(range(64, 257, 32))),
    group_depths=(1, 1, 1, 2, 1), group_strides=(1, 1, 2, 1, 2), routing_space=(0, 2, 4, 6))


@pytest.mark.parametrize('kwargs, image, routes', [
    ({}, 224, ('0', '3', 'largest')),
    (FMNIST, 28, ('0', '6', 'largest')),
])
def test_layer_list_madds_equal_the_programs(kwargs, image, routes):
  model = ds_mbnet.Model(**kwargs)
  for route in routes:
    ours = complexity.route_complexity(model, route, (image, image, model.in_channels)).madds
    assert route_layers.layers_madds(route_layers.route_layers(model, route), image) == ours


def test_layer_list_has_no_routing_head():
  layers = route_layers.route_layers(ds_mbnet.Model(), '0')
  assert [l['kind'] for l in layers].count('se') == sum(ds_mbnet.Model().group_depths)
  assert layers[-1] == {'kind': 'linear', 'in': 736, 'out': 1000}


def test_pytorch_baseline_tiny(tmp_path):
  pytest.importorskip('torch')
  import pytorch_baseline
  spec = tmp_path / 'routes.json'
  route_layers.main([f'--out={spec}', '--routes=0,largest', '--image_size=32'])
  out = tmp_path / 'torch.json'
  result = pytorch_baseline.main([f'--spec={spec}', '--batches=1,2', '--rounds=2', '--warmup=1',
                                  '--singles=2', '--threads=1', f'--json={out}'])
  assert json.loads(out.read_text()) == result
  assert [(r['route'], r['batch']) for r in result['rows']] == [
      ('0', 1), ('0', 2), ('largest', 1), ('largest', 2)]
  routes = json.loads(spec.read_text())['routes']
  for route in routes:
    assert result['madds'][route['name']]['total'] == route['madds']
    assert result['madds'][route['name']]['params'] == route['params']
  for row in result['rows']:
    assert len(row['rounds_ms']) == 2 and row['ms_per_img_median'] > 0

  routes[0]['madds'] += 1  # A network that is not ours must not be timed.
  spec.write_text(json.dumps(dict(json.loads(spec.read_text()), routes=routes)))
  with pytest.raises(SystemExit, match='not the same architecture'):
    pytorch_baseline.main([f'--spec={spec}', '--batches=1', '--rounds=1'])
