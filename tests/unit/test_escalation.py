"""Escalation routing: its cost per level by hand, calibration to a budget on held-out images,
the batched predictor equal to each image escalated alone, AUROC against a pair count."""
import itertools

import jax
import numpy as np
import pytest

import checks
from dsnet_jax import bn_calibration, errors, escalation, inference, stand_in
from dsnet_jax.complexity import prefix_complexity, route_complexity
from dsnet_jax.models import get_model

TINY_IMAGE = (16, 16, 1)


def tiny_model():
  config = checks.tiny_config()
  return get_model(config.model_name, **config.model)


def test_the_cost_of_each_level_is_the_hand_count():
  model = tiny_model()
  # The tiny DS-MBNet's prefix at 16x16x1 (routing-space widths: stem 4, groups 8, 8, 12), by
  # the reference convention: conv c_in*c_out*k*k*H*W/groups, a linear in*out, a global average
  # pool C*H*W; the SE's reduced width is round(0.25 * the block's widest input).
  stem = 1 * 4 * 9 * 16 * 16
  group0 = 4 * 9 * 256 + (4 * 256 + 4 * 2 + 2 * 4) + 4 * 8 * 256  # dw, SE, pw; stride 1.
  group1 = 8 * 9 * 64 + (8 * 64 + 8 * 3 + 3 * 8) + 8 * 8 * 64  # Stride 2: 8x8.
  group2 = 8 * 9 * 64 + (8 * 64 + 8 * 3 + 3 * 8) + 8 * 12 * 64
  gate = 12 * 9 * 16 + 12 * 16 + 12 * 4 + 4 * 12 + 4 * 3  # dw at 4x4, GAP, reduce, expand, routing.
  prefix = stem + group0 + group1 + group2 + gate
  assert prefix_complexity(model, TINY_IMAGE).madds == prefix == 50268
  chain = ('0', '2')
  with_gate = [route_complexity(model, r, TINY_IMAGE, with_gate=True).madds for r in chain]
  costs = escalation.level_costs(model, chain, TINY_IMAGE)
  # Stopping at route 0: that route with its gate; escalating: route 2's suffix on top.
  np.testing.assert_array_equal(costs, [with_gate[0], with_gate[0] + with_gate[1] - prefix])
  three = escalation.level_costs(model, ('0', '1', '2'), TINY_IMAGE)
  assert three[0] == costs[0] and three[2] - three[1] == costs[1] - costs[0]


def confidences_and_correctness(n, levels, seed):
  """Confidences that grow with the level, and correctness that follows confidence."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(0.2, 1.0, (n, 1))
  confidences = np.clip(base + 0.1 * np.arange(levels) + rng.normal(0, 0.05, (n, levels)), 0, 1)
  correct = rng.uniform(size=(n, levels)) < confidences
  return confidences, correct


@pytest.mark.parametrize('share', [0.0, 0.1, 0.37, 0.8, 1.0])
def test_two_levels_meet_the_budget_on_held_out_images(share):
  costs = np.array([1e6, 2.5e6])
  budget = costs[0] + share * (costs[1] - costs[0])
  confidences, correct = confidences_and_correctness(8000, 2, seed=1)
  fit, held_out = slice(0, 4000), slice(4000, None)
  thresholds = escalation.calibrate(confidences[fit], costs, budget)
  _, cost = escalation.simulate(correct[fit], confidences[fit], thresholds, costs)
  # On the images it was fitted on: at or below the budget, by at most one image's escalation.
  assert budget - (costs[1] - costs[0]) / 4000 - 1e-6 <= cost <= budget + 1e-6
  _, cost = escalation.simulate(correct[held_out], confidences[held_out], thresholds, costs)
  assert abs(cost - budget) <= 0.02 * budget
  # Exactly the least confident escalate.
  escalated = confidences[fit][:, 0] < thresholds[0]
  if escalated.any() and not escalated.all():
    assert confidences[fit][escalated, 0].max() < confidences[fit][~escalated, 0].min()


def test_three_levels_take_the_most_accurate_split_of_the_budget():
  costs = np.array([1.0, 2.0, 4.0])
  budget = 1.9
  confidences, correct = confidences_and_correctness(400, 3, seed=2)
  thresholds = escalation.calibrate(confidences, costs, budget, correct, grid=21)
  accuracy, cost = escalation.simulate(correct, confidences, thresholds, costs)
  assert cost <= budget
  # Brute force over every pair of thresholds at the confidences themselves (and 'always').
  candidates = [np.append(np.unique(confidences[:, k]), escalation.ALWAYS) for k in (0, 1)]
  best = max(a for a, c in (escalation.simulate(correct, confidences, pair, costs)
                            for pair in itertools.product(candidates[0][::8], candidates[1][::8]))
             if c <= budget)
  assert accuracy >= best - 0.01  # The grid's 21 shares against a coarser exhaustive search.
  with pytest.raises(ValueError, match="needs each level's correctness"):
    escalation.calibrate(confidences, costs, budget)


def test_a_budget_escalation_cannot_meet_is_refused():
  confidences, _ = confidences_and_correctness(10, 2, seed=0)
  for budget in (0.5e6, 3e6):
    with pytest.raises(errors.BudgetError, match='outside what escalation can spend: 1e'):
      escalation.calibrate(confidences, np.array([1e6, 2.5e6]), budget)


def test_a_chain_and_its_thresholds_must_fit():
  with pytest.raises(errors.ConfigError, match='two or more distinct routes'):
    escalation.Escalation(('0',), ())
  with pytest.raises(errors.ConfigError, match='3 routes need 2 thresholds'):
    escalation.Escalation(('0', '1', '2'), (0.5,))
  with pytest.raises(errors.ConfigError, match="confidence 'entropy'"):
    escalation.Escalation(('0', '1'), (0.5,), confidence='entropy')
  saved = escalation.Escalation(('0', '3'), (0.7,), 'margin', 1.2e6, 'madds')
  assert escalation.Escalation.from_json(saved.to_json()) == saved


def test_confidences_by_hand():
  logits = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], np.float32))
  np.testing.assert_allclose(escalation.confidence(logits), [0.7, 0.4], rtol=1e-6)
  np.testing.assert_allclose(escalation.confidence(logits, 'margin'), [0.5, 0.05], rtol=1e-5)


def test_auroc_is_the_share_of_ordered_pairs():
  rng = np.random.default_rng(3)
  scores = rng.integers(0, 5, 60).astype(float)  # Many ties.
  positives = rng.uniform(size=60) < 0.3
  pairs = [(p, q) for p in scores[positives] for q in scores[~positives]]
  expected = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
  assert escalation.auroc(scores, positives) == pytest.approx(expected, abs=1e-12)


IMAGE = (32, 32, 3)


@pytest.fixture(scope='module')
def predictor_setup():
  model = get_model('ds_mbnet', num_classes=10)
  x = np.random.default_rng(0).normal(size=(12, *IMAGE)).astype(np.float32)
  variables = stand_in.random_variables(model, IMAGE)
  variables = bn_calibration.calibrate_to_batch(model, variables, x[:8], [0, 1, 2, 3, 'largest'])
  alone = jax.jit(lambda v, x, route: model.apply(v, x, route=route), static_argnames='route')
  # Thresholds at the median confidence of each level, so every level keeps some images.
  chain = ('0', '1', '3')
  conf = np.stack([np.asarray(escalation.confidence(alone(variables, x, route=r))) for r in chain],
                  1)
  rule = escalation.Escalation(chain, tuple(np.median(conf[:, :2], 0)))
  return model, variables, alone, x, rule


def test_routed_predictor_escalates_each_image_as_alone(predictor_setup):
  model, variables, alone, x, rule = predictor_setup
  predictor = inference.RoutedPredictor(model, variables, IMAGE, ladder=(1, 4),
                                        escalation=rule).warmup(measure=False)
  logits, indices = predictor.predict(x)
  space = [r.name for r in model.routes.routing_space]
  stopped = []
  for i in range(len(x)):
    for level, route in enumerate(rule.chain):
      expected = alone(variables, x[i:i + 1], route=route)
      last = level == len(rule.chain) - 1
      if last or escalation.confidence(expected)[0] >= rule.thresholds[level]:
        break
    stopped.append(level)
    assert space[indices[i]] == route
    checks.assert_close(logits[i], expected[0])
    one, index = predictor.predict_one(x[i])
    assert int(index) == indices[i]
    checks.assert_close(one, expected[0])
  assert set(stopped) == {0, 1, 2}  # Every level decides some images.
  with pytest.raises(errors.ConfigError, match=r"routes \['9'\] are not in the routing space"):
    inference.RoutedPredictor(model, variables, IMAGE,
                              escalation=escalation.Escalation(('0', '9'), (0.5,)))
