"""Escalation routing [ours]: a router that needs no Stage II.

Every image runs the shared prefix once and the first route of a `chain` (cheapest first, all
in the routing space); an image whose confidence in its own prediction (max softmax, or the
margin between its two most probable classes) is under that level's threshold runs the next
route's suffix on the same prefix output, and so on to the last route. Its logits are those of
the last route it ran, and it costs the prefix plus every suffix it ran (`level_costs`).
Thresholds are calibrated on held-out images to a budget (`calibrate`); with more than two
levels, the thresholds that give the best held-out accuracy at the budget.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax.complexity import prefix_complexity, route_complexity
from dsnet_jax.errors import BudgetError, ConfigError

CONFIDENCES = ('max_softmax', 'margin')
# The chain that asks for the most accurate chain at the budget on the calibration images.
AUTO = ('auto',)
# A threshold above any confidence (both kinds lie in [0, 1]): every image escalates.
ALWAYS = 2.0
ESCALATION_FILE = 'escalation.json'


@dataclasses.dataclass(frozen=True)
class Escalation:
  """A calibrated escalation router: route names `chain` (cheapest first), one threshold per
  level but the last (level k escalates an image whose confidence is below `thresholds[k]`),
  and the `confidence` kind. `budget` and `budget_unit` record what it was calibrated for."""
  chain: tuple[str, ...]
  thresholds: tuple[float, ...]
  confidence: str = 'max_softmax'
  budget: float = 0.0
  budget_unit: str = 'madds'

  def __post_init__(self):
    if len(self.chain) < 2 or len(set(self.chain)) != len(self.chain):
      raise ConfigError(f'an escalation chain needs two or more distinct routes, got '
                        f'{list(self.chain)}')
    if len(self.thresholds) != len(self.chain) - 1:
      raise ConfigError(f'{len(self.chain)} routes need {len(self.chain) - 1} thresholds, got '
                        f'{list(self.thresholds)}')
    if not all(_is_number(t) and 0 <= t <= ALWAYS for t in self.thresholds):
      raise ConfigError(f'escalation thresholds must be numbers in [0, {ALWAYS}] (confidences '
                        f'lie in [0, 1]), got {list(self.thresholds)}')
    if not (_is_number(self.budget) and self.budget >= 0) or self.budget_unit != 'madds':
      raise ConfigError(f'an escalation budget is MAdds per image >= 0, got {self.budget!r} '
                        f'{self.budget_unit!r}')
    check_confidence(self.confidence)

  def to_json(self, **extra: Any) -> str:
    """JSON of the rule, with `extra` (e.g. the checkpoint step it was calibrated for)."""
    return json.dumps({**dataclasses.asdict(self), **extra}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> Escalation:
    """The rule `to_json` wrote (numbers must be JSON numbers, names strings)."""
    data = json.loads(text)
    if not isinstance(data['chain'], list) or not all(isinstance(r, str) for r in data['chain']):
      raise ConfigError(f'an escalation chain is a list of route names, got {data["chain"]!r}')
    if not isinstance(data['thresholds'], list) or not all(
        _is_number(t) for t in data['thresholds']):
      raise ConfigError(f'escalation thresholds are a list of numbers, got '
                        f'{data["thresholds"]!r}')
    return cls(chain=tuple(data['chain']), thresholds=tuple(map(float, data['thresholds'])),
               confidence=data['confidence'], budget=data.get('budget', 0.0),
               budget_unit=data.get('budget_unit', 'madds'))


def _is_number(value) -> bool:
  """A finite int or float (not a bool, not a string)."""
  return (isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
          and bool(np.isfinite(value)))


def chain_routes(table, chain: Sequence[str | int]) -> tuple[Any, ...]:
  """The Routes of a chain: two or more distinct routes of `table`'s routing space (they
  share the gate's prefix, which escalation runs once).

  Raises:
    errors.UnknownRouteError: a name that is no route; ConfigError: too few or repeated
      routes, or one outside the routing space.
  """
  routes = tuple(table[r] for r in chain)
  names = [r.name for r in routes]
  if len(routes) < 2 or len(set(names)) != len(names):
    raise ConfigError(f'escalation chain {names}: two or more distinct routes of the routing '
                      'space, cheapest first')
  space = [r.name for r in table.routing_space]
  outside = [r for r in names if r not in space]
  if outside:
    raise ConfigError(f'escalation chain {names}: routes {outside} are not in the routing '
                      f'space {space} (a chain shares the gate\'s prefix)')
  return routes


def checked_chain(model, chain: Sequence[str | int], image_shape: Sequence[int]
                  ) -> tuple[str, ...]:
  """The chain's route names, checked as `chain_routes` does and ordered cheapest first (an
  image escalates to a wider route).

  Raises: as `chain_routes`; ConfigError for a chain out of order.
  """
  names = tuple(r.name for r in chain_routes(model.routes, chain))
  own = [route_complexity(model, r, tuple(image_shape)).madds for r in names]
  if any(a >= b for a, b in zip(own, own[1:])):
    raise ConfigError(f'escalation chain {list(names)}: routes of MAdds {own}; give them '
                      'cheapest first (an image escalates to a wider route)')
  return names


def check_confidence(kind: str) -> None:
  if kind not in CONFIDENCES:
    raise ConfigError(f'confidence {kind!r}: use one of {", ".join(CONFIDENCES)}')


def confidence(logits, kind: str = 'max_softmax') -> jax.Array:
  """(n,) confidence of each row of logits (n, classes): its largest softmax probability, or
  the difference of its two largest ('margin'). Float32 whatever the logits' dtype."""
  check_confidence(kind)
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  if kind == 'max_softmax':
    return probs.max(-1)
  top2 = jax.lax.top_k(probs, 2)[0]
  return top2[..., 0] - top2[..., 1]


def stop_levels(confidences: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
  """(n,) int: the level at which each image stops, given its confidence at every level
  (n, L): the first level k < L - 1 whose confidence is at least thresholds[k], else L - 1."""
  confidences = np.asarray(confidences)
  last = confidences.shape[1] - 1
  stays = confidences[:, :last] >= np.asarray(thresholds, confidences.dtype)
  return np.where(stays.any(1), stays.argmax(1), last)


def level_costs(model, chain: Sequence[str], image_shape: Sequence[int]) -> np.ndarray:
  """(L,) MAdds per image of an image that stops at each level: the prefix (with the gate) and
  the suffixes of chain[0..k] (float64). A route's cost with its gate is the prefix's plus its
  suffix's, so each further level adds its route's cost less the prefix's."""
  image_shape = tuple(image_shape)
  full = np.array([route_complexity(model, r, image_shape, with_gate=True).madds for r in chain],
                  np.float64)
  prefix = float(prefix_complexity(model, image_shape).madds)
  return full[0] + np.concatenate([[0.0], np.cumsum(full[1:] - prefix)])


def simulate(correct: np.ndarray, confidences: np.ndarray, thresholds: Sequence[float],
             costs: np.ndarray) -> tuple[float, float]:
  """(accuracy, mean cost) of escalation with `thresholds` on images whose correctness and
  confidence at every level are (n, L) arrays; `costs` (L,) as `level_costs`."""
  levels = stop_levels(confidences, thresholds)
  rows = np.arange(len(levels))
  return float(np.asarray(correct)[rows, levels].mean()), float(np.asarray(costs)[levels].mean())


def calibrate(confidences: np.ndarray, costs: np.ndarray, budget: float,
              correct: np.ndarray | None = None, grid: int = 51) -> tuple[float, ...]:
  """Thresholds after which escalation costs `budget` per image on average on these images.

  Args:
    confidences: (n, L) each image's confidence at every level (held-out images).
    costs: (L,) as `level_costs`, increasing.
    budget: the mean cost per image to spend, between costs[0] and costs[-1].
    correct: (n, L) whether each level's route is right; needed for L > 2, where the budget
      can be split between the levels in many ways: the most accurate split is taken (level
      0's escalation share on a grid of `grid` values, recursively).
    grid: see `correct`.
  Returns:
    L - 1 thresholds. The least confident images escalate, as many as the budget pays for:
    the cost lands on the budget to within one image's escalation, never above it.
  Raises:
    BudgetError: the budget is outside [costs[0], costs[-1]].
  """
  confidences = np.asarray(confidences, np.float64)
  costs = np.asarray(costs, np.float64)
  if confidences.ndim != 2 or confidences.shape[1] != len(costs) or not len(confidences):
    raise ValueError(f'confidences {confidences.shape} do not match {len(costs)} levels')
  if not costs[0] <= budget <= costs[-1]:
    raise BudgetError(f'budget {budget:.6g} is outside what escalation can spend: '
                      f'{costs[0]:.6g} (every image stops at the first route) to '
                      f'{costs[-1]:.6g} (every image runs every route)')
  if len(costs) > 2 and correct is None:
    raise ValueError("calibrating more than two levels needs each level's correctness")
  if correct is None:
    correct = np.zeros(confidences.shape, bool)
  return _best(confidences, np.asarray(correct, bool), costs, budget, grid)[1]


def _best(confidences, correct, costs, budget, grid):
  """(accuracy, thresholds) of the most accurate escalation within `budget` per image."""
  if len(costs) == 2:
    share = min(max((budget - costs[0]) / (costs[1] - costs[0]), 0.0), 1.0)
    thresholds = (_threshold(confidences[:, 0], share),)
    return simulate(correct, confidences, thresholds, costs)[0], thresholds
  n, best = len(confidences), None
  for share in np.linspace(0.0, 1.0, grid):
    first = _threshold(confidences[:, 0], share)
    escalated = confidences[:, 0] < first
    if not escalated.any():
      rest = (ALWAYS,) * (len(costs) - 2)
    else:
      # What the escalated images may spend each, the first route's cost included.
      each = costs[0] + (budget - costs[0]) * n / escalated.sum()
      if each < costs[1]:
        continue
      rest = _best(confidences[escalated][:, 1:], correct[escalated][:, 1:], costs[1:],
                   min(each, costs[-1]), grid)[1]
    thresholds = (first, *rest)
    accuracy, cost = simulate(correct, confidences, thresholds, costs)
    if cost <= budget * (1 + 1e-12) and (best is None or accuracy > best[0]):
      best = (accuracy, thresholds)
  return best


def _threshold(confidences: np.ndarray, share: float) -> float:
  """A threshold below which at most `share` of `confidences` lie (the least confident ones):
  the k-th smallest confidence for k = floor(share * n), ALWAYS when that is all of them."""
  n = len(confidences)
  k = int(np.floor(share * n + 1e-9))
  return ALWAYS if k >= n else float(np.sort(confidences)[k])


def at_share(model, variables, images, chain: Sequence[str], share: float) -> Escalation:
  """A rule under which each level escalates `share` of the images it sees (thresholds at
  that quantile of their confidences): a stand-in for speed measurements, not calibrated to
  any budget."""
  chain = checked_chain(model, chain, images.shape[1:])
  if not (_is_number(share) and 0 <= share <= 1):
    raise ConfigError(f'an escalation share is a fraction in [0, 1], got {share!r}')
  thresholds, rows = [], np.arange(len(images))
  for route in chain[:-1]:
    confidences = np.asarray(confidence(model.apply(variables, images[rows], route=route)))
    thresholds.append(_threshold(confidences, share))
    rows = rows[confidences < thresholds[-1]]
    if not len(rows):
      thresholds += [ALWAYS] * (len(chain) - 1 - len(thresholds))
      break
  return Escalation(chain, tuple(thresholds))


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
  """Area under the ROC curve of `scores` ranking the `positives` (bool) above the rest: the
  chance that a random positive scores higher than a random negative (ties count half)."""
  scores = np.asarray(scores, np.float64)
  positives = np.asarray(positives, bool)
  n_pos, n_neg = positives.sum(), (~positives).sum()
  if not n_pos or not n_neg:
    return float('nan')
  order = np.argsort(scores, kind='mergesort')
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  # Average ranks over ties (1-based).
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  average = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(average, counts)
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


