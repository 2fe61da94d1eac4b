"""What each router buys: per-image signals equal to the routes run alone, the static curve
and best mix, escalation and its oracle by hand, AUROC of the cheapest route's errors."""
import jax
import numpy as np
import pytest

import checks
from dsnet_jax import escalation, routers, sharding
from dsnet_jax.data import input_pipeline
from dsnet_jax.models import get_model


def test_static_accuracy_is_interpolated_between_the_neighbouring_routes():
  rows = [{'route': 'largest', 'madds': 4e6, 'accuracy': 0.95},
          {'route': '0', 'madds': 1e6, 'accuracy': 0.80},
          {'route': '1', 'madds': 2e6, 'accuracy': 0.90}]
  assert routers.static_accuracy_at(rows, 1.5e6) == pytest.approx(0.85)
  assert routers.static_accuracy_at(rows, 3.5e6) == pytest.approx(0.9375)
  assert routers.static_accuracy_at(rows, 0.5e6) == pytest.approx(0.80)
  result = routers.against_static(rows, 0.88, 1.5e6)
  assert result['gain'] == pytest.approx(0.03)
  # At 1.5 M the neighbours 0 and 1 are the best mix; a route 2 below the chord from 1 to
  # 'largest' lowers the interpolation at 2.5 M but not the best mix (1 with 'largest').
  assert routers.best_static_mix_at(rows, 1.5e6) == pytest.approx(0.85)
  dip = rows + [{'route': '2', 'madds': 3e6, 'accuracy': 0.85}]  # Below the chord 1-largest.
  assert routers.static_accuracy_at(dip, 2.5e6) == pytest.approx(0.875)
  assert routers.best_static_mix_at(dip, 2.5e6) == pytest.approx(0.90 + 0.5 / 2 * 0.05)
  assert result['best_static_mix'] == pytest.approx(0.85)
  assert result['gain_over_mix'] == pytest.approx(0.03)




SPACE = ('0', '1', '2')
# Six images: what each routing-space route gets right, and its max-softmax confidence.
SIGNALS = {
    'correct': np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]], bool),
    'max_softmax': np.array([[.9, .9, .95], [.3, .6, .7], [.4, .5, .8], [.8, .9, .9],
                             [.2, .3, .4], [.6, .7, .9]]),
    'gate': np.array([.1, .9, .2, .3, .8, .4])}
SIGNALS['margin'] = SIGNALS['max_softmax'] / 2
ROWS = [{'route': '0', 'madds': 1e6, 'accuracy': 0.5}, {'route': '2', 'madds': 3e6,
                                                        'accuracy': 5 / 6}]


def test_escalation_and_its_oracle_by_hand():
  costs = np.array([1e6, 3e6])
  rule = escalation.Escalation(('0', '2'), (0.5,), budget=2e6)
  result = routers.escalation_result(SIGNALS, SPACE, rule, costs, ROWS)
  # Images 1, 2 and 4 (confidence under 0.5 at route 0) escalate; 1 and 2 become right.
  assert result['stops'] == {'0': 3, '2': 3}
  assert result['accuracy'] == pytest.approx(5 / 6) and result['madds'] == pytest.approx(2e6)
  assert result['gain'] == pytest.approx(5 / 6 - (0.5 + 0.5 * (5 / 6 - 0.5)))
  oracle = routers.oracle(SIGNALS, SPACE, ('0', '2'), costs)
  assert oracle == {'accuracy': pytest.approx(5 / 6), 'madds': pytest.approx(1e6 + 2 / 6 * 2e6)}
  curve = routers.escalation_curve(SIGNALS, SPACE, ('0', '2'), 'max_softmax', costs, points=3)
  assert [p['madds'] for p in curve] == pytest.approx([1e6, 2e6, 3e6])
  assert [p['accuracy'] for p in curve] == pytest.approx([0.5, 5 / 6, 5 / 6])


def test_auroc_of_the_cheapest_routes_errors():
  auroc = routers.error_auroc(SIGNALS, gated=True)
  # Route 0 is wrong on images 1, 2, 4; its confidence ranks all three below the rest.
  assert auroc['max_softmax'] == auroc['margin'] == 1.0
  # The gate's scores: wrong (.9, .2, .8) against right (.1, .3, .4): 7 of 9 pairs ordered.
  assert auroc['gate'] == pytest.approx(7 / 9)
  assert 'gate' not in routers.error_auroc(SIGNALS, gated=False)


def test_route_signals_are_the_routes_run_alone():
  config = checks.tiny_config()
  model = get_model(config.model_name, **config.model)
  variables = model.init_variables(jax.random.key(0), (16, 16, 1))
  data = input_pipeline.DataSpec(name='synthetic', image_size=16, channels=1, num_classes=4,
                                 synthetic_num_examples=20)
  pipeline = input_pipeline.make(data, 'test', batch_size=8, train=False)  # Pads the last.
  signals = routers.route_signals(model, variables, pipeline, sharding.make_mesh(1))
  batches = list(pipeline.batches())
  images = np.concatenate([b['image'][b['mask'].astype(bool)] for b in batches])
  labels = np.concatenate([b['label'][b['mask'].astype(bool)] for b in batches])
  assert signals['correct'].shape == (20, 3)
  for i, route in enumerate(model.routes.routing_space):
    logits = model.apply(variables, images, route=route)
    np.testing.assert_array_equal(signals['correct'][:, i], np.argmax(logits, -1) == labels)
    probs = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_allclose(signals['max_softmax'][:, i], probs.max(-1), rtol=1e-5)
    top2 = np.sort(probs, -1)[:, -2:]
    np.testing.assert_allclose(signals['margin'][:, i], top2[:, 1] - top2[:, 0], rtol=1e-4,
                               atol=1e-6)
  _, routing_logits = model.apply_prefix(variables, images)
  np.testing.assert_allclose(signals['gate'],
                             1 - np.asarray(jax.nn.softmax(routing_logits))[:, 0], rtol=1e-5)
