"""Two-stage training end to end on the tiny config: stages, resume, sharding, compiles."""
import functools
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from checks import tiny_config
from dsnet_jax import (bn_calibration, config_lib, errors, eval_lib, losses, optim, rundir,
                       sharding, stand_in, train_lib, train_steps)
from dsnet_jax import routes as routes_lib
from dsnet_jax.models import get_model


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] of the event files in `directory`, read without TensorBoard: the
  TFRecord framing (length, CRC, Event proto, CRC) and tensorboardX's Event proto."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(directory.glob('events.out.tfevents.*')):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (length,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_holds_each_stages_metrics_as_metrics_jsonl_does(trained):
  records = [json.loads(line) for line in open(trained.workdir / 'metrics.jsonl')]
  for stage, name in (('supernet', 'loss'), ('supernet', 'eval_accuracy_largest'),
                      ('gate', 'loss'), ('gate', 'mean_cost'), ('gate', 'route_histogram/0')):
    scalars = tensorboard_scalars(trained.workdir / 'tensorboard' / stage)
    key, _, sub = name.partition('/')
    logged = [(r['step'], r[key][sub] if sub else r[key]) for r in records
              if r['stage'] == stage and key in r]
    assert logged, (stage, name)
    assert scalars[f'{stage}/{name}'] == [(s, pytest.approx(v)) for s, v in logged]
  # Speed counts from the end of the first (compiling) step: no '0 img/s' line.
  assert 'img/s' in trained.output and ' 0 img/s' not in trained.output


@pytest.mark.slow
def test_all_stages_end_to_end_and_eval_workdir(trained, tmp_path):
  report, workdir = trained.report, trained.workdir
  assert [r['route'] for r in report['routes']] == ['0', '1', '2', '3', 'largest']
  assert all(0 <= r['accuracy'] <= 1 for r in report['routes'])
  gated = report['gated']
  assert sum(gated['route_histogram'].values()) == 64  # Every test example routed once.
  madds = {r['route']: r['madds'] for r in report['routes']}
  assert madds['0'] <= gated['madds'] <= madds['2'] + 66  # Gate head adds a few MAdds.
  stages = [json.loads(line)['stage'] for line in open(workdir / 'metrics.jsonl')]
  assert {'supernet', 'gate'} <= set(stages)
  assert (workdir / 'eval.png').stat().st_size > 1000
  assert 'img/s' in trained.output and 'ETA' in trained.output and 'gated' in trained.output

  # eval.py restores the gate checkpoint (writing its report elsewhere); without --config,
  # with the config saved there.
  saved = rundir.saved_config(workdir / 'checkpoints' / 'gate')
  assert saved.to_dict() == tiny_config(num_devices=1).to_dict()
  again = eval_lib.evaluate_workdir(saved, str(tmp_path), str(
      workdir / 'checkpoints' / 'gate'))
  assert again['gated'] == gated
  assert [r['accuracy'] for r in again['routes']] == [r['accuracy'] for r in report['routes']]


@pytest.mark.slow
def test_resume_after_a_kill_equals_straight_run(tmp_path, monkeypatch):
  config = tiny_config(num_devices=1, stages=('supernet',), checkpoint_every_steps=2)
  run = train_lib.make_run(config, str(tmp_path / 'straight'))
  upstream = functools.partial(train_lib.init_variables, run)
  straight, _ = train_lib.supernet_stage(run, upstream)

  real_step = train_steps.SupernetFunctions.step

  def dying_step(self, state, batch, table, seed, step, key):
    if step == 3:
      raise KeyboardInterrupt('killed')
    return real_step(self, state, batch, table, seed, step, key)
  monkeypatch.setattr(train_steps.SupernetFunctions, 'step', dying_step)
  run = train_lib.make_run(config, str(tmp_path / 'resumed'))
  upstream = functools.partial(train_lib.init_variables, run)
  with pytest.raises(KeyboardInterrupt):
    train_lib.supernet_stage(run, upstream)
  monkeypatch.setattr(train_steps.SupernetFunctions, 'step', real_step)
  resumed, source = train_lib.supernet_stage(run, upstream)
  assert source == {'stage': 'supernet', 'step': 4}
  assert leaves_equal(straight, resumed)


@pytest.mark.slow
def test_sharded_step_equals_single_device(tmp_path):
  results = []
  for devices in (1, 8):
    config = tiny_config(num_devices=devices, stages=('supernet',))
    config.supernet.steps = 2
    run = train_lib.make_run(config, str(tmp_path / str(devices)))
    variables, _ = train_lib.init_variables(run)
    tx = optim.make_optimizer(config.supernet.optimizer, 2, variables['params'])
    fns = train_steps.SupernetFunctions(run.model, tx, config_lib.supernet_recipe(config), run.mesh)
    state = train_steps.TrainState.create(variables, tx, with_ema=True)
    batch = next(run.batches(0))
    state, metrics = fns.step(state, batch, run.table, 0, 0, run.step_key(0, 0))
    results.append(jax.device_get((state.params, state.batch_stats, metrics['loss'])))
    if devices == 8:
      assert len(batch['image'].sharding.device_set) == 8
  (p1, s1, l1), (p8, s8, l8) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p8, s8))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiles_bounded_by_routes_not_combinations(tmp_path):
  config = tiny_config(num_devices=1)
  run = train_lib.make_run(config, str(tmp_path))
  variables, _ = train_lib.init_variables(run)
  tx = optim.make_optimizer(config.supernet.optimizer, 10, variables['params'])
  fns = train_steps.SupernetFunctions(run.model, tx, config_lib.supernet_recipe(config), run.mesh)
  state = sharding.replicate(train_steps.TrainState.create(variables, tx, with_ema=True), run.mesh)
  drawn = set()
  for step, batch in zip(range(6), run.batches(0)):
    drawn.update(routes_lib.sandwich_routes(run.table, 0, step, 2))
    state, _ = fns.step(state, batch, run.table, 0, step, run.step_key(step, 0))
  combinations = {tuple(routes_lib.sandwich_routes(run.table, 0, s, 2))
                  for s in range(6)}
  assert len(combinations) > 1
  assert fns.route_grad._cache_size() == len(drawn) <= len(run.table)
  assert fns.update._cache_size() == 1


def test_recalibration_sets_exact_cumulative_averages(tmp_path):
  run = train_lib.make_run(tiny_config(num_devices=1), str(tmp_path))
  variables, _ = train_lib.init_variables(run)
  batches = [next(run.batches(s)) for s in range(2)]
  route = run.table[0]
  new = bn_calibration.recalibrate(run.model, variables, iter(batches), [route], 2)
  stem_out = [np.asarray(run.model.apply(variables, b['image'], 4,
                                         method=lambda m, x, w: m.stem_conv(x, w)))
              for b in batches]
  flat = [x.reshape(-1, 4).astype(np.float64) for x in stem_out]
  stats = new['batch_stats']['stem_bn']
  np.testing.assert_allclose(stats['mean'][0, :4], np.mean([f.mean(0) for f in flat], 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'][0, :4], np.mean([f.var(0, ddof=1) for f in flat], 0),
                             rtol=1e-4)
  # Rows no route reached keep their values: stem width 8 is the largest route's only.
  np.testing.assert_array_equal(stats['mean'][1], variables['batch_stats']['stem_bn']['mean'][1])


def test_sgs_targets_and_gate_losses_on_a_hand_made_batch():
  smallest_logits = jnp.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
  labels = jnp.array([0, 0, 0, 1])
  targets = losses.gate_targets(jnp.argmax(smallest_logits, -1) == labels, num_routes=4)
  np.testing.assert_array_equal(targets, [0, 3, 0, 3])
  # 'widest_helps': hard only where the widest routed route is right and the smallest wrong.
  widest_correct = jnp.array([True, False, False, True])
  targets_helped = losses.gate_targets(jnp.argmax(smallest_logits, -1) == labels, 4,
                                       widest_correct)
  np.testing.assert_array_equal(targets_helped, [0, 0, 0, 3])

  gate_logits = jnp.array([[1.0, 0.0, 0.0, 0.0]] * 4)
  weights = losses.gumbel_straight_through(jax.random.key(0), gate_logits * 100)
  np.testing.assert_array_equal(weights, jax.nn.one_hot(jnp.zeros(4, int), 4))
  expected_ce = -np.log(np.exp(1) / (np.exp(1) + 3))
  np.testing.assert_allclose(losses.gate_cross_entropy(gate_logits[:1], targets[:1]),
                             expected_ce, rtol=1e-6)
  np.testing.assert_allclose(losses.madds_penalty(jnp.float32(2e8), 0.5, 1e9), 0.5 * 0.04,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.soft_cross_entropy(jnp.log(jnp.array([[0.5, 0.5]])),
                                                       jnp.array([[1.0, 0.0]])), np.log(2),
                             rtol=1e-6)


def test_gate_stage_trains_only_the_routing_head(tmp_path):
  config = tiny_config(num_devices=1, stages=('gate',))
  run = train_lib.make_run(config, str(tmp_path))
  variables, _ = train_lib.init_variables(run)
  trained, _ = train_lib.gate_stage(run, lambda: (variables, {'init_seed': 0}))
  flat_old = dict(jax.tree_util.tree_flatten_with_path(variables['params'])[0])
  for path, new in jax.tree_util.tree_flatten_with_path(trained['params'])[0]:
    changed = not np.array_equal(new, flat_old[path])
    assert changed == ('routing_head' in optim.param_path(path)), optim.param_path(path)
  assert leaves_equal(trained['batch_stats'], variables['batch_stats'])


def test_a_bfloat16_step_keeps_float32_state_and_a_finite_loss(tmp_path):
  """model.dtype='bfloat16': a Stage I step of the largest route (train-mode BN, dropout, label
  CE; one compile, the sandwich's other routes run the same code) computes in bfloat16 with a
  finite loss, and what the step keeps (parameters, their gradients, BN statistics, optimizer
  state, EMA) stays float32."""
  config = tiny_config(num_devices=1, **{'model.dtype': 'bfloat16'})
  run = train_lib.make_run(config, str(tmp_path))
  assert run.model.dtype == jnp.bfloat16
  variables = stand_in.random_variables(run.model, run.train_data.image_shape)
  tx = optim.make_optimizer(config.supernet.optimizer, 2, variables['params'])
  fns = train_steps.SupernetFunctions(run.model, tx, config_lib.supernet_recipe(config), run.mesh)
  state = train_steps.TrainState.create(variables, tx, with_ema=True)
  grads, batch_stats, loss = fns.route_grad(
      state.params, state.batch_stats, next(run.batches(0)), None, run.step_key(0, 0),
      fns.zeros(state.params), route=run.table.largest)
  state = fns.update(state, grads, batch_stats)
  print(f'bfloat16 loss of the largest route: {float(loss):.4f}')
  assert np.isfinite(loss) and loss > 0
  floats = {x.dtype for x in jax.tree.leaves((state, grads))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert floats == {jnp.dtype(jnp.float32)}
  assert not leaves_equal(state.params, variables['params'])
  assert not leaves_equal(state.batch_stats, variables['batch_stats'])


@pytest.mark.parametrize('key, value, message', [
    ('supernet.lr', 0.1, "unknown config key 'supernet.lr'"),
    ('batch_size', 'big', "'batch_size'"),  # ConfigDict's own type check names it.
    ('stages', ('gate', 'supernet'), 'stages='),
    ('stages', ('supernet', 'supernet'), 'each stage once'),  # Stage I twice: refused.
    ('stages', (), 'stages='),
    ('stages', ('gate',), 'starts at gate, but .* has no finished supernet or recalibrate stage'),
    ('stages', ('recalibrate', 'gate'), 'would start from a randomly initialised supernet'),
    ('gate.steps', 0, r'gate.steps=0 and gate.epochs=0.0: set one > 0'),
    ('supernet.epochs', -1.0, 'supernet.epochs must be finite and >= 0, got -1.0'),
    ('model.widths', (1, 2), 'unknown config key model.widths'),
    ('model.dtype', 'float16', "model.dtype='float16': use one of 'float32', 'bfloat16'"),
    ('data.dirr', 'x', 'unknown config key data.dirr'),
    ('supernet.epochs', float('nan'), 'supernet.epochs must be finite and >= 0, got nan'),
    ('supernet.optimizer.lr_batch_size', -256, 'lr_batch_size must be finite and >= 0'),
    ('recalibrate.examples', -5, 'recalibrate.examples must be finite and >= 0'),
    ('model.group_depths', ('abc',), r"model.group_depths=\('abc',\): must be tuple\[int, ...\]"),
    ('model.group_depths', (1, 1), 'group_widths: one entry per group each'),
])
def test_bad_config_fails_before_training_naming_the_key(tmp_path, key, value, message):
  with pytest.raises((errors.ConfigError, TypeError), match=message):
    train_lib.train_and_evaluate(tiny_config(**{key: value}), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_several_processes_need_every_device_and_a_calibration_split_is_checked_first():
  config = tiny_config(num_devices=1)
  config_lib.validate_devices(config, 1, num_processes=1)
  with pytest.raises(errors.ConfigError, match='with 2 processes the mesh must hold every'):
    config_lib.validate_devices(config, 2, num_processes=2)
  # The held-out calibration split is the error, not the epochs it leaves too few of.
  config = tiny_config(**{'gate.budget': 0.4, 'gate.steps': 0, 'gate.epochs': 1.0,
                          'gate.calibration_examples': 5000})
  with pytest.raises(errors.ConfigError, match='calibration_examples=5000 leaves fewer'):
    config_lib.resolve_config(config)


def test_missing_data_directory_fails_at_once(tmp_path):
  config = tiny_config()
  config.data = dict(name='fashion_mnist', debian_dir=str(tmp_path / 'nope'),
                     data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not os.path.exists(tmp_path / 'work')


@pytest.mark.slow
def test_mvco_averages_the_teacher_over_two_views_and_trains_on_both():
  config = tiny_config(num_devices=1)
  config.supernet.mvco = True
  run_model = get_model(config.model_name, **config.model)
  key = jax.random.key(0)
  v1, v2 = jax.random.normal(key, (2, 4, 16, 16, 1))
  variables = run_model.init(key, v1, route='largest')
  variables = {k: variables[k] for k in ('params', 'batch_stats')}
  batch = {'image': v1, 'image_view1': v2, 'label': jnp.array([0, 1, 2, 3])}
  tx = optim.make_optimizer(config.supernet.optimizer, 4, variables['params'])
  fns = train_steps.SupernetFunctions(run_model, tx, config_lib.supernet_recipe(config),
                                      sharding.make_mesh(1))
  teacher = fns.teacher(variables, batch, route='largest')
  probs = [jax.nn.softmax(run_model.apply(variables, v, route='largest')) for v in (v1, v2)]
  np.testing.assert_allclose(teacher, (probs[0] + probs[1]) / 2, rtol=1e-5, atol=1e-7)

  zeros = jax.tree.map(jnp.zeros_like, variables['params'])
  _, _, loss = fns.route_grad(variables['params'], variables['batch_stats'], batch, teacher,
                              key, zeros, route=run_model.routes[1])
  logits, _ = run_model.apply(variables, jnp.concatenate([v1, v2]), route=1, train=True,
                              mutable=['batch_stats'])
  per_view = [-(teacher * jax.nn.log_softmax(l)).sum(-1).mean() for l in (logits[:4], logits[4:])]
  np.testing.assert_allclose(loss, (per_view[0] + per_view[1]) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match='data.views = 2'):
    fns.teacher(variables, {'image': v1}, route='largest')


def test_later_stages_never_see_mixed_images_or_second_views(tmp_path):
  """With mixup, cutmix and two views for the supernet, recalibration and the gate train on
  the same augmented images as an unmixed single-view config, and nothing else is sent."""
  mixed = tiny_config(num_devices=1, **{'supernet.mvco': True})
  mixed.data.update(dict(mixup_alpha=0.8, cutmix_alpha=1.0, views=2))
  plain = tiny_config(num_devices=1)
  run, reference = (train_lib.make_run(c, str(tmp_path / str(i)))
                    for i, c in enumerate((mixed, plain)))
  supernet_batch = next(run.batches(0))
  assert {'label_probs', 'image_view1'} <= set(supernet_batch)
  for stage in ('recalibrate', 'gate'):
    batch, expected = next(run.batches(3, stage)), next(reference.batches(3, 'supernet'))
    assert set(batch) == {'image', 'label'}, stage
    np.testing.assert_array_equal(batch['image'], expected['image'])
    np.testing.assert_array_equal(batch['label'], expected['label'])


def test_without_bootstrapping_or_alone_a_route_learns_the_labels():
  """supernet.inplace_bootstrapping=False: a smaller route's loss and gradients are those of
  the smoothed labels as soft targets; supernet.train_route: a step trains that route alone."""
  config = tiny_config(num_devices=1, **{'supernet.inplace_bootstrapping': False})
  model = get_model(config.model_name, **config.model)
  key = jax.random.key(0)
  images = jax.random.normal(key, (4, 16, 16, 1))
  labels = jnp.array([0, 1, 2, 3])
  variables = model.init(key, images, route='largest')
  variables = {k: variables[k] for k in ('params', 'batch_stats')}
  batch = {'image': images, 'label': labels}
  tx = optim.make_optimizer(config.supernet.optimizer, 4, variables['params'])
  fns = train_steps.SupernetFunctions(model, tx, config_lib.supernet_recipe(config),
                                      sharding.make_mesh(1))
  zeros = lambda: jax.tree.map(jnp.zeros_like, variables['params'])
  route = model.routes[1]
  grads, _, loss = fns.route_grad(variables['params'], variables['batch_stats'], batch, None,
                                  key, zeros(), route=route)
  smoothed = optax.smooth_labels(jax.nn.one_hot(labels, 4), config.supernet.label_smoothing)
  soft_grads, _, soft_loss = fns.route_grad(variables['params'], variables['batch_stats'],
                                            batch, smoothed, key, zeros(), route=route)
  np.testing.assert_allclose(loss, soft_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(soft_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)

  config.supernet.train_route = '2'
  alone = train_steps.SupernetFunctions(model, tx, config_lib.supernet_recipe(config),
                                        sharding.make_mesh(1))
  step_key = jax.random.key(7)
  _, _, want = alone.route_grad(variables['params'], variables['batch_stats'], batch, None,
                                jax.random.fold_in(step_key, 0), zeros(),
                                route=model.routes['2'])
  state = train_steps.TrainState.create(jax.tree.map(jnp.copy, variables), tx, with_ema=True)
  _, metrics = alone.step(state, batch, model.routes, 0, 0, step_key)
  assert set(metrics) == {'loss_2', 'loss'}
  np.testing.assert_allclose(metrics['loss_2'], want, rtol=1e-6)


@pytest.mark.parametrize('key, value, message', [
    ('supernet.train_route', '9', "train_route='9': not a route of this model"),
    ('supernet.ensemble_ib', True, 'ensemble_ib needs supernet.inplace_bootstrapping'),
])
def test_bad_stage_one_variants_fail_before_training(tmp_path, key, value, message):
  config = tiny_config(**{key: value, 'supernet.inplace_bootstrapping': False})
  with pytest.raises(errors.ConfigError, match=message):
    train_lib.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize('overrides, message', [
    ({'gate.budget': 0.2}, r'outside what the routing space \[.0., .1., .2.\] can spend'),
    ({'gate.budget': 2.0}, 'at most 1'),
    ({'gate.budget': 0.5, 'gate.madds_target': 1e5}, 'both set'),
    ({'gate.budget': 0.5, 'gate.budget_unit': 'ms'}, "budget_unit='ms'"),
    ({'gate.budget': 0.5, 'gate.calibration_examples': 60}, 'fewer than one batch'),
    ({'gate.sgs_targets': 'largest'}, "sgs_targets='largest'"),
    ({'gate.budget': 0.5, 'gate.dual_lr': float('inf')}, 'dual_lr finite'),
    ({'gate.budget': 0.5, 'gate.dual_lr': float('nan')}, 'dual_lr finite'),
    ({'model.routing_space': ('auto',)}, "routing_space='auto' needs gate.budget"),
])
def test_an_unusable_budget_fails_before_any_work(tmp_path, overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    train_lib.train_and_evaluate(tiny_config(**overrides), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
