"""The gate's compute budget [ours]: a fraction of 'largest''s MAdds, MAdds, or ms per image
(from a latency table); held in training by dual ascent (`excess`), met at inference by
per-route logit offsets calibrated on held-out images (`calibrate_offsets`); and a routing
space proposed for it (`propose_routing_space`). The method: docs/design.md.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from etils import epath
import jax.numpy as jnp
import numpy as np

from dsnet_jax import latency as latency_lib
from dsnet_jax import sharding
from dsnet_jax.complexity import route_complexity
from dsnet_jax.errors import BudgetError, LatencyTableError
from dsnet_jax.models.gated import ROUTING_COLLECTION


@dataclasses.dataclass(frozen=True)
class Budget:
  """The gate's budget per image and each routing-space route's cost, in `unit`."""
  value: float
  unit: str  # 'madds' or 'ms'
  route_costs: np.ndarray  # (R,) float64

  def format(self, cost: float) -> str:
    return f'{cost / 1e6:.4g} M MAdds' if self.unit == 'madds' else f'{cost:.4g} ms'

  def meta(self) -> dict[str, float]:
    """What the gate checkpoint's meta keeps of it: {'budget_madds' or 'budget_ms': value}."""
    return {f'budget_{self.unit}': self.value}


def make_budget(gate_config, model, image_shape: Sequence[int], workdir: str = ''
                ) -> Budget | None:
  """The budget of `gate_config` for `model` (None without one).

  With `budget_unit='ms'` the route costs are the routing-space routes' median ms/image at the
  largest batch size of `<workdir>/latency.json`.
  Raises:
    BudgetError: the budget lies outside what the routing space can spend; with 'ms', no
      latency table in the workdir, one for other images, or one without a route.
  """
  if not gate_config.budget:
    return None
  if gate_config.budget_unit != 'ms':
    return Budget(budget_madds(gate_config, model, image_shape), 'madds',
                  model.routing_madds(tuple(image_shape)).astype(np.float64))
  path = os.fspath(epath.Path(workdir) / latency_lib.LATENCY_FILE)
  measure = (f'python -m dsnet_jax.tools.latency --config=<this config> --output={path} (random '
             'weights of this model on this device)')
  try:
    table = latency_lib.load(path, model, image_shape)
  except LatencyTableError as e:
    raise BudgetError(f"gate.budget_unit='ms': {e}; measure again: {measure}") from None
  names = [r.name for r in model.routes.routing_space]
  if table is None:
    raise BudgetError(f"gate.budget_unit='ms' needs a latency table at {path}; measure it "
                      f'first: {measure}')
  batch = str(table['batch_sizes'][-1])
  missing = [n for n in names if n not in table['routes']]
  if missing:
    raise BudgetError(f'{path} has no time for routes {missing} of the routing space {names}; '
                      f'measure them: {measure}')
  costs = np.array([table['routes'][n]['ms_per_image'][batch]['median'] for n in names])
  budget = float(gate_config.budget)
  if not costs.min() <= budget <= costs.max():
    raise BudgetError(
        f'gate.budget={budget} ms per image is outside what the routing space {names} spends '
        f'on {table["device"]["device_kind"]} at batch {batch} ({path}): '
        f'{costs.min():.4g}-{costs.max():.4g} ms. Choose a budget in that range.')
  return Budget(budget, 'ms', costs)


def budget_madds(gate_config, model, image_shape: Sequence[int]) -> float:
  """`gate_config.budget` in MAdds per image (0.0: no budget).

  Raises:
    BudgetError: the budget lies outside [cheapest, dearest] routing-space route (gate
      included), so no routing could meet it.
  """
  if not gate_config.budget:
    return 0.0
  image_shape = tuple(image_shape)
  largest = route_complexity(model, model.routes.largest, image_shape).madds
  budget = float(gate_config.budget) * (largest if gate_config.budget_unit == 'largest' else 1.0)
  costs = model.routing_madds(image_shape)
  if not costs.min() <= budget <= costs.max():
    names = [r.name for r in model.routes.routing_space]
    raise BudgetError(
        f'gate.budget={gate_config.budget} ({gate_config.budget_unit}) is {budget / 1e6:.4g} M '
        f'MAdds per image, outside what the routing space {names} can spend: '
        f'{costs.min() / 1e6:.4g}-{costs.max() / 1e6:.4g} M (gate included; largest route '
        f'{largest / 1e6:.4g} M). Choose a budget in that range or another routing space.')
  return budget


def with_offsets(variables: dict[str, Any], offsets: Sequence[float], mesh=None
                 ) -> dict[str, Any]:
  """`variables` plus the routing collection that `apply_prefix` adds to routing logits."""
  offsets = np.asarray(offsets, np.float32)
  if mesh is not None:
    offsets = sharding.replicate(offsets, mesh)
  return {**variables, ROUTING_COLLECTION: {'offsets': jnp.asarray(offsets)}}


def excess(cost: jnp.ndarray, budget: float, route_costs: jnp.ndarray) -> jnp.ndarray:
  """(cost - budget) in units of the routing space's cost range (max - min route cost), so
  that the dual variable's scale does not depend on how far apart the routes' costs are."""
  span = jnp.max(route_costs) - jnp.min(route_costs)
  return (cost - budget) / jnp.where(span > 0, span, 1.0)


def routed_cost(routing_logits: np.ndarray, route_costs: np.ndarray,
                offsets: np.ndarray | None = None) -> float:
  """Mean cost per image of argmax(routing_logits + offsets) routing."""
  logits = np.asarray(routing_logits, np.float64)
  if offsets is not None:
    logits = logits + offsets
  return float(np.asarray(route_costs, np.float64)[logits.argmax(-1)].mean())


def calibrate_offsets(routing_logits: np.ndarray, route_costs: np.ndarray, budget: float,
                      iterations: int = 100) -> np.ndarray:
  """Per-route logit offsets (R,) after which argmax routing costs `budget` on average.

  Args:
    routing_logits: (N, R) routing logits of held-out examples.
    route_costs: (R,) cost per image of each routing-space route (MAdds or ms).
    budget: target mean cost per image, within [min, max] of `route_costs`.
  Returns:
    float32 offsets `-p * (route_costs - min(route_costs)) / budget`, `p` in the middle of the
    prices whose routing cost is the closest to `budget` (the cost is a step function of `p`).
  """
  logits = np.asarray(routing_logits, np.float64)
  madds = np.asarray(route_costs, np.float64)
  relative = (madds - madds.min()) / budget  # The cheapest route's offset stays 0.
  if logits.ndim != 2 or logits.shape[1] != relative.shape[0] or not len(logits):
    raise ValueError(f'routing logits {logits.shape} do not match {relative.shape[0]} routes')
  if not np.isfinite(logits).all():
    raise FloatingPointError('routing logits to calibrate are not all finite')
  if not madds.min() <= budget <= madds.max():
    raise BudgetError(f'budget {budget:.6g} is outside what the routes can spend: '
                      f'{madds.min():.6g}-{madds.max():.6g}')
  cost = lambda price: routed_cost(logits, route_costs, -price * relative)
  gaps = np.diff(np.unique(relative))
  bound = (float(np.ptp(logits, axis=1).max()) + 1.0) / (gaps.min() if len(gaps) else 1.0)
  # cost(-bound) is the dearest route's, cost(bound) the cheapest's, and it never rises.

  def first_price(predicate):  # The smallest price in [-bound, bound] where predicate holds.
    low, high = -bound, bound
    for _ in range(iterations):
      middle = 0.5 * (low + high)
      low, high = (low, middle) if predicate(middle) else (middle, high)
    return high

  crossing = first_price(lambda p: cost(p) <= budget)
  best = min((cost(crossing), cost(np.nextafter(crossing, -np.inf))), key=lambda c: abs(c - budget))
  # The middle of the prices that cost `best`: float32 offsets then still cost exactly that.
  price = 0.5 * (first_price(lambda p: cost(p) <= best) + first_price(lambda p: cost(p) < best))
  return (-price * relative).astype(np.float32)


def propose_routing_space(rows: Sequence[dict[str, Any]], budget: float,
                          max_routes: int = 4) -> tuple[str, ...]:
  """[ours] A routing space for `budget` from measured routes: the routes on the upper
  concave hull of accuracy vs cost (each more accurate than mixing its neighbours), from the
  cheapest up to the first at or beyond `2 * budget - cheapest` (so the budget lies at most
  halfway: the gate may send up to half the images to the widest route), at most
  `max_routes` of them (the middle ones thinned evenly). If the hull ends below the budget,
  the cheapest route that costs at least the budget is added, so the budget can be spent.

  Args:
    rows: {'route', 'accuracy', 'cost'} of the routes that may share a routing space
      (measured on held-out data, e.g. the gate's calibration slice); 'cost' in the budget's
      unit (MAdds or ms).
    budget: cost per image.
  Raises:
    BudgetError: the budget is below the cheapest route or above the dearest.
  """
  points = sorted(rows, key=lambda r: (r['cost'], -r['accuracy']))
  if not points[0]['cost'] <= budget <= points[-1]['cost']:
    raise BudgetError(f'budget {budget:.6g} is outside the measured routes\' costs '
                      f'{points[0]["cost"]:.6g}-{points[-1]["cost"]:.6g}')
  hull = []
  for point in points:
    while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) >= 0:
      hull.pop()  # hull[-1] is not above the chord from hull[-2] to point.
    if not hull or point['accuracy'] > hull[-1]['accuracy']:
      hull.append(point)
  reach = 2 * budget - hull[0]['cost']
  end = next((i for i, p in enumerate(hull) if p['cost'] >= reach), len(hull) - 1)
  chosen = hull[:end + 1]
  if chosen[-1]['cost'] < budget:  # No route that costs the budget is more accurate.
    chosen.append(next(p for p in points if p['cost'] >= budget))
  if len(chosen) > max_routes:
    keep = np.linspace(0, len(chosen) - 1, max_routes).round().astype(int)
    chosen = [chosen[i] for i in keep]
  return tuple(p['route'] for p in chosen)


def _cross(a, b, c) -> float:
  """> 0 when c lies above the line through a and b (accuracy over cost)."""
  return ((b['cost'] - a['cost']) * (c['accuracy'] - a['accuracy'])
          - (b['accuracy'] - a['accuracy']) * (c['cost'] - a['cost']))
