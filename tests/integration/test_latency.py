"""Latency tables: measured on the trained tiny workdir, read back by eval.py's report."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from checks import ROOT, tiny_config
from dsnet_jax import complexity, errors, escalation, eval_lib, inference, latency
from dsnet_jax.models import get_model


@pytest.fixture(scope='module')
def measured(trained, tmp_path_factory):
  """A copy of the trained workdir and the latency table of its gated model."""
  workdir = tmp_path_factory.mktemp('latency') / 'run'
  shutil.copytree(trained.workdir, workdir)
  config = tiny_config(num_devices=1)
  loaded, pipeline, _ = eval_lib.restore_workdir(config, str(workdir))
  images = latency.evaluation_images(pipeline, 4)
  predictor = inference.RoutedPredictor(loaded.model, loaded.variables,
                                        pipeline.image_shape, max_batch=4)
  table = latency.measure(predictor, images, routes=[0, 1, 2, 'largest'], batch_sizes=(1, 4),
                          singles=2, rounds=2)
  return workdir, config, loaded.model, predictor, images, table


def test_the_table_times_each_route_and_the_gates_own_mix(measured):
  _, _, model, predictor, images, table = measured
  assert set(table['routes']) == {'0', '1', '2', 'largest'}  # Not '3'.
  for row in [*table['routes'].values(), table['routed']]:
    for timing in row['ms_per_image'].values():
      assert 0 < timing['median'] <= timing['p90']
    assert set(row['ms_per_image']) == {'1', '4'}
  assert table['routes']['largest']['madds'] == complexity.route_complexity(
      model, model.routes.largest, (16, 16, 1)).madds
  # The routed row's mix is what the gate chooses on these images.
  _, chosen = predictor.predict(images)
  space = model.routes.routing_space
  expected = np.bincount(chosen, minlength=len(space)) / len(chosen)
  np.testing.assert_allclose(list(table['routed']['mix'].values()), expected)
  assert table['routed']['forced'] is False
  assert table['routed']['madds'] == pytest.approx(np.dot(expected, model.routing_madds(
      (16, 16, 1))))
  # Every program was timed at every ladder size; a new predictor plans from them unmeasured.
  assert set(table['chunk_costs']) == ({'prefix', 'route/0', 'route/1', 'route/2', 'route/largest'}
                                       | {f'suffix/{r.name}' for r in space})
  costs = latency.chunk_costs(json.loads(json.dumps(table)))
  assert all(sorted(c) == [1, 2, 4] for c in costs.values())
  assert inference.RoutedPredictor(model, predictor.variables, (16, 16, 1), max_batch=4,
                                   chunk_costs=costs).chunk_costs == costs
  text = latency.format_table(table)
  assert '| largest |' in text and 'ms/img @4' in text


def test_escalation_is_timed_beside_the_gate(measured):
  _, _, model, predictor, images, _ = measured
  rule = escalation.Escalation(('0', '2'), (float(np.median(np.asarray(escalation.confidence(
      model.apply(predictor.variables, images, route='0'))))),))
  escalating = inference.RoutedPredictor(model, predictor.variables, (16, 16, 1), max_batch=4,
                                         escalation=rule)
  table = latency.measure(escalating, images, routes=[0, 2], batch_sizes=(1, 4), singles=2,
                          rounds=1)
  row = table[latency.ESCALATED]
  assert set(row['ms_per_image']) == {'1', '4'} and row['chain'] == ['0', '2']
  # Half the images stop at route 0, half pay for route 2's suffix too.
  assert row['stops'] == {'0': 0.5, '2': 0.5}
  costs = escalation.level_costs(model, ('0', '2'), (16, 16, 1))
  assert row['madds'] == pytest.approx(costs.mean())
  # The gate's row is the gate's, not the escalation's.
  _, chosen = escalating.predict(images, escalate=False)
  assert table['routed']['mix'] == pytest.approx(
      {r.name: float(np.mean(chosen == i)) for i, r in enumerate(model.routes.routing_space)})
  assert '| escalated |' in latency.format_table(table)


def test_eval_prints_ms_per_image_beside_madds(measured, capsys):
  workdir, config, *_, table = measured
  latency.save(table, str(workdir / latency.LATENCY_FILE))
  capsys.readouterr()
  report = eval_lib.evaluate_workdir(config, str(workdir))
  printed = capsys.readouterr().out
  rows = {row['route']: row for row in report['routes']}
  assert rows['largest']['ms_per_image'] == {
      b: t['median'] for b, t in table['routes']['largest']['ms_per_image'].items()}
  assert 'ms_per_image' not in rows['3']  # Not timed: no figure made up.
  gated = report['gated']
  total = sum(gated['route_histogram'].values())
  expected = sum(c / total * table['routes'][r]['ms_per_image']['4']['median']
                 for r, c in gated['route_histogram'].items())
  assert gated['ms_per_image']['4'] == pytest.approx(expected)
  assert 'ms/img @4' in printed and 'measured on cpu' in printed
  # A table for another image size is not used.
  other = dict(table, image_shape=[32, 32, 1])
  latency.save(other, str(workdir / latency.LATENCY_FILE))
  report = eval_lib.evaluate_workdir(config, str(workdir))
  assert 'measured for images (32, 32, 1), not (16, 16, 1)' in capsys.readouterr().out
  assert all('ms_per_image' not in row for row in report['routes'])


@pytest.mark.parametrize('args, message', [
    (['--model=ds_mbnet', '--batch_sizes=0'], 'must be positive'),
    (['--model=ds_mbnt'], "unknown model 'ds_mbnt'; available: ds_mbnet"),
    ([], 'give --config (with --workdir'),
    (['--workdir=w'], 'give --config (with --workdir'),
    # More images than the evaluation split holds (64 synthetic), before restoring anything.
    ([f'--config={ROOT}/configs/tiny.py', '--workdir=/nonexistent', '--batch_sizes=128'],
     'error: --batch_sizes up to 128 and --singles=8 need 128 evaluation images; synthetic '
     'test has 64'),
])
def test_cli_refuses_bad_flags_before_any_work(args, message):
  result = subprocess.run([sys.executable, '-m', 'dsnet_jax.tools.latency', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr


def test_speed_benchmark_runs_on_a_tiny_model(capsys):
  """benchmarks/speed.py end to end on 16 px images (so that it cannot rot)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('speed', ROOT / 'benchmarks/speed.py')
  speed = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(speed)
  speed.main(['--models=ds_mbnet', '--image_size=16', '--num_classes=10', '--batch_sizes=1',
              '--rounds=1', '--singles=1'])
  printed = capsys.readouterr().out
  rows = {line.split('|')[1].strip(): line for line in printed.splitlines()
          if line.startswith('| route ') or line.startswith('| routed') or
          line.startswith('| masked')}
  assert set(rows) == {'route largest', 'route 13', 'route 0', 'route 1', 'route 2', 'route 3',
                       'routed', 'masked'}
  assert rows['route largest'].split('|')[3].strip() == '1.00x'  # saving vs itself
  assert 'routing overhead' in printed and '| route/13 |' in printed and '| prefix |' in printed


def test_a_gate_budget_in_milliseconds_on_this_device(trained, tmp_path, capsys):
  """gate.budget_unit='ms': route costs from the workdir's latency table (here a hand-written
  one: 1, 2, 4 ms/image for routes 0, 1, 2 at batch 4); calibrated onto the budget, saved as
  budget_ms, and eval compares it with the gated model's own mix of those times."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained.workdir, workdir)
  shutil.rmtree(workdir / 'checkpoints' / 'gate')
  config = tiny_config(num_devices=1, stages=('gate',), **{
      'gate.budget': 2.5, 'gate.budget_unit': 'ms', 'gate.calibration_examples': 24})
  from dsnet_jax import train_lib
  with pytest.raises(errors.BudgetError, match='needs a latency table at .*latency.json'):
    train_lib.train_and_evaluate(config, str(workdir))
  assert not (workdir / 'checkpoints' / 'gate').exists()
  ms = {'0': 1.0, '1': 2.0, '2': 4.0, '3': 6.0, 'largest': 9.0}
  model = get_model(config.model_name, **config.model)
  table = {'image_shape': [16, 16, 1], 'batch_sizes': [1, 4], 'date': 'today',
           'device': latency.device_description(),
           'routes': {n: {'madds': complexity.route_complexity(model, n, (16, 16, 1)).madds,
                          'ms_per_image': {'1': {'median': 2 * t, 'p90': 2 * t},
                                                         '4': {'median': t, 'p90': t}}}
                      for n, t in ms.items()},
           'routed': {'madds': 1.0, 'ms_per_image': {b: {'median': 1.0, 'p90': 1.0}
                                                     for b in '14'}}}
  latency.save(table, str(workdir / latency.LATENCY_FILE))
  with pytest.raises(errors.BudgetError, match=r'outside what the routing space .* 1-4 ms'):
    train_lib.train_and_evaluate(tiny_config(num_devices=1, stages=('gate',), **{
        'gate.budget': 5.0, 'gate.budget_unit': 'ms'}), str(workdir))
  capsys.readouterr()
  report = train_lib.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  after = float(out.split('argmax cost ')[1].split(' -> ')[1].split(' ms')[0])
  assert abs(after - 2.5) <= 3 / 24  # One held-out image's move between routes, at most.
  gated = report['gated']
  assert gated['budget_ms'] == 2.5
  total = sum(gated['route_histogram'].values())
  achieved = sum(c / total * ms[r] for r, c in gated['route_histogram'].items())
  assert gated['ms_per_image']['4'] == pytest.approx(achieved)
  assert f'budget 2.5 ms/img, achieved {achieved:.4g} ms/img at batch 4' in out


@pytest.mark.parametrize('damage, message', [
    (lambda t: '{"routes": [1, 2', 'is not a latency table: JSONDecodeError'),
    (lambda t: {k: v for k, v in t.items() if k != 'routed'}, 'routed missing'),
    (lambda t: dict(t, model='ds_resnet'), "measured for model 'ds_resnet', not 'ds_mbnet'"),
    (lambda t: dict(t, batch_sizes=[4, 1]), 'batch_sizes [4, 1] not increasing'),
    # Another DS-MBNet (other widths), same image size and route names: its MAdds give it away.
    (lambda t: dict(t, routes={**t['routes'], '1': dict(t['routes']['1'], madds=123456)}),
     "route 1 was 123456 MAdds there, this model's is"),
    (lambda t: dict(t, routes={**t['routes'], '9': t['routes']['1']}),
     'route 9 is not a route of this model'),
    (lambda t: dict(t, routes={'0': {'madds': 1, 'ms_per_image': {
        '1': {'median': float('nan')}, '4': {'median': 1.0}}}}),
     'route 0: ms per image [nan, 1.0] not all positive and finite'),
])
def test_a_damaged_or_foreign_table_is_refused_naming_the_problem(measured, tmp_path, damage,
                                                                 message, capsys):
  workdir, _, model, predictor, _, table = measured
  path = tmp_path / latency.LATENCY_FILE
  damaged = damage(json.loads(json.dumps(table)))
  path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
  with pytest.raises(errors.LatencyTableError, match=re.escape(message)):
    latency.load(str(path), model, (16, 16, 1))
  assert eval_lib.workdir_latency(str(tmp_path), (16, 16, 1), model) is None
  assert message in capsys.readouterr().out  # eval.py warns and shows no ms.
  with pytest.raises(ValueError, match='positive, finite seconds'):
    inference.RoutedPredictor(model, predictor.variables, (16, 16, 1), max_batch=4,
                              chunk_costs={'prefix': {1: float('nan'), 4: 1.0}})
