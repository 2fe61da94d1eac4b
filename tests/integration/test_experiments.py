"""The reproduction study's scripts on the tiny config (2 steps per run), so that they
cannot rot: each trains what its table needs, writes its section of RESULTS.md from the run
records, and a second call trains nothing and writes the same text."""
import json
import re
import sys

import pytest

from checks import ROOT

sys.path.insert(0, str(ROOT / 'experiments'))

import from_trained  # noqa: E402  pylint: disable=wrong-import-position
import ablations  # noqa: E402  pylint: disable=wrong-import-position
import gated_vs_static  # noqa: E402  pylint: disable=wrong-import-position
import speed  # noqa: E402  pylint: disable=wrong-import-position
import study  # noqa: E402  pylint: disable=wrong-import-position
import supernet_vs_independent  # noqa: E402  pylint: disable=wrong-import-position
import which_router  # noqa: E402  pylint: disable=wrong-import-position

from dsnet_jax import routers, rundir  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture
def one_device(monkeypatch):
  """The study's runs on one device (the suite has 8 fake ones): quicker compiles."""
  configured = study.configured
  monkeypatch.setattr(study, 'configured',
                      lambda path, **overrides: configured(path, num_devices=1, **overrides))


@pytest.mark.slow
def test_the_study_scripts_on_the_tiny_config(tmp_path, monkeypatch, one_device):
  root, runs, results = str(tmp_path / 'w'), tmp_path / 'runs', tmp_path / 'RESULTS.md'
  # Three of the four Stage I variants (MvCo has its own test in test_train.py), and the long
  # run as long as the others (the same record): fewer runs, the same code.
  monkeypatch.setattr(ablations, 'VARIANTS',
                      {k: ablations.VARIANTS[k] for k in ('IB', 'labels', 'IEB')})
  tables = [
      lambda: supernet_vs_independent.study_table(['tiny'], 2, 1, [0], root, runs, results),
      lambda: gated_vs_static.study_table('tiny', 2, [0.5], [0], root, runs, results),
      lambda: ablations.study_table(['tiny'], 2, [0], 'tiny', 0.5, [0], root, runs, results),
      lambda: speed.study_table('tiny', 2, 0.5, 4, 1, root, runs, results)]
  texts = [make() for make in tables]
  records = {p.stem: json.loads(p.read_text()) for p in runs.glob('*.json')}
  assert set(records) == {
      'tiny_supernet_s2_seed0', 'tiny_alone0_s2_seed0', 'tiny_alone2_s2_seed0',
      'tiny_alonelargest_s2_seed0', 'tiny_gate_s2_b0.5_seed0', 'tiny_supernet_labels_s2_seed0',
      'tiny_supernet_IEB_s2_seed0', 'tiny_gate_nosgs_s2_b0.5_seed0',
      'speed_tiny_gate_s2_b0.5_seed0_batch4_rounds1'}
  alone = records['tiny_alone2_s2_seed0']
  assert '--config.supernet.train_route=2' in alone['command'] and alone['gated'] is None
  row = study.route_row(records['tiny_supernet_s2_seed0'], '2')
  assert (f'| 2 | {row["madds"] / 1e6:.3f} | {100 * row["accuracy"]:.2f} | '
          f'{100 * study.route_row(alone, "2")["accuracy"]:.2f} |') in texts[0]
  gate = records['tiny_gate_s2_b0.5_seed0']['gated']
  assert f'| 0.5 | 1 | {gate["madds"] / 1e6:.3f} | {100 * gate["accuracy"]:.2f} |' in texts[1]
  assert '| labels | 1 |' in texts[2] and '| IEB | 1 |' in texts[2]
  assert '| no SGS: task CE + budget | 1 |' in texts[2]
  assert '| routed (gate) |' in texts[3]
  written = results.read_text()
  assert all(line in written for t in texts for line in t.splitlines())
  largest = [study.route_row(records[f'tiny_{name}_s2_seed0'], 'largest')['accuracy']
              for name in ('supernet', 'alonelargest')]
  series = written.split('<!-- supernet-vs-independent-tiny-convergence -->')[1].split(
      '<!-- /supernet-vs-independent-tiny-convergence -->')[0]  # Its own section.
  sup, alone, gap = (f'{100 * largest[0]:.2f}', f'{100 * largest[1]:.2f}',
                     f'{100 * (largest[0] - largest[1]):+.2f}')
  assert f'| 2 | 0 | {sup} | {alone} | {gap} | {alone} | {gap} |' in series  # long_factor 1.
  assert supernet_vs_independent.convergence('tiny', 2, runs).splitlines()[2:] == [
      f'| 2 | 0 | {sup} | {alone} | {gap} | not run |  |']  # No 4-step run.
  assert all(f'<!-- {section}-tiny-s2 -->' in written  # Per model and step count.
             for section in ('supernet-vs-independent', 'gated-vs-static', 'ablations',
                             'ablations-sgs', 'speed'))
  assert (tmp_path / 'supernet_vs_independent_tiny_s2.png').stat().st_size > 1000

  monkeypatch.setattr(study.train_lib, 'train_and_evaluate', None)  # Nothing trains again.
  assert [make() for make in tables] == texts
  assert results.read_text() == written

  # A record that describes another run, or is not a record, is refused by name.
  path = runs / 'tiny_alone0_s2_seed0.json'
  path.write_text(json.dumps({**records['tiny_alone0_s2_seed0'],
                              'overrides': {'supernet.steps': 3}}))
  with pytest.raises(study.StudyError, match=r'tiny_alone0_s2_seed0.json records another run '
                     r"\(overrides \{'supernet.steps': 3\}, expected"):
    tables[0]()
  path.write_text('{"name": ')
  with pytest.raises(study.StudyError, match='tiny_alone0_s2_seed0.json is not a run record'):
    tables[0]()
  assert results.read_text() == written


@pytest.mark.slow
def test_the_from_trained_table_on_the_tiny_config(tmp_path, one_device):
  root, runs, results = str(tmp_path / 'w'), tmp_path / 'runs', tmp_path / 'RESULTS.md'
  # A route trained alone for the total steps (2 + 2), as table 1 would have recorded it.
  runs.mkdir()
  alone = {'name': 'tiny_alonelargest_s4_seed0', 'routes': [
      {'route': 'largest', 'accuracy': 0.25, 'madds': 1.0}]}
  (runs / 'tiny_alonelargest_s4_seed0.json').write_text(json.dumps(alone))
  text = from_trained.study_table(['tiny'], 2, 2, 0.5, [2], [0], root, runs, results)
  tuned = json.loads((runs / 'tiny_fromtrained_b2_s2_lr0.5_seed0.json').read_text())
  base = f'{root}/tiny_base_largest_s2_seed0/checkpoints/supernet'
  assert tuned['overrides']['init_checkpoint'] == base
  assert tuned['overrides']['supernet.optimizer.lr'] == pytest.approx(
      0.5 * study.configured('configs/tiny.py').supernet.optimizer.lr)
  stage = rundir.RunDir(f'{root}/tiny_fromtrained_b2_s2_lr0.5_seed0').status('supernet')
  assert stage.meta['source'] == {'init_checkpoint': base, 'step': 2}
  largest = study.route_row(tuned, 'largest')['accuracy']
  row = next(line for line in text.splitlines() if line.startswith('| largest |'))
  assert row.endswith(f'| not run | not run | not run | 25.00 | {100 * (largest - 0.25):+.2f} |')
  assert '<!-- from-trained-tiny-b2-s2 -->' in results.read_text()
  assert from_trained.study_table(['tiny'], 2, 2, 0.5, [2], [0], root, runs, results) == text


@pytest.mark.slow
def test_the_router_table_on_the_tiny_config(tmp_path, monkeypatch, one_device):
  root, runs, results = str(tmp_path / 'w'), tmp_path / 'runs', tmp_path / 'RESULTS.md'
  text = which_router.study_table('tiny', 2, [0.5], [0], 16, root, runs, results)
  record = json.loads((runs / 'tiny_routers_s2_seed0.json').read_text())
  supernet = json.loads((runs / 'tiny_supernet_routers_s2_seed0.json').read_text())
  assert (runs / 'tiny_gate_routers_s2_b0.5_seed0.json').exists()
  rows = supernet['routes']
  largest = study.route_row(supernet, 'largest')
  assert record['largest_accuracy'] == largest['accuracy']
  madds = {r['route']: r['madds'] for r in rows}
  for label, chain in (('2 levels', ['0', '2']), ('3 levels', ['0', '1', '2']),
                       ('auto', ['auto'])):
    measured = record['escalation'][label]
    assert measured['chain'] == chain
    for budget, point in measured['budgets'].items():
      chain = point['chain']  # The chain itself, or the one 'auto' chose at this budget.
      assert label == 'auto' or point['chain'] == measured['chain']
      # Spent between "all stop at the first route" and "all run every suffix" (hand count:
      # each level adds its route's suffix, never less than that route alone).
      assert madds[chain[0]] - 1 <= point['madds'] <= sum(madds[r] for r in chain)
      assert point['static_accuracy'] == pytest.approx(
          routers.static_accuracy_at(rows, point['madds']))
      assert sum(point['stops'].values()) == 64  # The synthetic test split.
  two = record['escalation']['2 levels']['budgets']['0.5']
  gate = json.loads((runs / 'tiny_gate_routers_s2_b0.5_seed0.json').read_text())['gated']
  assert (f'| 0.5 | {gate["madds"] / 1e6:.3f} / {two["madds"] / 1e6:.3f} / ') in text
  assert f'| {100 * gate["accuracy"]:.2f} | {100 * two["accuracy"]:.2f} |' in text
  assert f"'largest': {100 * largest['accuracy']:.2f} %" in text
  assert '<!-- routers-tiny-s2 -->' in results.read_text()
  reach = which_router.lowest_reaching(record['escalation']['2 levels']['budgets'],
                                       largest['accuracy'])
  assert reach == 'none' or record['escalation']['2 levels']['budgets'][reach]['accuracy'] >= (
      largest['accuracy'])

  monkeypatch.setattr(study.train_lib, 'train_and_evaluate', None)  # Nothing trains again.
  assert which_router.study_table('tiny', 2, [0.5], [0], 16, root, runs, results) == text
  with pytest.raises(study.StudyError, match='records another measurement'):
    which_router.study_table('tiny', 2, [0.4], [0], 16, root, runs, results)


def test_the_convergence_series_lists_every_saved_supernet(tmp_path):
  def record(name, accuracy):  # Only what the series reads.
    (tmp_path / f'{name}.json').write_text(json.dumps(
        {'routes': [{'route': '0', 'accuracy': 0.1}, {'route': 'largest', 'accuracy': accuracy}]}))

  for name, accuracy in [('m_supernet_s1000_seed1', 0.55), ('m_supernet_s300_seed0', 0.60),
                         ('m_supernet_s1000_seed0', 0.70), ('m_supernet_sX_s300_seed0', 0.5),
                         ('m_alonelargest_s300_seed0', 0.65), ('m_alonelargest_s900_seed0', 0.71),
                         ('m_alonelargest_s1000_seed1', 0.5325), ('n_supernet_s300_seed0', 0.9)]:
    record(name, accuracy)
  assert supernet_vs_independent.convergence('m', 3, str(tmp_path)).splitlines()[2:] == [
      '| 300 | 0 | 60.00 | 65.00 | -5.00 | 71.00 | -11.00 |',  # By step count, then seed.
      '| 1000 | 0 | 70.00 | not run |  | not run |  |',
      '| 1000 | 1 | 55.00 | 53.25 | +1.75 | not run |  |']


@pytest.mark.parametrize('flags, error', [
    (dict(models=['ds_mbnet', 'resnet']), "unknown model 'resnet'; known: ds_mbnet, ds_vit"),
    (dict(seeds={'seeds': []}), '--seeds=: give one or more distinct values'),
    (dict(seeds={'gate_seeds': ['0', '0']}), '--gate_seeds=0,0: give one or more distinct'),
    (dict(seeds={'seeds': ['a']}), '--seeds=a: not ints'),
    (dict(budgets={'budgets': ['0.4', '1.5']}), "--budgets=0.4,1.5: each a fraction of 'largest'"),
    (dict(budgets={'budget': [0.0]}), '--budget=0.0: each a fraction'),
    (dict(steps=0), '--steps=0: must be a positive integer'),
    (dict(long_factor=-1), '--long_factor=-1: must be a positive integer'),
    (dict(results='/nonexistent/folder/RESULTS.md'), 'its folder does not exist'),
])
def test_bad_study_flags_are_refused_before_any_run(flags, error):
  with pytest.raises(study.StudyError, match=re.escape(error)):
    study.check_flags(**flags)
  study.check_flags(models=['ds_mbnet'], seeds={'seeds': ['0', '1']}, budgets={'b': ['0.3', '1']},
                    steps=1, results=str(ROOT / 'experiments' / 'RESULTS.md'))


def test_a_budget_the_routing_space_cannot_spend_is_refused_before_any_run():
  # DS-ViT's routes 0-6 spend 1.025-4.061 M MAdds: 0.55 of 'largest' (7.934 M) is 4.364 M.
  with pytest.raises(study.StudyError, match=re.escape('ds_vit: gate.budget=0.55 (largest) is '
                                                       '4.364 M MAdds per image, outside')):
    study.check_budgets('ds_vit', [0.3, 0.55])
  study.check_budgets('ds_vit', [0.3, 0.5])
