"""The run directory's contract: exact restores, config checks, meta-driven meaning, locks,
never-worse checkpoints, validation before any work. Each test is a fault once seen."""
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsnet_jax import (budget, checkpointing, config_lib, errors, eval_lib, inference, optim,
                       rundir, train_lib)
from dsnet_jax.models import get_model
from checks import ROOT, tiny_config
import test_readme

pytestmark = pytest.mark.slow


def one_device(**overrides):
  return tiny_config(num_devices=1, **overrides)


def copy_of(trained, tmp_path):
  workdir = tmp_path / 'work'
  shutil.copytree(trained.workdir, workdir)
  return workdir


def flat(tree):
  return {optim.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore(directory, config=None):
  config = config or one_device()
  model = get_model(config.model_name, **config.model)
  return rundir.restore_variables(directory, model, (16, 16, 1), config=config)


def test_eval_with_another_architecture_is_refused(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  other = one_device(**{'model.group_depths': (1, 1, 1, 1, 1)})
  with pytest.raises(errors.ConfigMismatchError, match=r"model.group_depths: \[1, 1, 1, 2, 1\]"):
    eval_lib.evaluate_workdir(other, str(workdir))
  # Allowed past the config check, the arrays themselves still have to match, all of them.
  with pytest.raises(errors.CheckpointMismatchError) as error:
    eval_lib.evaluate_workdir(other, str(workdir), allow_config_changes=['model.'])
  assert 'params/groups_3_1/conv_dw/kernel' in str(error.value)
  assert 'not in the model' in str(error.value)


@pytest.mark.parametrize('key, value', [('supernet.steps', 8), ('seed', 1), ('batch_size', 16),
                                        ('gate.madds_scale', 1e6),
                                        ('model.routing_space', (1, 2)),
                                        ('model.dtype', 'bfloat16')])
def test_a_finished_workdir_refuses_a_changed_config(trained, tmp_path, key, value):
  workdir = copy_of(trained, tmp_path)
  with pytest.raises(errors.ConfigMismatchError, match=f'{key}: '):
    train_lib.train_and_evaluate(one_device(**{key: value}), str(workdir))


def test_an_allowed_change_extends_a_finished_stage_and_stale_stages_are_refused(
    trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  longer = one_device(**{'supernet.steps': 6})
  with pytest.raises(errors.StaleStageError, match='checkpoints/recalibrate was computed from'):
    train_lib.train_and_evaluate(longer, str(workdir), ['supernet.steps'])
  assert rundir.RunDir(workdir).status('supernet').step == 4  # Refused before any work.

  longer.stages = ('supernet',)
  train_lib.train_and_evaluate(longer, str(workdir), ['supernet.steps'])
  assert '[supernet] resuming at step 4' in capsys.readouterr().out
  assert rundir.RunDir(workdir).status('supernet').meta['complete']
  assert rundir.RunDir(workdir).status('supernet').step == 6


def test_what_a_checkpoint_holds_comes_from_its_meta_not_its_folder(trained, tmp_path):
  workdir = trained.workdir
  for stage, gated in (('supernet', False), ('gate', True)):
    copied = tmp_path / f'run1_{stage}'
    shutil.copytree(workdir / 'checkpoints' / stage, copied)
    original, renamed = restore(workdir / 'checkpoints' / stage), restore(copied)
    assert renamed.gated == original.gated == gated
    for a, b in zip(jax.tree.leaves(original.variables), jax.tree.leaves(renamed.variables)):
      np.testing.assert_array_equal(a, b)
  # The supernet's variables are its EMA teacher's, not the raw weights.
  ema = restore(tmp_path / 'run1_supernet').variables['params']
  with checkpointing.Checkpointer(tmp_path / 'run1_supernet', create=False) as ckpt:
    state, _, _ = ckpt.restore({'params': ema}, partial=True)
  raw, ema = flat(state['params']), flat(ema)
  assert any(not np.array_equal(raw[k], ema[k]) for k in raw)
  report = eval_lib.evaluate_workdir(one_device(), str(tmp_path / 'eval_gate'),
                                     checkpoint=str(tmp_path / 'run1_gate'))
  assert report['gated'] == trained.report['gated']


def test_a_checkpoint_restores_under_another_compute_dtype(trained):
  """The variables are float32 whatever the compute dtype, so eval/export/a later stage may
  use another one (resuming a stage may not: the parametrized test above)."""
  gate = trained.workdir / 'checkpoints' / 'gate'
  restored = restore(gate, one_device(**{'model.dtype': 'bfloat16'}))
  assert restored.model.dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(restore(gate).variables), jax.tree.leaves(restored.variables)):
    np.testing.assert_array_equal(a, b)


def test_each_stage_changes_only_what_it_trains(trained):
  workdir, init = trained.workdir, trained.init
  supernet = flat(restore(workdir / 'checkpoints' / 'supernet').variables['params'])
  gate = flat(restore(workdir / 'checkpoints' / 'gate').variables['params'])
  recalibrated = flat(restore(workdir / 'checkpoints' / 'recalibrate').variables['params'])
  initial = flat(init['params'])
  for name, value in supernet.items():
    routing = 'routing_head' in name
    assert np.array_equal(value, initial[name]) == routing, name  # Stage I: all but the head.
    assert np.array_equal(gate[name], recalibrated[name]) != routing, name  # Stage II: the head.


def test_batch_size_not_divisible_by_the_devices_fails_before_any_work(tmp_path):
  for key in ('batch_size', 'eval_batch_size'):
    config = tiny_config(num_devices=8, **{key: 12})
    with pytest.raises(errors.ConfigError, match=f'{key}=12 is not divisible by the 8 dev'):
      train_lib.train_and_evaluate(config, str(tmp_path / key))
    assert not (tmp_path / key).exists()


def test_model_name_typo_lists_the_models(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"ds_mbnett.*available: ds_mbnet, ds_resnet, "
                     r"ds_vit$"):
    train_lib.train_and_evaluate(one_device(model_name='ds_mbnett'), str(tmp_path))


def test_a_nan_run_keeps_its_finite_checkpoints(tmp_path):
  config = one_device(stages=('supernet',), checkpoint_every_steps=1, keep_checkpoints=3,
                      log_every_steps=100)
  config.supernet.steps = 8
  config.supernet.optimizer.lr = 1e12
  config.supernet.optimizer.warmup_steps = 0
  with pytest.raises(FloatingPointError) as error:
    train_lib.train_and_evaluate(config, str(tmp_path))
  ckpt_dir = tmp_path / 'checkpoints' / 'supernet'
  with checkpointing.Checkpointer(ckpt_dir, create=False) as ckpt:
    steps = ckpt.all_steps()
    assert steps and f'the last saved step is {steps[-1]}' in str(error.value)
    for step in steps:
      state = ckpt._manager.restore(step, args=checkpointing.ocp.args.Composite(
          state=checkpointing.ocp.args.PyTreeRestore()))['state']
      assert not checkpointing.non_finite_leaves(state), step


def test_an_exploding_gate_is_neither_saved_nor_marked_complete(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / 'gate')
  config = one_device()
  config.gate.optimizer.lr = 1e30
  with pytest.raises(errors.NonFiniteStateError, match='not saving step'):
    train_lib.train_and_evaluate(config, str(workdir), ['gate.optimizer.lr'])
  assert not rundir.RunDir(workdir).status('gate').exists


def _truncate(step_dir):
  for f in step_dir.rglob('*'):
    if f.is_file() and 'd' in f.parent.name and f.stat().st_size:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_a_corrupt_latest_step_falls_back_and_resumes_to_the_same_result(trained, tmp_path,
                                                                          capsys):
  workdir = copy_of(trained, tmp_path)
  _truncate(workdir / 'checkpoints' / 'supernet' / '4')  # Finished: later stages never read it.
  gate_dir = workdir / 'checkpoints' / 'gate'
  _truncate(gate_dir / '3')
  capsys.readouterr()
  report = eval_lib.evaluate_workdir(one_device(), str(workdir))
  out = capsys.readouterr().out
  assert 'gate/3 is unreadable' in out and 'falling back to step 2' in out
  assert 'UNFINISHED (step 2 of 3)' in out and 'warning:' in out
  assert (gate_dir / '3').exists()  # eval reads, never renames.

  report = train_lib.train_and_evaluate(one_device(), str(workdir))
  out = capsys.readouterr().out
  assert 'gate/3 is unreadable' in out and 'step 3 set aside' in out
  assert '[gate] resuming at step 2' in out and '[supernet]' not in out
  # The set-aside step keeps its name; eval.py's report lies beside the steps.
  assert sorted(p.name for p in gate_dir.iterdir()) == [
      '2', '3', '3.unreadable', 'eval.json', 'eval.png', 'routes.npy']
  assert report['gated'] == trained.report['gated']
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  gate_steps = [r['step'] for r in records if r['stage'] == 'gate' and 'loss' in r]
  assert len(gate_steps) == len(set(gate_steps))  # The re-run steps are not logged twice.


def test_a_second_process_on_a_workdir_is_refused_at_once(tmp_path):
  import os
  with rundir.RunDir(tmp_path).lock():
    with pytest.raises(errors.LockedError, match=f'in use .*PID {os.getpid()}'):
      train_lib.train_and_evaluate(one_device(), str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_eval_of_a_missing_workdir_creates_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match='no workdir'):
    eval_lib.evaluate_workdir(one_device(), str(tmp_path / 'typo'))
  assert not (tmp_path / 'typo').exists()


def test_a_routing_space_naming_unknown_routes_fails_before_any_work(tmp_path):
  with pytest.raises(errors.ConfigError, match=r'model: unknown route 7; valid routes: 0'):
    train_lib.train_and_evaluate(one_device(**{'model.routing_space': (0, 7)}), str(tmp_path))
  assert not list(tmp_path.iterdir())


def test_a_fallback_step_is_checked_against_the_config_too(trained, tmp_path):
  """The latest step's meta is unreadable, so the config check must read the step restored."""
  workdir = copy_of(trained, tmp_path)
  meta = workdir / 'checkpoints' / 'gate' / '3' / 'meta' / 'metadata'
  meta.write_text(meta.read_text()[:5])
  with pytest.raises(errors.ConfigMismatchError, match='gate.madds_weight: 0.5 -> 0.9'):
    train_lib.train_and_evaluate(one_device(**{'gate.madds_weight': 0.9}), str(workdir))


@pytest.mark.parametrize('damage', ['array_files', 'meta_folder', 'state_metadata', 'meta_list'])
def test_every_kind_of_damaged_step_falls_back(trained, tmp_path, capsys, damage):
  workdir = copy_of(trained, tmp_path)
  step = workdir / 'checkpoints' / 'gate' / '3'
  if damage == 'array_files':
    for f in (step / 'state').rglob('*'):
      if f.is_file() and f.parent.name == 'd':
        f.write_bytes(f.read_bytes()[:10])
  elif damage == 'meta_folder':
    shutil.rmtree(step / 'meta')
  elif damage == 'state_metadata':
    (step / 'state' / '_METADATA').unlink()
  else:
    (step / 'meta' / 'metadata').write_text('[]')
  capsys.readouterr()
  report = eval_lib.evaluate_workdir(one_device(), str(workdir))
  out = capsys.readouterr().out
  assert 'gate/3 is unreadable' in out and 'falling back to step 2' in out, out
  assert report['gated'] is not None


@pytest.mark.parametrize('overrides, message', [
    ({'num_devices': -1}, 'num_devices must be >= 0'),
    ({'num_devices': 99}, 'num_devices=99: only 8 devices'),
    ({'data.name': 'foo'}, "data.name='foo': unknown data set"),
    ({'data.image_size': 0}, "'data.image_size' must be > 0"),
    ({'data.num_classes': 5}, 'model.num_classes=4 and data.num_classes=5 differ'),
])
def test_more_config_errors_before_any_work(tmp_path, overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    train_lib.train_and_evaluate(tiny_config(**overrides), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_an_allowed_change_must_name_a_config_key(trained, tmp_path):
  with pytest.raises(errors.ConfigError, match="'supernet.stepz' is not a config key"):
    eval_lib.evaluate_workdir(one_device(), str(trained.workdir),
                              allow_config_changes=['supernet.stepz'])


def test_a_later_stage_alone_starts_from_the_workdirs_finished_stages(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / 'gate')
  report = train_lib.train_and_evaluate(one_device(stages=('gate',)), str(workdir))
  assert 'starting from' in capsys.readouterr().out
  assert report['gated'] == trained.report['gated']  # The same gate as the full run's.


def test_a_routing_space_chosen_after_stage_one_trains_a_gate_to_its_budget(trained, tmp_path,
                                                                          capsys):
  """The authors' workflow (measure every route, then choose the routing space), here by
  `routing_space='auto'` with a budget: the finished supernet (routing space 0, 1, 2) restores
  with a new routing head, the gate stage proposes a routing space from the routes measured
  on held-out images, trains, calibrates its offsets, and everything reads them back."""
  workdir = copy_of(trained, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / 'gate')
  config = one_device(**{'gate.budget': 0.5, 'gate.calibration_examples': 24})
  config.model = dict(config.model.to_dict(), routing_space='auto')  # A str: a new field.
  report = train_lib.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert "routing space ['0', '1', '2'] -> ['0', '1', '2', '3']; routing head re-initialised" in out
  chosen = json.loads(out.split('[gate] routing space for the budget: ')[1].split('\n')[0]
                      .replace("'", '"'))
  # The proposal is the helper's, from the routes printed (measured on held-out images).
  measured = out.split('[gate] routes on the held-out training images: ')[1].split('\n')[0]
  rows = [{'route': r.split()[0], 'accuracy': float(r.split()[1]),
           'cost': float(r.split()[3]) * 1e6} for r in measured.split('  ')]
  assert [r['route'] for r in rows] == ['0', '1', '2', '3']  # Every route sharing the prefix.
  assert list(budget.propose_routing_space(rows, report['gated']['budget_madds'])
              ) == chosen
  assert list(report['gated']['route_histogram']) == chosen
  gate = restore(workdir / 'checkpoints' / 'gate', config)
  assert gate.meta['routing_space'] == chosen and gate.model.routes.routing_space == tuple(
      gate.model.routes[r] for r in chosen)
  recalibrated = flat(restore(workdir / 'checkpoints' / 'recalibrate', one_device()).variables)
  for name, value in flat(gate.variables['params']).items():
    if 'routing_head' in name:
      assert value.shape[-1] == len(chosen)
    else:  # Stage II trained the routing head only.
      np.testing.assert_array_equal(value, recalibrated['params/' + name])
  # The budget: in the meta, the report and eval.json; the offsets as calibrated.
  model = gate.model
  budget_madds = budget.budget_madds(config.gate, model, (16, 16, 1))
  assert gate.meta['budget_madds'] == report['gated']['budget_madds'] == budget_madds
  offsets = np.asarray(gate.meta['routing_offsets'], np.float32)
  np.testing.assert_array_equal(gate.variables['routing']['offsets'], offsets)
  assert offsets[0] == 0 and f'budget {budget_madds / 1e6:.3f} M MAdds, achieved' in out
  assert json.loads((workdir / 'eval.json').read_text())['gated'] == report['gated']
  # The README's plain-orbax snippet, in a process that never imports dsnet_jax, reads the
  # same weights, BatchNorm rows and offsets.
  snippet = test_readme.readme_python_blocks()[5].replace(
      "'workdir/ds_mbnet_fmnist/checkpoints/gate'", repr(str(workdir / 'checkpoints' / 'gate')))
  snippet += textwrap.dedent('''
      import sys
      assert not any(m.split('.')[0] == 'dsnet_jax' for m in sys.modules)
      from flax import traverse_util
      flat = traverse_util.flatten_dict(variables, sep='/')
      np.savez(sys.argv[1], offsets=offsets, stem_mean_4=stem_mean[4],
               **{k: np.asarray(v) for k, v in flat.items()})
      ''')
  out = tmp_path / 'orbax.npz'
  done = subprocess.run([sys.executable, '-c', snippet, str(out)], cwd=tmp_path,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  read = dict(np.load(out))
  np.testing.assert_array_equal(read.pop('offsets'), offsets)
  bn = gate.variables['batch_stats']['stem_bn']  # Widths (4, 8): row 0 is width 4.
  np.testing.assert_array_equal(read.pop('stem_mean_4'), np.asarray(bn['mean'])[0, :4])
  ours = {k: np.asarray(v) for k, v in flat(gate.variables).items() if not k.startswith('routing')}
  assert read.keys() == ours.keys()
  for name, value in ours.items():
    np.testing.assert_array_equal(read[name], value)
  # The offsets route eval.py and the routed engine: argmax(raw routing logits + offsets).
  images = np.random.default_rng(0).normal(size=(12, 16, 16, 1)).astype(np.float32)
  raw = model.apply(gate.variables, images, method=type(model).prefix)[1]
  expected = np.argmax(np.asarray(raw) + offsets, -1)
  _, _, weights = model.apply_gated(gate.variables, images)
  np.testing.assert_array_equal(np.argmax(weights, -1), expected)
  _, routing_indices = inference.RoutedPredictor(model, gate.variables, (16, 16, 1)).predict(
      images)
  np.testing.assert_array_equal(routing_indices, expected)
  # eval.py reads the chosen routing space back.
  again = eval_lib.evaluate_workdir(config, str(tmp_path / 'eval'),
                                    str(workdir / 'checkpoints' / 'gate'))
  assert again['gated'] == report['gated']
  # Another budget, allowed: the finished gate is read back (not chosen or trained again) and
  # keeps its own budget, which the report states.
  config.gate.budget = 0.52
  again = train_lib.train_and_evaluate(config, str(workdir), ['gate.budget'])
  assert '[gate] finished at step 3; skipping' in capsys.readouterr().out
  assert again['gated']['budget_madds'] == gate.meta['budget_madds']
  # A gated checkpoint must match an explicit routing space exactly, even when allowed.
  with pytest.raises(errors.ConfigMismatchError, match='model.routing_space'):
    eval_lib.evaluate_workdir(one_device(), str(workdir))
  other = (0, 1, 3) if chosen != ['0', '1', '3'] else (0, 1, 2)
  with pytest.raises(errors.CheckpointMismatchError, match='gate trained for routing'):
    eval_lib.evaluate_workdir(one_device(**{'model.routing_space': other}), str(workdir),
                              allow_config_changes=['model.routing_space'])


def test_the_gate_budget_experiment_runs_on_a_tiny_supernet(trained, tmp_path):
  spec = importlib.util.spec_from_file_location(
      'gate_budget', ROOT / 'experiments' / 'gate_budget.py')
  experiment = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment)
  config = one_device(**{'gate.calibration_examples': 24})
  row = experiment.run_one(config, str(trained.workdir), str(tmp_path / 'run'), 0.5, 1)
  gated = json.loads((tmp_path / 'run' / 'eval.json').read_text())['gated']
  assert (row['madds'], row['gain'], row['seed']) == (gated['madds'], gated['gain'], 1)
  assert row['cost_error'] == pytest.approx(gated['madds'] / gated['budget_madds'] - 1)
  assert row['gain_over_mix'] == gated['gain_over_mix']
  other = {**row, 'seed': 2, 'gain': row['gain'] + 0.01, 'cost_error': 0.0}
  summary = experiment.summarise([row, other])
  assert summary == [{'budget': 0.5, 'seeds': 2, 'gain_mean': pytest.approx(row['gain'] + 0.005),
                      'gain_spread': pytest.approx(0.01),
                      'gain_over_mix_mean': row['gain_over_mix'], 'gain_over_mix_spread': 0.0,
                      'worst_cost_error': row['cost_error']}]
  assert f'| 0.5 | 1 | {gated["budget_madds"] / 1e6:.3f} |' in experiment.format_table([row],
                                                                                        summary)
  with pytest.raises(FileNotFoundError, match='no finished supernet'):
    experiment.run_one(config, str(tmp_path / 'nothing'), str(tmp_path / 'run2'), 0.5, 0)


def test_load_returns_a_trained_workdirs_model_variables_and_routes(trained):
  import dsnet_jax
  loaded = dsnet_jax.load(trained.workdir)  # The config saved with the checkpoint.
  assert loaded.restored.gated and loaded.image_shape == (16, 16, 1)
  assert loaded.routes is loaded.model.routes and loaded.config.model_name == 'ds_mbnet'
  gate = restore(trained.workdir / 'checkpoints' / 'gate')
  for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(gate.variables)):
    np.testing.assert_array_equal(a, b)
  images = np.random.default_rng(0).normal(size=(3, 16, 16, 1)).astype(np.float32)
  np.testing.assert_array_equal(
      loaded.model.apply(loaded.variables, images, route=loaded.routes.largest),
      gate.model.apply(gate.variables, images, route='largest'))


def test_eval_writes_beside_the_checkpoint_it_evaluated(trained, tmp_path):
  """Not over the workdir's eval.json; routes.npy holds each test example's routing index,
  the same as the routed engine's and the histogram's; --output_dir elsewhere."""
  workdir = copy_of(trained, tmp_path)
  before = (workdir / 'eval.json').read_bytes()
  report = eval_lib.evaluate_workdir(one_device(), str(workdir))
  stage = workdir / 'checkpoints' / 'gate'
  assert (workdir / 'eval.json').read_bytes() == before
  assert json.loads((stage / 'eval.json').read_text()) == json.loads(json.dumps(report))
  indices = np.load(stage / eval_lib.ROUTES_FILE)
  histogram = report['gated']['route_histogram']
  assert indices.shape == (sum(histogram.values()),) and indices.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(indices, minlength=len(histogram)),
                                list(histogram.values()))
  config = one_device()
  pipeline = eval_lib.eval_pipeline(config_lib.data_spec(config.data), config.eval_batch_size)
  images = np.concatenate([b['image'][b['mask'].astype(bool)] for b in pipeline.batches()])
  gate = restore(stage)
  _, routed = inference.RoutedPredictor(gate.model, gate.variables, (16, 16, 1)).predict(images)
  np.testing.assert_array_equal(indices, routed)
  assert restore(stage).step == gate.step  # The report beside the steps harms no restore.
  eval_lib.evaluate_workdir(one_device(), str(workdir), output_dir=str(tmp_path / 'elsewhere'))
  assert {p.name for p in (tmp_path / 'elsewhere').iterdir()} == {
      'eval.json', 'eval.png', eval_lib.ROUTES_FILE}
  assert eval_lib.report_title(gate.model, one_device(), gate) == (
      f'DSMBNet on synthetic, gate step {gate.step}')


def test_a_checkpoint_saved_before_a_config_section_existed_loads_and_evaluates(trained,
                                                                                tmp_path):
  """A workdir written by an earlier version (its saved config lacks the `escalation` section)
  still loads and evaluates with its own config: the missing keys take their defaults."""
  workdir = copy_of(trained, tmp_path)
  for metadata in (workdir / 'checkpoints').glob('*/*/meta/metadata'):
    meta = json.loads(metadata.read_text())
    config = json.loads(meta['config'])
    del config['escalation']
    metadata.write_text(json.dumps({**meta, 'config': json.dumps(config)}))
  assert 'escalation' not in json.loads(json.loads(
      (workdir / 'checkpoints' / 'gate' / '3' / 'meta' / 'metadata').read_text())['config'])
  loaded = rundir.load(workdir)
  assert loaded.config.escalation.chain == () and loaded.restored.gated
  done = subprocess.run([sys.executable, 'eval.py', f'--workdir={workdir}',
                         f'--output_dir={tmp_path / "report"}'], cwd=ROOT, capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads((tmp_path / 'report' / 'eval.json').read_text())['gated']
