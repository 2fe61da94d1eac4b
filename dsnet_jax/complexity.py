"""MAdds and parameter counts per route, read analytically off the route's traced program.

The convention is the reference's (section 2): a conv costs c_in*c_out*k*k*H_out*W_out/groups,
a matmul in*out per output row, an average pool C*H_in*W_in (a sum over axes that are neither
the batch nor the channel axis); normalisation, activations and elementwise ops are free.
Counting walks the jaxpr of one image through `model.apply(..., route=r)` (dead code
removed first), so the count always describes the code that runs, at the shapes it runs at.
A route's parameter count is the number of parameter entries that route reads: the size of
each parameter's slice, or the whole parameter when it is used unsliced.

    python -m dsnet_jax.tools.complexity --model=ds_mbnet [--json]
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from dsnet_jax.layers.linear import depthwise_implementation


@dataclasses.dataclass(frozen=True)
class Complexity:
  madds: int
  params: int


def route_complexity(model, route, image_shape: tuple[int, ...], with_gate: bool = False
                     ) -> Complexity:
  """MAdds per image and parameters read, for `route` at `image_shape` (H, W, C).

  `with_gate` also counts the routing head (the gated model's cost of a route). Memoised on
  the arguments (a model compares by its fields): each count traces the model.
  """
  args = (model, model.routes[route], tuple(image_shape), with_gate)
  try:
    hash(args)
  except TypeError:  # A model with an unhashable field: counted afresh.
    return _route_complexity.__wrapped__(*args)
  return _route_complexity(*args)


@functools.lru_cache(maxsize=256)
def _route_complexity(model, route, image_shape: tuple[int, ...], with_gate: bool
                      ) -> Complexity:
  if with_gate:
    def forward(variables, x):
      hidden, routing_logits = model.apply_prefix(variables, x)
      return model.apply_suffix(variables, hidden, route), routing_logits
  else:
    def forward(variables, x):
      return model.apply(variables, x, route=route)
  return _count(model, forward, image_shape)


def prefix_complexity(model, image_shape: tuple[int, ...]) -> Complexity:
  """MAdds per image and parameters read of the gated model's prefix: the layers before the
  gate and the gate itself (`apply_prefix`). A route's cost with its gate is this plus its
  suffix's."""
  return _prefix_complexity(model, tuple(image_shape))


@functools.lru_cache(maxsize=64)
def _prefix_complexity(model, image_shape: tuple[int, ...]) -> Complexity:
  return _count(model, model.apply_prefix, image_shape)


def _count(model, forward: Callable, image_shape: tuple[int, ...]) -> Complexity:
  """The count of `forward(variables, images)` for one image of `image_shape`."""
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = model.abstract_variables(image_shape)
  params = variables['params']
  rest = {k: v for k, v in variables.items() if k != 'params'}
  with depthwise_implementation('conv'):  # Count depthwise convs as convs, however they run.
    closed = jax.make_jaxpr(lambda p, r, x: forward({'params': p, **r}, x))(params, rest, images)
  jaxpr = closed.jaxpr
  n_params = len(jax.tree.leaves(params))
  live = _live_eqns(jaxpr, set(jaxpr.outvars))
  return Complexity(madds=_madds(jaxpr, live),
                    params=_params_read(jaxpr, jaxpr.invars[:n_params], live))


def complexity_rows(model, image_shape: tuple[int, ...]) -> list[dict[str, Any]]:
  """One row per route: name, widths, MAdds, params."""
  rows = []
  for route in model.routes:
    c = route_complexity(model, route, image_shape)
    rows.append(dict(route=route.name, widths=list(route.widths), madds=c.madds, params=c.params))
  return rows


def xla_flops(fn: Callable, *args) -> float:
  """XLA's own flop estimate of `fn(*args)` (for cross-checks; counts elementwise ops too)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def _live_eqns(jaxpr, needed: set) -> list:
  """Equations whose outputs reach `needed`, in program order (a minimal DCE)."""
  needed = {v for v in needed if isinstance(v, jex_core.Var)}
  live = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      live.append(eqn)
      needed.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
  return live[::-1]


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def _madds(jaxpr, live) -> int:
  total = 0
  for eqn in live:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...)
      per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += per_output * math.prod(eqn.outvars[0].aval.shape)
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(lhs[d] for d in lhs_contract) * math.prod(eqn.outvars[0].aval.shape)
    elif name == 'reduce_sum':
      shape, axes = eqn.invars[0].aval.shape, eqn.params['axes']
      if 0 not in axes and len(shape) - 1 not in axes:  # a pool, not a norm or softmax
        total += math.prod(shape)
    else:
      repeats = eqn.params.get('length', 1) if name == 'scan' else 1
      for sub in _sub_jaxprs(eqn):
        total += repeats * _madds(sub, _live_eqns(sub, set(sub.outvars)))
  return total


def _params_read(jaxpr, param_vars, live) -> int:
  """Sum over parameters of the largest slice any live equation reads (whole if unsliced)."""
  read = {v: 0 for v in param_vars}
  for eqn in live:
    for v in eqn.invars:
      if isinstance(v, jex_core.Var) and v in read:
        size = (math.prod(eqn.outvars[0].aval.shape) if eqn.primitive.name == 'slice'
                else math.prod(v.aval.shape))
        read[v] = max(read[v], size)
  return sum(read.values())


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = [f'{"route":>8}  {"MAdds (M)":>10}  {"params (M)":>10}  widths']
  for row in rows:
    lines.append(f'{row["route"]:>8}  {row["madds"] / 1e6:>10.2f}  {row["params"] / 1e6:>10.3f}  '
                 f'{row["widths"]}')
  return '\n'.join(lines)
