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


def test_pytorch_training_step_trains_the_draws_the_jax_step_trains(tmp_path):
  """`--train`: the spec carries Stage I's sandwich draws (those of train_step.py's steps, from
  (seed, step)); the torch step trains exactly those routes and counts their FLOPs."""
  import pytorch_baseline
  import torch
  from dsnet_jax import routes as routes_lib
  spec = tmp_path / 'routes.json'
  route_layers.main([f'--out={spec}', '--routes=largest', '--image_size=32',
                     '--sandwich_draws=2', '--seed=3'])
  written = json.loads(spec.read_text())
  table = ds_mbnet.Model().routes
  expected = [[r.name for r in routes_lib.sandwich_routes(table, 3, step, 2)] for step in (0, 1)]
  assert written['sandwich'] == expected
  assert {r['name'] for r in written['routes']} == {n for draw in expected for n in draw}

  result = pytorch_baseline.main([f'--spec={spec}', '--train', '--train_batch=2', '--rounds=2',
                                  '--warmup=1', '--threads=1', '--profile'])
  assert result['draws'] == expected
  madds = {r['name']: r['madds'] for r in written['routes']}
  sandwich, plain = result['rows']
  draw_flops = [2 * 2 * (madds['largest'] + 3 * sum(madds[n] for n in d)) for d in expected]
  assert sandwich['gflop'] == pytest.approx(sum(draw_flops) / 2 / 1e9)
  assert plain['gflop'] == pytest.approx(6 * 2 * madds['largest'] / 1e9)
  assert all(len(r['rounds_ms']) == 2 and r['ms_median'] > 0 for r in result['rows'])
  assert 'convolution_backward' in result['profile']

  # One step: only the drawn networks change, and the teacher moves (1 - decay) toward 'largest'.
  models = {n: pytorch_baseline.build_route(r['layers']).train()
            for n, r in ((r['name'], r) for r in written['routes'])}
  teacher = pytorch_baseline.build_route(written['routes'][0]['layers']).eval()
  before = {n: [p.detach().clone() for p in m.parameters()] for n, m in models.items()}
  start = [p.detach().clone() for p in teacher.parameters()]
  optimizer = torch.optim.SGD([p for m in models.values() for p in m.parameters()], lr=0.1)
  images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
  pytorch_baseline.sandwich_step(models, teacher, optimizer, images, labels, ['largest', '0'],
                                 ema_decay=0.9)
  changed = {n for n, m in models.items()
             if any(not torch.equal(p, q) for p, q in zip(m.parameters(), before[n]))}
  assert changed == {'largest', '0'}
  for t, s, p in zip(teacher.parameters(), models['largest'].parameters(), start):
    torch.testing.assert_close(t, p + 0.1 * (s - p))


def test_a_config_gives_its_model_and_image_size(tmp_path):
  spec = tmp_path / 'demo.json'
  route_layers.main([f'--out={spec}', '--config=configs/ds_mbnet_fmnist.py', '--routes=largest'])
  written = json.loads(spec.read_text())
  assert (written['image_size'], written['in_channels'], written['num_classes']) == (28, 1, 10)
  (largest,) = written['routes']
  model = ds_mbnet.Model(**FMNIST)
  assert largest['madds'] == complexity.route_complexity(model, 'largest', (28, 28, 1)).madds
