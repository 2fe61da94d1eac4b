"""What each router buys, from one pass over evaluation images: every routing-space route's
correctness and confidence per image (`route_signals`); escalation at its thresholds, as a
curve over budgets and as an oracle; how well a signal ranks the cheapest route's errors
(AUROC); and the static routes' curve and best random mix of two routes they are compared
with."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax import escalation as escalation_lib
from dsnet_jax import sharding


@functools.partial(jax.jit, static_argnames='model')
def _signals(model, variables, batch):
  hidden, routing_logits = model.apply_prefix(variables, batch['image'])
  correct, confidences = [], {kind: [] for kind in escalation_lib.CONFIDENCES}
  for route in model.routes.routing_space:
    logits = model.apply_suffix(variables, hidden, route)
    correct.append(jnp.argmax(logits, -1) == batch['label'])
    for kind in escalation_lib.CONFIDENCES:
      confidences[kind].append(escalation_lib.confidence(logits, kind))
  # The gate's preference against the cheapest route (after calibrated offsets, if any).
  gate = 1.0 - jax.nn.softmax(routing_logits.astype(jnp.float32), -1)[:, 0]
  return {'correct': jnp.stack(correct, 1), 'gate': gate, 'mask': batch['mask'],
          **{kind: jnp.stack(c, 1) for kind, c in confidences.items()}}


def route_signals(model, variables, pipeline, mesh) -> dict[str, np.ndarray]:
  """Per evaluation image, in the split's order: 'correct' (n, R) bool, 'max_softmax' and
  'margin' (n, R) confidences, for each routing-space route on the shared prefix; 'gate' (n,)
  the gate's probability of not choosing the cheapest route."""
  parts = []
  for batch in pipeline.batches():
    out = _signals(model, variables, sharding.global_batch(batch, mesh))
    names = sorted(out)
    values = dict(zip(names, sharding.gather(*(out[k] for k in names))))
    keep = values.pop('mask').astype(bool)
    parts.append({k: v[keep] for k, v in values.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def static_accuracy_at(rows, madds: float) -> float:
  """Accuracy of the static routes' curve at `madds` per image: linear between the two routes
  around it (the accuracy of routing a random share of images to each, at that average cost),
  the nearest end's outside the curve. `rows`: {'accuracy', 'madds'} per route."""
  points = sorted((r['madds'], r['accuracy']) for r in rows)
  return float(np.interp(madds, [m for m, _ in points], [a for _, a in points]))


def best_static_mix_at(rows, madds: float) -> float:
  """The best accuracy any random mix of two static routes reaches at `madds` per image on
  average: the upper concave envelope of the static routes (>= `static_accuracy_at`; the
  nearest end's outside them)."""
  points = sorted((r['madds'], r['accuracy']) for r in rows)
  if madds <= points[0][0] or madds >= points[-1][0]:
    return static_accuracy_at(rows, madds)
  return max(a0 + (madds - m0) / (m1 - m0) * (a1 - a0)
             for m0, a0 in points for m1, a1 in points if m0 <= madds < m1)


def against_static(rows, accuracy: float, madds: float) -> dict[str, float]:
  """A router's accuracy at `madds` per image against the static curve and the best mix."""
  static, mix = static_accuracy_at(rows, madds), best_static_mix_at(rows, madds)
  return {'static_accuracy': static, 'gain': accuracy - static, 'best_static_mix': mix,
          'gain_over_mix': accuracy - mix}


def levels(signals, space: Sequence[str], chain: Sequence[str], kind: str):
  """(correct, confidences), each (n, len(chain)): the signals' columns of the chain's routes."""
  columns = [list(space).index(r) for r in chain]
  return signals['correct'][:, columns], signals[kind][:, columns]


def fit_escalation(signals, space: Sequence[str], candidates, confidence: str = 'max_softmax'
                   ) -> tuple[escalation_lib.Escalation, dict[tuple[str, ...], tuple[float, float]]]:
  """The most accurate of `candidates` ((chain, level costs, budget in MAdds), as
  `eval_lib.escalation_candidates` gives them) on these images, each calibrated to its budget
  (the fewest levels on a tie): (its rule, {chain: (accuracy, MAdds per image)} of every
  candidate)."""
  fitted, rules = {}, {}
  for chain, costs, madds in candidates:
    correct, confidences = levels(signals, space, chain, confidence)
    thresholds = escalation_lib.calibrate(confidences, costs, madds, correct)
    fitted[tuple(chain)] = escalation_lib.simulate(correct, confidences, thresholds, costs)
    rules[tuple(chain)] = escalation_lib.Escalation(tuple(chain), thresholds, confidence, madds,
                                                    'madds')
  best = max(fitted, key=lambda c: (fitted[c][0], -len(c)))
  return rules[best], fitted


def escalation_result(signals, space: Sequence[str], rule: escalation_lib.Escalation,
                      costs: np.ndarray, rows) -> dict[str, Any]:
  """Escalation with `rule`'s thresholds on these images: accuracy, MAdds per image (`costs`
  as `escalation.level_costs`), how many stop at each route, against the static routes."""
  correct, confidences = levels(signals, space, rule.chain, rule.confidence)
  accuracy, madds = escalation_lib.simulate(correct, confidences, rule.thresholds, costs)
  stops = escalation_lib.stop_levels(confidences, rule.thresholds)
  return {'chain': list(rule.chain), 'thresholds': list(rule.thresholds),
          'confidence': rule.confidence, 'accuracy': accuracy, 'madds': madds,
          'stops': {r: int((stops == k).sum()) for k, r in enumerate(rule.chain)},
          **({f'budget_{rule.budget_unit}': rule.budget} if rule.budget else {}),
          **against_static(rows, accuracy, madds)}


def escalation_curve(signals, space: Sequence[str], chain: Sequence[str], kind: str,
                     costs: np.ndarray, points: int = 21) -> list[dict[str, float]]:
  """Two-level escalation's accuracy and MAdds per image at `points` budgets from the first
  route's cost to the last's (thresholds fitted on these images: the trade-off it offers)."""
  correct, confidences = levels(signals, space, (chain[0], chain[-1]), kind)
  two = np.array([costs[0], costs[-1]])
  curve = []
  for budget in np.linspace(two[0], two[1], points):
    thresholds = escalation_lib.calibrate(confidences, two, float(budget))
    accuracy, madds = escalation_lib.simulate(correct, confidences, thresholds, two)
    curve.append({'madds': madds, 'accuracy': accuracy})
  return curve


def oracle(signals, space: Sequence[str], chain: Sequence[str], costs: np.ndarray
           ) -> dict[str, float]:
  """Escalating exactly the images the first route gets wrong and the last route right."""
  correct, _ = levels(signals, space, (chain[0], chain[-1]), 'max_softmax')
  escalated = ~correct[:, 0] & correct[:, 1]
  return {'accuracy': float((correct[:, 0] | escalated).mean()),
          'madds': float(costs[0] + escalated.mean() * (costs[-1] - costs[0]))}


def error_auroc(signals, gated: bool) -> dict[str, float]:
  """How well each signal ranks the images the cheapest route gets wrong (AUROC): the
  cheapest route's own confidence (lower = more likely wrong) and, when the gate was
  trained, its preference against the cheapest route."""
  wrong = ~signals['correct'][:, 0]
  out = {kind: escalation_lib.auroc(-signals[kind][:, 0], wrong)
         for kind in escalation_lib.CONFIDENCES}
  if gated:
    out['gate'] = escalation_lib.auroc(signals['gate'], wrong)
  return out
