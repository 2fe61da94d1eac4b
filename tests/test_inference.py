"""Routed inference: routed == each example alone through its route, order, bounded compiles."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsnet_jax import bn_calibration, inference, stand_in
from dsnet_jax.models import ds_mbnet
from dsnet_jax.routes import UnknownRouteError

IMAGE = (32, 32, 3)
LADDER = (1, 4)  # Small, yet it exercises padding (3 -> 4) and splitting (2 -> 1 + 1).


def assert_close(actual, expected):
  """Within 1e-5 of the logits' scale: the routed and the reference programs differ in batch
  size and fusion, so float32 rounding differs."""
  expected = np.asarray(expected)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *IMAGE)).astype(np.float32)


@pytest.fixture(scope='module')
def setup():
  model = ds_mbnet.Model(num_classes=10)
  variables = stand_in.random_variables(model, IMAGE)
  # Statistics of real activations, so that outputs and gate choices depend on the input.
  variables = bn_calibration.calibrate_to_batch(model, variables, images(8),
                                                [0, 1, 2, 3, 'largest'])
  predictor = inference.RoutedPredictor(model, variables, IMAGE, ladder=LADDER,
                                          max_padding=0.25).warmup()
  alone = jax.jit(lambda v, x, route: model.apply(v, x, route=route), static_argnames='route')
  return model, variables, predictor, alone


def test_plan_chunks():
  ladder = inference.powers_of_two(256)
  assert ladder == (1, 2, 4, 8, 16, 32, 64, 128, 256)
  assert inference.powers_of_two(48) == (1, 2, 4, 8, 16, 32, 48)
  assert inference.plan_chunks(37, ladder) == [(32, 32), (4, 4), (1, 1)]
  assert inference.plan_chunks(30, ladder) == [(32, 30)]
  assert inference.plan_chunks(300, ladder) == [(256, 256), (32, 32), (16, 12)]
  assert inference.plan_chunks(7, LADDER) == [(4, 4), (4, 3)]
  for n in range(1, 600):
    plan = inference.plan_chunks(n, ladder)
    assert sum(valid for _, valid in plan) == n
    assert all(size in ladder and size == valid for size, valid in plan[:-1])
    size, valid = plan[-1]
    assert size in ladder and (size - valid) <= 0.25 * size


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
    assert_close(logits[i], expected[0])
  assert np.asarray(logits).std(0).mean() > 0.1  # Outputs depend on the input.


def test_forced_route_mix_keeps_input_order(setup):
  model, variables, predictor, alone = setup
  x = images(8)[1:]  # The calibration images: well-scaled logits.
  forced = np.array([3, 0, 2, 1, 1, 3, 0])
  logits, routes = predictor.predict(x, routing_indices=forced)
  np.testing.assert_array_equal(routes, forced)
  for i, r in enumerate(forced):
    assert_close(logits[i], alone(variables, x[i:i + 1], route=int(r))[0])
  perm = np.random.default_rng(0).permutation(7)
  permuted, _ = predictor.predict(x[perm], routing_indices=forced[perm])
  assert_close(permuted, np.asarray(logits)[perm])
  # JAX inputs take the same path.
  on_device, _ = predictor.predict(jnp.asarray(x), routing_indices=forced)
  assert_close(on_device, logits)


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


def test_predict_one_and_predict_route(setup):
  model, variables, predictor, alone = setup
  x = images(8)[2:5]
  logits, routes = predictor.predict(x)
  for i in range(3):
    one, route = predictor.predict_one(x[i])
    assert int(route) == routes[i]
    assert_close(one, logits[i])
    forced, route = predictor.predict_one(x[i], routing_index=2)
    assert int(route) == 2
    assert_close(forced, alone(variables, x[i:i + 1], route=2)[0])
  for route in ('largest', 2):
    assert_close(predictor.predict_route(x, route), alone(variables, x, route=route))


def test_clear_errors(setup):
  model, variables, predictor, _ = setup
  with pytest.raises(UnknownRouteError, match=r'unknown route 14; valid routes: 0, .*, largest'):
    predictor.predict_route(images(1), 14)
  with pytest.raises(ValueError, match=r'forced routing indices need 2 values in \[0, 4\)'):
    predictor.predict(images(2), routing_indices=[0, 4])
  with pytest.raises(ValueError, match=r'images must be \(n, 32, 32, 3\)'):
    predictor.predict(np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(inference.NotGatedError, match='Dense is not a gated model.*routing space'):
    inference.RoutedPredictor(nn.Dense(3), {}, IMAGE)

  class RoutesOnly(nn.Module):
    routes = model.routes

    def __call__(self, x, route):
      return x
  with pytest.raises(inference.NotGatedError, match='no prefix / suffix method'):
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
