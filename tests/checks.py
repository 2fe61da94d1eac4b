"""Assertions every gated model's tests share, and the tiny training config."""
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]


def assert_one_compile_per_route(model, variables, images, routes, unseen_route):
  """Calling each of `routes` twice traces once per route; one more route traces again."""
  chex.clear_trace_counter()  # Counters are keyed by source text, shared across test files.
  forward = jax.jit(chex.assert_max_traces(
      lambda v, x, route: model.apply(v, x, route=route), n=len(routes)),
      static_argnames='route')
  for route in [*routes, *routes]:
    forward(variables, images, route=route)
  with pytest.raises(AssertionError):
    forward(variables, images, route=unseen_route)


def assert_gradients_only_inside(checks):
  """For each (gradient, slice of the active route): non-zero inside, exactly zero outside."""
  for g, inside in checks:
    g = np.asarray(g)
    outside = g.copy()
    outside[inside] = 0
    assert np.all(outside == 0)
    assert np.abs(g[inside]).max() > 0


def assert_masked_equals_sliced(model, variables, images, per_example, sliced):
  """Masked logits with per-example one-hot routes equal each example's route on dense slices.

  `sliced(route)` returns the batch's logits on `route`. Returns (masked, gate logits).
  """
  space = model.routes.routing_space
  onehot = jax.nn.one_hot(per_example, len(space))
  masked, gate_logits = jax.jit(lambda v, x, w: model.apply(v, x, w, method='masked'))(
      variables, images, onehot)
  assert gate_logits.shape == (len(per_example), len(space))
  errors = []
  for k, route in enumerate(space):
    rows = per_example == k
    errors.append(float(np.abs(np.asarray(masked)[rows] - np.asarray(sliced(route))[rows]).max()))
  print('max |masked - sliced| per route:', errors)
  assert max(errors) <= 1e-5
  return masked, gate_logits


def train_mode_gradients(model, variables, images, route):
  """Gradients of sum(logits^2) for `route` in training mode (BatchNorm on batch statistics)."""
  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, images, route=route, train=True,
                            mutable=['batch_stats'])
    return jnp.sum(logits ** 2)
  return jax.jit(jax.grad(loss))(variables['params'])


def tiny_config(**overrides):
  spec = importlib.util.spec_from_file_location('tiny', ROOT / 'configs/tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.unlock()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config
