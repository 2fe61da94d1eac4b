"""The gate's compute budget: its MAdds, the dual ascent, the argmax offset calibration and
the comparison with the static routes (dsnet_jax.budget, eval_lib)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsnet_jax import budget, config_lib, errors, optim, train_steps
from dsnet_jax.complexity import route_complexity
from dsnet_jax.models import get_model
from checks import tiny_config

IMAGE_SHAPE = (16, 16, 1)


def synthetic_routing_logits(n, seed):
  """Logits of 4 routes whose preferences vary by example, as a trained gate's do."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, 4)) * 2.0 + np.array([1.0, 0.0, -0.5, 0.5])


@pytest.mark.parametrize('fraction', [0.1, 0.35, 0.6, 0.9])
def test_calibrated_offsets_land_the_argmax_cost_on_held_out_data(fraction):
  madds = np.array([1.0e6, 1.5e6, 2.2e6, 3.0e6])
  target = madds[0] + fraction * (madds[-1] - madds[0])
  calibration, held_out = synthetic_routing_logits(4000, 0), synthetic_routing_logits(4000, 1)
  offsets = budget.calibrate_offsets(calibration, madds, target)
  # One price on compute: offsets linear in the routes' MAdds, 0 for the cheapest.
  relative = (madds - madds[0]) / target
  np.testing.assert_allclose(offsets, offsets[-1] / relative[-1] * relative, rtol=1e-5)
  assert abs(budget.routed_cost(held_out, madds, offsets) / target - 1) < 0.02
  # On the calibration set itself: as close as any price on a fine grid gets (brute force).
  grid = [abs(budget.routed_cost(calibration, madds, -p * relative) - target)
          for p in np.linspace(-20, 20, 4001)]
  achieved = abs(budget.routed_cost(calibration, madds, offsets) - target)
  assert achieved <= min(grid) + 1e-9


def test_routed_cost_is_the_mean_madds_of_the_argmax_routes():
  logits = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 0.5]])
  np.testing.assert_allclose(budget.routed_cost(logits, np.array([10.0, 30.0])),
                             (30 + 10 + 30) / 3)
  np.testing.assert_allclose(budget.routed_cost(logits, np.array([10.0, 30.0]),
                                                np.array([0.0, -0.8])), (30 + 10 + 10) / 3)


def test_budget_in_madds_from_a_fraction_of_the_largest_route():
  config = tiny_config(**{'gate.budget': 0.5})
  model = get_model(config.model_name, **config.model)
  largest = route_complexity(model, model.routes.largest, IMAGE_SHAPE).madds
  assert budget.budget_madds(config.gate, model, IMAGE_SHAPE) == 0.5 * largest
  config.gate.budget, config.gate.budget_unit = 60000.0, 'madds'
  assert budget.budget_madds(config.gate, model, IMAGE_SHAPE) == 60000.0
  config.gate.budget = 0.0
  assert budget.budget_madds(config.gate, model, IMAGE_SHAPE) == 0.0


def gate_steps(budget_fraction, steps):
  """Argmax cost and dual variable over `steps` budget-constrained gate steps on one batch."""
  # The untrained tiny supernet's routing features are ~1e-4: a large step makes up for it.
  config = tiny_config(num_devices=1, **{'gate.dual_lr': 2.0, 'gate.optimizer.lr': 3e3,
                                         'gate.optimizer.weight_decay': 0.0})
  model = get_model(config.model_name, **config.model)
  madds = model.routing_madds(IMAGE_SHAPE)
  target = madds[0] + budget_fraction * (madds[-1] - madds[0])
  variables = model.init_variables(jax.random.key(0), IMAGE_SHAPE)
  tx = optim.make_optimizer(config.gate.optimizer, steps, variables['params'])
  state = train_steps.GateState.create(variables, tx, with_ema=True)
  step = jax.jit(functools.partial(train_steps.gate_train_step, model, tx,
                                       config_lib.gate_recipe(config), target))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(32, *IMAGE_SHAPE)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 4, 32), jnp.int32)}
  costs, duals = [], [0.0]
  for i in range(steps):
    # The cost the dual step uses: argmax routing of the step's parameters, computed here.
    _, routing_logits = model.apply_prefix(state.variables, batch['image'])
    costs.append(float(madds[np.argmax(routing_logits, -1)].mean()))
    state, metrics = step(state, jnp.asarray(madds, jnp.float32), batch, jax.random.key(i))
    np.testing.assert_allclose(metrics['argmax_cost'], costs[-1], rtol=1e-6)
    duals.append(float(state.dual))
    span = madds.max() - madds.min()
    np.testing.assert_allclose(duals[-1], duals[-2] + 2.0 * (costs[-1] - target) / span,
                               rtol=1e-5, atol=1e-6)
  return target, costs, duals


@pytest.mark.parametrize('fraction', [0.0, 1.0])
def test_the_dual_variable_moves_the_cost_toward_the_budget(fraction):
  target, costs, duals = gate_steps(fraction, 25)
  first, last = abs(costs[0] - target), abs(costs[-1] - target)
  assert last < 0.5 * first, (target, costs)
  # Over budget the dual variable turns positive (a price on compute), under budget negative.
  assert np.sign(duals[5]) == (1 if costs[0] > target else -1)


def rows_of(*routes):
  return [{'route': name, 'accuracy': accuracy, 'cost': madds * 1e6}
          for name, accuracy, madds in routes]


def test_proposed_routing_space_follows_the_concave_hull_up_to_twice_the_budget():
  # The Fashion-MNIST DS-MBNet's routes as measured: 1 is below the chord 0-2, 3 and 5 are
  # less accurate than a cheaper route; 0, 2, 4, 6 form the hull.
  rows = rows_of(('0', .8405, .635), ('1', .8401, .789), ('2', .8456, .985),
                 ('3', .8445, 1.223), ('4', .8491, 1.502), ('5', .8474, 1.822),
                 ('6', .8537, 2.184))
  # Budget 0.794 M: 2 * 0.794 - 0.635 = 0.953 -> the hull up to route 2.
  assert budget.propose_routing_space(rows, 0.794e6) == ('0', '2')
  assert budget.propose_routing_space(rows, 1.059e6) == ('0', '2', '4')  # Reach 1.483 M.
  assert budget.propose_routing_space(rows, 1.456e6) == ('0', '2', '4', '6')  # Past the end.
  assert budget.propose_routing_space(rows, 1.456e6, max_routes=3) == ('0', '4', '6')
  # A budget above every hull route's cost still gets a route that can spend it.
  flat_top = rows_of(('0', .9, 1.0), ('1', .8, 2.0), ('2', .85, 3.0))
  assert budget.propose_routing_space(flat_top, 2.5e6) == ('0', '2')
  with pytest.raises(errors.BudgetError, match='outside'):
    budget.propose_routing_space(rows, 0.5e6)


def test_calibration_refuses_what_it_cannot_meet():
  logits = synthetic_routing_logits(100, 0)
  with pytest.raises(errors.BudgetError, match='outside what the routes can spend'):
    budget.calibrate_offsets(logits, np.array([1.0, 2.0, 3.0, 4.0]), 5.0)
  with pytest.raises(FloatingPointError, match='not all finite'):
    budget.calibrate_offsets(np.full((4, 4), np.nan), np.array([1.0, 2.0, 3.0, 4.0]), 2.0)


def test_auto_candidates_are_distinct_routes_sharing_the_prefix():
  # 'largest' runs the same widths as route '3' in every group: one candidate, not two.
  config = tiny_config(**{'model.stem_widths': (4, 4), 'model.group_widths': (
      (8, 8), (8, 8), (12, 12), (8, 12, 16, 20), (16, 20, 24, 28)), 'gate.budget': 0.5})
  model = get_model(config.model_name, **dict(config.model.to_dict(), routing_space=('auto',)))
  assert model.routes.auto
  assert [r.name for r in model.routes.routing_space] == ['0', '1', '2', '3']
