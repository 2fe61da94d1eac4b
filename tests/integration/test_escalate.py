"""Escalation on a trained checkpoint without its gate: the command line calibrates it to a
budget on held-out training images, saves it beside the checkpoint, and eval.py,
`dsnet_jax.load` and `RoutedPredictor` use it; a budget it cannot spend is refused first."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import checks
from checks import ROOT
from dsnet_jax import errors, escalation, eval_lib, inference, rundir
from dsnet_jax.data import input_pipeline


def escalate(*args):
  return subprocess.run([sys.executable, '-m', 'dsnet_jax.tools.escalate', *args], cwd=ROOT,
                        capture_output=True, text=True)


def test_a_supernet_without_a_gate_gets_a_calibrated_escalation(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained.workdir, workdir)
  recalibrated = workdir / 'checkpoints' / 'recalibrate'  # Stage I and BN: no gate trained.
  done = escalate(f'--checkpoint={recalibrated}', '--chain=0,2', '--budget=65000',
                  '--budget_unit=madds', '--calibration_examples=32')
  assert done.returncode == 0, done.stderr[-3000:]
  saved = json.loads((recalibrated / escalation.ESCALATION_FILE).read_text())
  assert saved['chain'] == ['0', '2'] and saved['budget'] == 65000
  # On the 32 held-out images it was fitted on: within one image's escalation of the budget.
  step = (77148 - 57916) / 32
  assert 65000 - step <= saved['calibration']['madds'] <= 65000
  report = json.loads((recalibrated / 'eval.json').read_text())
  result = report['routers']['escalation']
  assert result['thresholds'] == saved['thresholds'] and report['gated'] is None
  assert set(report['routers']['auroc_cheapest_wrong']) == {'max_softmax', 'margin'}
  assert 'escalation 0 -> 2 (max_softmax under' in done.stdout

  loaded = rundir.load(checkpoint=recalibrated)
  assert loaded.escalation == escalation.Escalation.from_json(json.dumps(saved))
  pipeline = eval_lib.eval_pipeline(input_pipeline.DataSpec(
      name='synthetic', image_size=16, channels=1, num_classes=4, synthetic_num_examples=64),
      16)
  images = np.concatenate([b['image'][b['mask'].astype(bool)] for b in pipeline.batches()])
  predictor = inference.RoutedPredictor(loaded.model, loaded.variables, loaded.image_shape,
                                        max_batch=16, escalation=loaded.escalation)
  logits, indices = predictor.predict(images)
  space = [r.name for r in loaded.routes.routing_space]
  for image, row, index in zip(images, np.asarray(logits), indices):
    route = space[index]
    checks.assert_close(row, loaded.model.apply(loaded.variables, image[None], route=route)[0])
  stops = {r: int((np.asarray(space)[indices] == r).sum()) for r in ('0', '2')}
  assert stops == result['stops']  # The predictor routes as the report counted.

  # Evaluated again through eval.py, the saved escalation is reported.
  # (--checkpoint alone: any stage folder evaluates, as the README says.)
  again = subprocess.run([sys.executable, 'eval.py', f'--checkpoint={recalibrated}',
                          f'--output_dir={tmp_path / "again"}'],
                         cwd=ROOT, capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((tmp_path / 'again' / 'eval.json').read_text())['routers'][
      'escalation'] == result

  # The routed bundle of this gate-less checkpoint routes by its escalation (not by a gate).
  export = [sys.executable, '-m', 'dsnet_jax.tools.export', f'--config={ROOT}/configs/tiny.py',
            f'--checkpoint={recalibrated}', '--routed', '--platforms=cpu']
  done = subprocess.run([*export, f'--out={tmp_path / "bundle"}'], cwd=ROOT,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  manifest = json.loads((tmp_path / 'bundle' / 'manifest.json').read_text())
  assert manifest['escalation']['chain'] == [0, 2]
  assert manifest['escalation']['thresholds'] == saved['thresholds']
  refused = subprocess.run([*export, '--router=gate', f'--out={tmp_path / "gate"}'], cwd=ROOT,
                           capture_output=True, text=True)
  assert refused.returncode == 1 and 'holds no trained gate' in refused.stderr


def test_a_predictor_routes_only_by_a_trained_gate_or_a_calibrated_escalation(trained,
                                                                            tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained.workdir, workdir)
  recalibrated = workdir / 'checkpoints' / 'recalibrate'
  ungated = rundir.load(checkpoint=recalibrated)
  for router in ('', 'gate'):  # The routing head was never trained.
    with pytest.raises(errors.ConfigError, match='recalibrate checkpoint: its gate was never '
                       'trained'):
      ungated.predictor(router)
  with pytest.raises(errors.ConfigError, match='has no calibrated escalation'):
    ungated.predictor('escalation')
  with pytest.raises(errors.ConfigError, match="router 'gated': use"):
    ungated.predictor('gated')
  gated = rundir.load(workdir)  # The gate stage.
  assert gated.predictor(max_batch=16).escalation is None
  done = escalate(f'--checkpoint={recalibrated}', '--chain=0,2', '--budget=65000',
                  '--budget_unit=madds', '--calibration_examples=32')
  assert done.returncode == 0, done.stderr[-3000:]
  predictor = rundir.load(checkpoint=recalibrated).predictor(max_batch=16)
  assert predictor.escalation.chain == ('0', '2')
  # Its untrained gate stays out of reach: asked for by name, or by escalate=False.
  images = np.zeros((3, 16, 16, 1), np.float32)
  with pytest.raises(errors.NotGatedError, match='a gate no gate stage trained'):
    predictor.predict(images, escalate=False)
  with pytest.raises(errors.NotGatedError, match='a gate no gate stage trained'):
    predictor.predict_one(images[0], escalate=False)
  _, forced = predictor.predict(images, routing_indices=[0, 1, 2])  # Forced: no gate.
  assert forced.tolist() == [0, 1, 2]
  with pytest.raises(errors.ConfigError, match="own router is used; choose it with router="):
    gated.predictor('gate', escalation=predictor.escalation)
  with pytest.raises(errors.ConfigError, match='has no escalation rule'):
    gated.predictor('gate', max_batch=16).predict(images, escalate=True)


def test_a_budget_escalation_cannot_spend_is_refused_before_any_work(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained.workdir, workdir)
  escalate_32 = lambda *flags: escalate(f'--workdir={workdir}', '--calibration_examples=32', *flags)
  done = escalate_32('--chain=0,2', '--budget=0.01')
  assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'escalation 0 -> 2 spends' in done.stderr
  assert not list(workdir.glob('**/' + escalation.ESCALATION_FILE))
  done = escalate_32('--chain=0,3', '--budget=0.5')
  assert done.returncode == 1 and "routes ['3'] are not in the routing space" in done.stderr
  done = escalate_32('--chain=0,7', '--budget=0.5')
  assert done.returncode == 1 and "unknown route '7'; valid routes: 0, 1, 2, 3" in done.stderr
  for chain, message in (('2,0', 'give them cheapest first'), ('0', 'two or more distinct'),
                         ('0,0', 'two or more distinct')):
    done = escalate_32(f'--chain={chain}', '--budget=0.5')
    assert done.returncode == 1 and message in done.stderr.splitlines()[-1], done.stderr
  done = escalate_32('--chain=0,2', '--budget=65000', '--budget_unit=madds',
                     '--calibration_examples=64')  # The whole (synthetic) training split.
  assert done.returncode == 1 and 'use 1 to 63 of the 64 images of train' in done.stderr
  # A routing space the checkpoint's own config (with which the rule is read back) lacks.
  done = escalate_32('--chain=0,3', '--budget=0.55', '--config=configs/tiny.py',
                     '--config.model.routing_space=(0, 1, 3)')
  assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(
      'error: --config has routing space (0, 1, 3);'), done.stderr
  # The synthetic set has train and test.
  done = escalate_32('--chain=0,2', '--budget=0.5', '--calibration_split=validation')
  assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(
      "error: escalation calibration split 'validation': synthetic has no split")
  assert 'restored' not in done.stdout + done.stderr  # Refused before the checkpoint is read.
  assert not list(workdir.glob('**/' + escalation.ESCALATION_FILE))


def test_an_auto_chain_is_the_most_accurate_chain_on_the_calibration_images(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained.workdir, workdir)
  recalibrated = workdir / 'checkpoints' / 'recalibrate'
  common = ('--budget=65000', '--budget_unit=madds', '--calibration_examples=32')
  done = escalate(f'--checkpoint={recalibrated}', '--chain=auto', *common)
  assert done.returncode == 0, done.stderr[-3000:]
  saved = json.loads((recalibrated / escalation.ESCALATION_FILE).read_text())
  tried = saved['calibration']['chains']
  # Every chain of the routing space (0, 1, 2) that can spend 65000 MAdds: routes 0 and 1
  # each cost less (so 1 -> 2 can), route 2 77148; 0 -> 1 -> 2 spends up to 90076.
  assert sorted(map(tuple, (t['chain'] for t in tried))) == [
      ('0', '1'), ('0', '1', '2'), ('0', '2'), ('1', '2')]
  best = max(tried, key=lambda t: (t['accuracy'], -len(t['chain'])))
  assert saved['chain'] == best['chain'] and saved['calibration']['accuracy'] == best['accuracy']
  # The chain named explicitly calibrates to the same rule.
  done = escalate(f'--checkpoint={recalibrated}', f'--chain={",".join(best["chain"])}', *common)
  assert done.returncode == 0, done.stderr[-3000:]
  again = json.loads((recalibrated / escalation.ESCALATION_FILE).read_text())
  assert again['thresholds'] == saved['thresholds'] and 'chains' not in again['calibration']


def test_escalation_calibrates_on_the_split_the_user_names(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained.workdir, workdir)
  recalibrated = workdir / 'checkpoints' / 'recalibrate'
  done = escalate(f'--checkpoint={recalibrated}', '--chain=0,2', '--budget=65000',
                  '--budget_unit=madds', '--calibration_examples=32', '--calibration_split=test')
  assert done.returncode == 0, done.stderr[-3000:]
  saved = json.loads((recalibrated / escalation.ESCALATION_FILE).read_text())
  assert saved['calibration']['split'] == 'test' and saved['calibration']['images'] == 32
  assert 'the evaluation split, calibrate the thresholds' in done.stdout + done.stderr
  # Fitted on the last 32 test images: within one image's escalation of the budget there.
  step = (77148 - 57916) / 32
  assert 65000 - step <= saved['calibration']['madds'] <= 65000


RULE = '"confidence": "max_softmax", "step": 3'


@pytest.mark.parametrize('content, message', [
    ('{"chain": ["0", "2"], "thresh', 'not an escalation rule'), ('[1, 2, 3]', 'not an escalation'),
    ('{"chain": ["0", "2"], "step": 3}', 'not an escalation rule'),
    ('{"chain": ["0", "2"], "thresholds": ["high"], %s}' % RULE, 'a list of numbers'),
    ('{"chain": ["0", "2"], "thresholds": ["0.3"], %s}' % RULE, 'a list of numbers'),
    ('{"chain": ["0", "2"], "thresholds": [true], %s}' % RULE, 'a list of numbers'),
    ('{"chain": ["0", "2"], "thresholds": [1e30], %s}' % RULE, r'numbers in \[0, 2.0\]'),
    ('{"chain": ["0", "2"], "thresholds": [-1], %s}' % RULE, r'numbers in \[0, 2.0\]'),
    ('{"chain": ["0", "2"], "thresholds": [0.5], "budget": -5, %s}' % RULE, 'budget is MAdds'),
    ('{"chain": ["0", "2"], "thresholds": [0.5], "budget": NaN, %s}' % RULE, 'budget is MAdds'),
    ('{"chain": ["0", "2"], "thresholds": [0.5], "budget": 6e4, "budget_unit": "furlongs", %s}'
     % RULE, "'furlongs'"),
    ('{"chain": ["0", "3"], "thresholds": [0.5], %s}' % RULE, 'not in the routing space'),
    ('{"chain": ["2", "0"], "thresholds": [0.5], %s}' % RULE, 'cheapest first'),
    ('{"chain": [0, 2], "thresholds": [0.5], %s}' % RULE, 'a list of route names'),
    ('{"chain": ["0", "2"], "thresholds": [0.5], "step": "3"}', 'not a step number'),
    ('{"chain": ["0", "2"], "thresholds": [0.5], "confidence": "max_softmax", "step": true}',
     'not a step number'),
    # Calibrated on another network: its levels cost other MAdds than this model's.
    ('{"chain": ["0", "2"], "thresholds": [0.5], "level_madds": [90000.0, 120000.0], %s}' % RULE,
     'a rule of another network'),
])
def test_a_damaged_saved_escalation_is_named(trained, tmp_path, content, message):
  (tmp_path / escalation.ESCALATION_FILE).write_text(content)
  model = rundir.load(trained.workdir).model
  with pytest.raises(errors.ConfigError, match=f'{tmp_path}/escalation.json.*{message}'):
    rundir.read_escalation(str(tmp_path), 3, model, (16, 16, 1))
  (tmp_path / escalation.ESCALATION_FILE).write_text(  # The same rule, well formed.
      '{"chain": ["0", "2"], "thresholds": [0.5], "level_madds": [57916.0, 77148.0], %s}' % RULE)
  assert rundir.read_escalation(str(tmp_path), 3, model, (16, 16, 1)).thresholds == (0.5,)


def test_the_escalate_tool_replaces_a_damaged_saved_escalation(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained.workdir, workdir)
  path = workdir / 'checkpoints' / 'gate' / escalation.ESCALATION_FILE
  path.write_text('{"chain": ["0", "2"], "thresh')
  with pytest.raises(errors.ConfigError, match=f'{path} is not an escalation rule'):
    rundir.load(workdir)
  done = escalate(f'--workdir={workdir}', '--chain=0,2', '--budget=65000', '--budget_unit=madds',
                  '--calibration_examples=32', f'--output_dir={tmp_path / "report"}')
  assert done.returncode == 0, done.stderr[-2000:]
  assert rundir.load(workdir).escalation.chain == ('0', '2')


def test_training_calibrates_the_configured_escalation_after_its_last_stage(tmp_path):
  from dsnet_jax import train_lib
  config = checks.tiny_config(num_devices=1, stages=('supernet', 'recalibrate'), **{
      'escalation.chain': ('0', '2'), 'escalation.budget': 65000.0,
      'escalation.budget_unit': 'madds', 'escalation.calibration_examples': 32})
  report = train_lib.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / 'checkpoints' / 'recalibrate' /
                      escalation.ESCALATION_FILE).read_text())
  assert saved['step'] == 2 and saved['chain'] == ['0', '2'] and report['gated'] is None
  assert report['routers']['escalation']['thresholds'] == saved['thresholds']
  assert rundir.load(str(tmp_path)).escalation.thresholds == tuple(saved['thresholds'])
  # A budget the chain cannot spend is refused before any training.
  with pytest.raises(errors.BudgetError, match='escalation 0 -> 2 spends'):
    train_lib.train_and_evaluate(checks.tiny_config(num_devices=1, **{
        'escalation.chain': ('0', '2'), 'escalation.budget': 0.01}), str(tmp_path / 'other'))
  assert not (tmp_path / 'other' / 'checkpoints').exists()
  with pytest.raises(errors.ConfigError, match="calibration split 'validation': synthetic has"):
    train_lib.train_and_evaluate(checks.tiny_config(num_devices=1, **{
        'escalation.chain': ('0', '2'), 'escalation.budget': 65000.0,
        'escalation.budget_unit': 'madds', 'escalation.calibration_split': 'validation'}),
        str(tmp_path / 'other'))
  assert not (tmp_path / 'other' / 'checkpoints').exists()
