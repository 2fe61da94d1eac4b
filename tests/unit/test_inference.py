"""Routed inference: routed == each example alone through its route, order, bounded compiles."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checks
from dsnet_jax import bn_calibration, errors, inference, stand_in
from dsnet_jax.models import ds_mbnet, get_model
from dsnet_jax.errors import UnknownRouteError

IMAGE = (32, 32, 3)
LADDER = (1, 4)


def images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *IMAGE)).astype(np.float32)


@pytest.fixture(scope='module')
def setup():
  model = ds_mbnet.Model(num_classes=10)
  variables = stand_in.random_variables(model, IMAGE)
  # Statistics of real activations, so that outputs and gate choices depend on the input.
  variables = bn_calibration.calibrate_to_batch(model, variables, images(8),
                                                [0, 1, 2, 3, 'largest'])
  # Accelerator-like costs (a call of 4 costs less than three of 1), so that groups of 3
  # are padded to 4 and groups of 2 split into 1 + 1, whatever this machine measures.
  flat = {1: 1.0, 4: 2.5}
  costs = {name: flat for name in ['prefix', 'route/largest', 'route/2'] + [
      f'suffix/{r.name}' for r in model.routes.routing_space]}
  predictor = inference.RoutedPredictor(model, variables, IMAGE, ladder=LADDER,
                                        chunk_costs=costs).warmup(measure=False)
  alone = jax.jit(lambda v, x, route: model.apply(v, x, route=route), static_argnames='route')
  return model, variables, predictor, alone


def cheapest_by_enumeration(n, costs, max_rows=None):
  """Reference for plan_chunks: the least cost over every multiset of full chunks plus at most
  one padded chunk, found by exhaustive search."""
  sizes = sorted(costs)
  best = float('inf')

  def search(left, cost, rows, smallest):
    nonlocal best
    if left == 0:
      best = min(best, cost)
      return
    for s in sizes:
      if s >= left and (max_rows is None or rows + s <= max_rows):
        best = min(best, cost + costs[s])  # the padded (or exactly filled) last chunk
      if s < left and s <= smallest:
        search(left - s, cost + costs[s], rows + s, s)
  search(n, 0.0, 0, max(sizes))
  return best


def test_plan_chunks_is_the_cheapest_cut():
  ladder = inference.powers_of_two(256)
  assert ladder == (1, 2, 4, 8, 16, 32, 64, 128, 256)
  assert inference.powers_of_two(48) == (1, 2, 4, 8, 16, 32, 48)
  linear = inference.linear_costs(ladder)  # Before measuring: no padding, fewest chunks.
  assert inference.plan_chunks(37, linear) == [(32, 32), (4, 4), (1, 1)]
  assert inference.plan_chunks(300, linear) == [(256, 256), (32, 32), (8, 8), (4, 4)]
  # CPU-like: per-image time least at 8 (activations beyond it leave the cache).
  cpu = {s: s * (1.0 if s <= 8 else 1.0 + 0.02 * s) for s in ladder}
  assert inference.plan_chunks(64, cpu) == [(8, 8)] * 8
  # Accelerator-like: a call costs nearly the same at any size, so padding wins.
  flat = {s: 1.0 + 0.01 * s for s in ladder}
  assert inference.plan_chunks(37, flat) == [(64, 37)]
  assert inference.plan_chunks(37, flat, max_rows=40) == [(8, 8), (32, 29)]
  rng = np.random.default_rng(0)
  for trial in range(60):
    sizes = sorted(rng.choice([1, 2, 3, 4, 6, 8, 12], size=rng.integers(1, 5), replace=False))
    costs = {int(s): float(rng.uniform(0.2, 2.0) * s ** rng.uniform(0.3, 1.3)) for s in sizes}
    n = int(rng.integers(1, 30))
    max_rows = None if trial % 2 else n + int(rng.integers(0, max(sizes)))
    try:
      plan = inference.plan_chunks(n, costs, max_rows)
    except ValueError:
      assert cheapest_by_enumeration(n, costs, max_rows) == float('inf')
      continue
    assert sum(valid for _, valid in plan) == n
    assert all(size == valid for size, valid in plan[:-1])
    assert 1 <= plan[-1][1] <= plan[-1][0]
    if max_rows is not None:
      assert sum(size for size, _ in plan) <= max_rows
    assert sum(costs[size] for size, _ in plan) == pytest.approx(
        cheapest_by_enumeration(n, costs, max_rows))


def test_routed_equals_each_example_alone(setup):
  model, variables, predictor, alone = setup
  x = images(8)
  logits, routes = predictor.predict(x)
  _, gate_logits = model.apply(variables, x, method='prefix')
  np.testing.assert_array_equal(routes, np.argmax(gate_logits, -1))
  print('gate routes:', routes)
  assert len(set(routes.tolist())) > 1  # The gate mixes routes on these inputs.
  for i, r in enumerate(routes):
    expected = alone(variables, x[i:i + 1], route=model.routes.routing_space[r])
    checks.assert_close(logits[i], expected[0])
  assert np.asarray(logits).std(0).mean() > 0.1  # Outputs depend on the input.


def test_forced_route_mix_keeps_input_order(setup):
  model, variables, predictor, alone = setup
  x = images(8)[1:]  # The calibration images: well-scaled logits.
  forced = np.array([3, 0, 2, 1, 1, 3, 0])
  logits, routes = predictor.predict(x, routing_indices=forced)
  np.testing.assert_array_equal(routes, forced)
  for i, r in enumerate(forced):
    checks.assert_close(logits[i], alone(variables, x[i:i + 1], route=int(r))[0])
  perm = np.random.default_rng(0).permutation(7)
  permuted, _ = predictor.predict(x[perm], routing_indices=forced[perm])
  checks.assert_close(permuted, np.asarray(logits)[perm])
  # JAX inputs take the same path.
  on_device, _ = predictor.predict(jnp.asarray(x), routing_indices=forced)
  checks.assert_close(on_device, logits)


def test_a_bfloat16_model_routes_like_its_masked_path():
  """A bfloat16 model (the training tests' tiny DS-MBNet) in the predictor: float32 images in,
  the hidden buffer in bfloat16, float32 logits equal to the masked path's per-example routes
  within bfloat16 tolerance; the gate's choices are the masked path's argmax. One ladder size
  and stand-in variables keep it to five compiles."""
  config = checks.tiny_config()
  model = get_model(config.model_name, **{**config.model, 'dtype': 'bfloat16'})
  shape = (16, 16, 1)
  variables = stand_in.random_variables(model, shape)
  x = np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32)
  checks.assert_float32_where_it_matters(model, variables, jnp.asarray(x))
  predictor = inference.RoutedPredictor(model, variables, shape, ladder=(8,))
  assert predictor.dtype == jnp.float32
  assert {b.dtype for b in jax.tree.leaves(predictor._buffer_spec())} == {jnp.dtype(jnp.bfloat16)}
  forced = np.array([2, 0, 1, 1, 0, 2, 2, 0])
  logits, _ = predictor.predict(x, routing_indices=forced)
  masked, routing_logits, _ = jax.jit(lambda v, x: model.apply_gated(
      v, x, lambda l: jax.nn.one_hot(forced, l.shape[-1], dtype=l.dtype)))(variables, x)
  assert logits.dtype == masked.dtype == routing_logits.dtype == jnp.float32
  scale = float(np.abs(np.asarray(masked)).max())
  error = float(np.abs(np.asarray(logits) - np.asarray(masked)).max())
  print(f'bfloat16 |routed - masked| {error:.2e} of logit scale {scale:.3g}')
  assert error <= checks.tolerance(jnp.bfloat16, scale)
  assert np.asarray(masked).std(0).mean() > 1e-3 * scale  # Not one output for every input.
  _, routes = predictor.predict(x)
  np.testing.assert_array_equal(routes, np.argmax(routing_logits, -1))


def test_compiles_are_bounded(setup):
  model, _, predictor, _ = setup
  num_routes = len(model.routes.routing_space)
  kinds = [key[0] for key in predictor.compiled]
  assert kinds.count('prefix') == len(LADDER)
  assert kinds.count('suffix') == num_routes * len(LADDER)
  before = set(predictor.compiled)
  rng = np.random.default_rng(2)
  calls = [(n, rng.integers(0, num_routes, n)) for n in (9, 3, 5, 1, 2, 6)]
  for n, forced in calls:
    predictor.predict(images(n), routing_indices=forced)
  predictor.predict(images(5))
  new = set(predictor.compiled) - before
  # After warmup only copy-outs of pass sizes off the ladder (2, 3) may still compile.
  assert new <= {('copy_out', None, 2), ('copy_out', None, 3)}, new
  count = predictor.num_compiles
  for n, forced in calls:
    predictor.predict(images(n, seed=5), routing_indices=forced[::-1])
  assert predictor.num_compiles == count
  assert count <= (num_routes + 2) * len(LADDER) + 1 + max(LADDER)


def test_warmup_times_each_program_and_plans_follow_the_costs(setup):
  model, variables, predictor, _ = setup
  names = {'prefix', 'route/largest'} | {f'suffix/{r.name}' for r in model.routes.routing_space}
  measuring = inference.RoutedPredictor(model, variables, IMAGE, ladder=LADDER)
  measuring.compiled = dict(predictor.compiled)  # The same programs, not compiled again.
  measuring.warmup(routes=['largest'], batch_one=False)
  assert set(measuring.chunk_costs) == names
  for costs in measuring.chunk_costs.values():
    assert sorted(costs) == list(LADDER) and min(costs.values()) > 0
  # Plans follow the costs: flat ones pad 3 to 4, steep ones never run a chunk of 4.
  assert predictor.plan('suffix/0', 3) == [(4, 3)] and predictor.plan('prefix', 2) == [(1, 1)] * 2
  measuring.chunk_costs = {name: {1: 1.0, 4: 10.0} for name in names}
  measuring.warmup(routes=['largest'], batch_one=False)  # Nothing left to measure.
  assert measuring.chunk_costs['prefix'] == {1: 1.0, 4: 10.0}
  assert measuring.plan('suffix/0', 6) == [(1, 1)] * 6
  x = images(6)
  np.testing.assert_array_equal(measuring.predict(x)[1], predictor.predict(x)[1])
  checks.assert_close(measuring.predict(x)[0], predictor.predict(x)[0])


def test_predict_one_and_predict_route(setup):
  model, variables, predictor, alone = setup
  x = images(8)[2:5]
  logits, routes = predictor.predict(x)
  for i in range(3):
    one, route = predictor.predict_one(x[i])
    assert int(route) == routes[i]
    checks.assert_close(one, logits[i])
    forced, route = predictor.predict_one(x[i], routing_index=2)
    assert int(route) == 2
    checks.assert_close(forced, alone(variables, x[i:i + 1], route=2)[0])
  for route in ('largest', 2):
    checks.assert_close(predictor.predict_route(x, route), alone(variables, x, route=route))


def test_clear_errors(setup):
  model, variables, predictor, _ = setup
  with pytest.raises(UnknownRouteError, match=r'unknown route 14; valid routes: 0, .*, largest'):
    predictor.predict_route(images(1), 14)
  with pytest.raises(ValueError, match=r'forced routing indices need 2 integers in \[0, 4\)'):
    predictor.predict(images(2), routing_indices=[0, 4])
  # A fractional index is refused, not truncated (1.7 used to route as 1).
  with pytest.raises(ValueError, match=r'need 4 integers in \[0, 4\), got \[0.0, 1.7, 2.0, 0.0\]'):
    predictor.predict(images(4), routing_indices=[0, 1.7, 2, 0])
  with pytest.raises(ValueError, match='need 2 integers'):
    predictor.predict(images(2), routing_indices=[True, False])
  # Whole floats are indices; a Python list of images is an array of them.
  x = images(2)
  forced, _ = predictor.predict(list(x), routing_indices=np.array([1.0, 0.0]))
  np.testing.assert_array_equal(forced, predictor.predict(x, routing_indices=[1, 0])[0])
  with pytest.raises(ValueError, match=r'images must be \(n, 32, 32, 3\)'):
    predictor.predict(np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(errors.NotGatedError, match='Dense is not a gated model.*routing space'):
    inference.RoutedPredictor(nn.Dense(3), {}, IMAGE)

  class RoutesOnly(nn.Module):
    routes = model.routes

    def __call__(self, x, route):
      return x
  with pytest.raises(errors.NotGatedError, match='no prefix / suffix method'):
    inference.RoutedPredictor(RoutesOnly(), {}, IMAGE)


@pytest.mark.parametrize('image, message', [
    (np.zeros((3, 32, 32), np.float32), r'\(1, 3, 32, 32\); it looks channels-first'),
    (np.zeros((32, 32, 3), np.uint8), 'must be floating point'),
    (np.zeros((2, 32, 32, 3), np.float32), 'takes one image, got a batch of 2'),
    (np.zeros((32, 3), np.float32), r'must be \(batch, H, W, 3\)'),
])
def test_predict_one_checks_the_image_instead_of_reshaping_it(setup, image, message):
  _, _, predictor, _ = setup
  with pytest.raises(ValueError, match=message):
    predictor.predict_one(image)


@pytest.mark.parametrize('entry', ['predict', 'predict_route', 'apply', 'masked', 'prefix'])
def test_every_entry_point_refuses_channels_first_and_integer_images(setup, entry):
  model, variables, predictor, _ = setup
  onehot = jax.nn.one_hot(jnp.zeros(2, int), 4)
  call = {'predict': predictor.predict,
          'predict_route': lambda x: predictor.predict_route(x, 1),
          'apply': lambda x: model.apply(variables, x, route=1),
          'masked': lambda x: model.apply(variables, x, onehot, method=model.masked),
          'prefix': lambda x: model.apply_prefix(variables, x)}[entry]
  with pytest.raises(ValueError, match='channels-first'):
    call(np.zeros((2, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match='floating point'):
    call(np.zeros((2, 32, 32, 3), np.uint8))
