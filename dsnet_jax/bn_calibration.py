"""BatchNorm running statistics set from data: the one calibration mechanism of the library.

`recalibrate` replaces each route's running statistics by their exact average over a number of
batches (PyTorch's `momentum=None` cumulative average), the recalibration step between the
two training stages; `calibrate_to_batch` is the one-batch case, for stand-in variables in
tests and speed runs. Both run each route once per batch in train mode and read the per-width
sums that `SlicedBatchNorm` accumulates in the `bn_moments` collection.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp


def recalibrate(model, variables, batches: Iterable[dict[str, Any]], routes: Sequence[Any],
                num_batches: int) -> dict[str, Any]:
  """Variables whose running statistics are the exact average over `num_batches` batches.

  Args:
    model: a gated supernet.
    variables: {'params', 'batch_stats'}.
    batches: yields {'image': (batch, H, W, C)} (other keys ignored).
    routes: the routes (or names) whose statistics to set; rows that none of them reaches
      keep their values.
    num_batches: how many batches of `batches` to read.
  """
  routes = [model.routes[r] for r in routes]

  @functools.partial(jax.jit, static_argnames='route')
  def accumulate(variables, moments, images, route):
    _, updated = model.apply({**variables, 'bn_moments': moments}, images, route=route,
                             train=True, mutable=['batch_stats', 'bn_moments'],
                             rngs={'dropout': jax.random.key(0)})
    return updated['bn_moments']

  moments = {}
  for _, batch in zip(range(num_batches), batches):
    for route in routes:
      moments = accumulate(variables, moments, batch['image'], route=route)

  def average(stats, mom):
    count = mom['count'][:, None]
    touched = mom['var_sum'] > 0
    return {'mean': jnp.where(touched, mom['mean_sum'] / jnp.maximum(count, 1), stats['mean']),
            'var': jnp.where(touched, mom['var_sum'] / jnp.maximum(count, 1), stats['var'])}

  return {**variables, 'batch_stats': _map_bn(average, variables['batch_stats'], moments)}


def calibrate_to_batch(model, variables, images, routes: Sequence[Any]) -> dict[str, Any]:
  """Running statistics of `routes` set to the batch statistics of `images` (batch, H, W, C)."""
  return recalibrate(model, variables, [{'image': images}], routes, 1)


def _map_bn(fn, stats, moments):
  """Applies fn to each BN layer's {'mean','var'} and its moments, over nested dicts."""
  if 'mean' in stats and 'var' in stats and not isinstance(stats['mean'], dict):
    return fn(stats, moments) if moments else stats
  return {k: _map_bn(fn, v, moments.get(k, {})) for k, v in stats.items()}
