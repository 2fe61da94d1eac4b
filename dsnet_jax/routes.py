"""Routes: the hashable width specs a dynamic model runs at, and host-side route draws.

A `Route` names one sub-network: the width every sliceable group runs at. It is passed
to `model.apply(..., route=...)` as a static Python value, so each route is its own
compiled program ("slice bucket"). A `RouteTable` is a model's ordered set of routes plus
its *routing space*, the subset the gate chooses from.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Iterator, Sequence

import numpy as np

from dsnet_jax.errors import UnknownRouteError

LARGEST = 'largest'
# A routing space left to the gate stage: it proposes one for the budget from the routes'
# accuracy after Stage I (budget.propose_routing_space). Until then the routing space is every
# route that runs the smallest route's widths before the gate.
AUTO = 'auto'


@dataclasses.dataclass(frozen=True)
class Route:
  """One sub-network.

  Attributes:
    name: key in the model's route table ('0', '1', ..., 'largest').
    widths: one entry per sliceable group (the stem counts as one); ints (channels) for CNNs,
      small tuples for ViT groups. Hashable, so a Route can be a static jit argument.
  """
  name: str
  widths: tuple[Hashable, ...]

  def __post_init__(self):
    hash(self.widths)  # Fails early on unhashable (e.g. list) widths.


class RouteTable:
  """Ordered routes of one model, with its routing space.

  Indexing accepts a `Route`, its name, or an int (taken as the name str(int)).
  """

  def __init__(self, routes: Sequence[Route], routing_space: Sequence[str | int] | str,
               shared_prefix: int = 0):
    """`shared_prefix`: how many leading widths run before the gate; every route of the
    routing space must share them (the gate runs before the route is known).
    `routing_space` AUTO: every route sharing the smallest route's, until one is chosen."""
    self._routes = {r.name: r for r in routes}
    if len(self._routes) != len(routes):
      raise ValueError(f'duplicate route names in {[r.name for r in routes]}')
    self.auto = isinstance(routing_space, str)
    if self.auto and routing_space != AUTO:
      raise ValueError(f'routing space {routing_space!r}: give route names or {AUTO!r}')
    if self.auto:  # Distinct routes sharing the smallest route's widths before the gate.
      k, seen, routing_space = shared_prefix, set(), []
      for route in routes:
        if route.widths[:k] == routes[0].widths[:k] and route.widths not in seen:
          seen.add(route.widths)
          routing_space.append(route.name)
    self.routing_space: tuple[Route, ...] = tuple(self[r] for r in routing_space)
    if not self.routing_space:
      raise ValueError('the routing space needs at least one route')
    self.shared_prefix = shared_prefix
    self._check_routing_space()

  def _check_routing_space(self):
    """Raises ValueError naming two routes of the routing space that break its contract."""
    first, k = self.routing_space[0], self.shared_prefix
    for route in self.routing_space[1:]:
      if route.widths[:k] != first.widths[:k]:
        raise ValueError(
            f'routes {first.name!r} and {route.name!r} of the routing space run different widths '
            f'before the gate ({first.widths[:k]} vs {route.widths[:k]}); the gate runs before '
            'the route is known, so the routes it chooses from must share them')
    for slimmer, wider in zip(self.routing_space, self.routing_space[1:]):
      a, b = _flat_widths(slimmer.widths), _flat_widths(wider.widths)
      if not (all(y >= x for x, y in zip(a, b)) and b != a):
        raise ValueError(
            f'the routing space must run from its slimmest route to its widest (SGS targets the '
            f'first for easy inputs, the last for hard ones): route {wider.name!r} is not wider '
            f'than {slimmer.name!r}')

  def __getitem__(self, key: Route | str | int) -> Route:
    if isinstance(key, Route):
      if self._routes.get(key.name) != key:
        raise UnknownRouteError(f'route {key} is not in this table; valid: {self.names}')
      return key
    name = str(key)
    if name not in self._routes:
      raise UnknownRouteError(f'unknown route {key!r}; valid routes: {", ".join(self.names)}')
    return self._routes[name]

  def __iter__(self) -> Iterator[Route]:
    return iter(self._routes.values())

  def __repr__(self) -> str:
    """The routes, one per line, with their widths and routing index (where the gate can
    choose them)."""
    space = [r.name for r in self.routing_space]
    width = max(len(str(r.widths)) for r in self)
    lines = [f'RouteTable: {len(self)} routes; routing space [{", ".join(space)}]'
             f'{" (auto)" if self.auto else ""}; {self.shared_prefix} widths shared before the '
             'gate', f'  {"route":>8}  {"widths":<{width}}  routing index']
    for route in self:
      index = space.index(route.name) if route.name in space else ''
      lines.append(f'  {route.name:>8}  {str(route.widths):<{width}}  {index}')
    return '\n'.join(lines)

  def __len__(self) -> int:
    return len(self._routes)

  @property
  def names(self) -> list[str]:
    return list(self._routes)

  @property
  def smallest(self) -> Route:
    return next(iter(self._routes.values()))

  @property
  def largest(self) -> Route:
    return self._routes[LARGEST] if LARGEST in self._routes else list(self._routes.values())[-1]

  def with_routing_space(self, routing_space: Sequence[str | int]) -> RouteTable:
    return RouteTable(list(self), routing_space, self.shared_prefix)

  @staticmethod
  def spec(routing_space: Sequence[str | int] | str) -> tuple[str | int, ...] | str:
    """A model field's routing space as a hashable argument: a tuple of names, or AUTO (also
    from ('auto',), what `--config.model.routing_space=auto` parses to)."""
    if isinstance(routing_space, str):
      return routing_space
    return AUTO if tuple(routing_space) == (AUTO,) else tuple(routing_space)

  def routing_index(self, route: Route | str | int) -> int:
    """Position of `route` in the routing space (the gate's logit index)."""
    route = self[route]
    if route not in self.routing_space:
      raise UnknownRouteError(
          f'route {route.name!r} is not in the routing space '
          f'{[r.name for r in self.routing_space]}')
    return self.routing_space.index(route)


def _flat_widths(widths) -> tuple[int, ...]:
  if isinstance(widths, (tuple, list)):
    return tuple(w for item in widths for w in _flat_widths(item))
  return (widths,)


def sandwich_routes(table: RouteTable, seed: int, step: int, num_random: int) -> list[Route]:
  """Sandwich rule draw for one step: largest, `num_random` random middle routes, smallest.

  Drawn on the host from (seed, step) only, so every device and every resumed run agrees.
  Middle routes come from the table without the smallest and the largest, with replacement.
  """
  middle = [r for r in table if r not in (table.smallest, table.largest)]
  rng = np.random.default_rng([seed, step])
  picks = rng.integers(0, len(middle), size=num_random) if middle else []
  return [table.largest, *(middle[i] for i in picks), table.smallest]
