"""Assertions every gated model's tests share, and the tiny training config."""
import gzip
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsnet_jax.data import fashion_mnist

ROOT = pathlib.Path(__file__).parents[1]
# XLA flags of the suite and the subprocesses it starts (conftest.py adds them to XLA_FLAGS).
XLA_TEST_FLAGS = '--xla_cpu_use_fusion_emitters=false'
# Compute dtypes the equality tests run in (None: the images', float32), and their test ids.
DTYPES = [None, jnp.bfloat16]
DTYPE_IDS = ['float32', 'bfloat16']


def tolerance(dtype, scale: float) -> float:
  """How far apart two programs' logits may be when they compute the same function in `dtype`
  (sliced vs masked, batched vs alone), for logits of magnitude `scale`.

  float32: 1e-5 (absolute, as these tests always allowed): the programs differ in shapes and
  fusion, so their float32 rounding differs. bfloat16 keeps 8 significant bits, so a rounding
  moves a value by up to 2^-8 of it. Both programs round the same activations, except where
  their float32 accumulations (other shapes, sums, fusions) differ in the last bits and a
  rounding goes the other way: one bfloat16 step, 2^-7 of that activation, carried through the
  later layers. We allow 2^-6 of the logits' scale (four 2^-8 roundings of the largest
  logit): the CNNs here agree bit for bit, the tiny ViT within 2^-8, while a wrong slice,
  mask or row is off by O(1) of the scale.
  """
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return 1e-5
  return 2.0 ** -6 * scale


def assert_float32_where_it_matters(model, variables, images):
  """With a low-precision compute dtype: the prefix's output is in it, while the parameters
  and BatchNorm statistics (fresh and after a training step), the routing logits and the
  logits of every entry point are float32. Traced only (eval_shape), never compiled."""
  low = jnp.dtype(model.dtype)
  assert low != jnp.float32
  f32 = jnp.dtype(jnp.float32)
  fresh = model.abstract_variables(images.shape[1:])
  assert {x.dtype for x in jax.tree.leaves(fresh)} == {f32}
  hidden, routing_logits = jax.eval_shape(model.apply_prefix, variables, images)
  assert {x.dtype for x in jax.tree.leaves(hidden)} == {low}
  assert routing_logits.dtype == f32
  space = model.routes.routing_space
  logits = jax.eval_shape(lambda v, h: model.apply_suffix(v, h, space[0]), variables, hidden)
  gated, _, _ = jax.eval_shape(model.apply_gated, variables, images)
  assert logits.dtype == gated.dtype == f32

  def train_step(v, x):
    return model.apply(v, x, route=model.routes.largest, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(0)})
  logits, updated = jax.eval_shape(train_step, variables, images)
  assert logits.dtype == f32
  assert {x.dtype for x in jax.tree.leaves(updated)} <= {f32}


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
  """Masked logits with per-example one-hot routes equal each example's route on dense slices
  (within `tolerance` of the model's compute dtype).

  `sliced(route)` returns the batch's logits on `route`. Returns (masked, gate logits).
  """
  space = model.routes.routing_space
  onehot = jax.nn.one_hot(per_example, len(space))
  masked, gate_logits = jax.jit(lambda v, x, w: model.apply(v, x, w, method='masked'))(
      variables, images, onehot)
  assert gate_logits.shape == (len(per_example), len(space))
  assert masked.dtype == gate_logits.dtype == jnp.float32
  errors = []
  for k, route in enumerate(space):
    rows = per_example == k
    if not rows.any():  # Not compiled: a bfloat16 route compiles for seconds on a CPU.
      continue
    errors.append(float(np.abs(np.asarray(masked)[rows] - np.asarray(sliced(route))[rows]).max()))
  scale = float(np.abs(np.asarray(masked)).max())
  print(f'max |masked - sliced| per route ({jnp.dtype(model.dtype or jnp.float32).name}, '
        f'logit scale {scale:.3g}):', errors)
  assert max(errors) <= tolerance(model.dtype, scale)
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


def assert_close(actual, expected):
  """Within 3e-5 of the logits' scale: the routed and the reference programs differ in batch
  size and fusion, so float32 rounding differs (by up to 1.6e-5 of the scale on an AVX-512
  EPYC, where XLA:CPU picks other kernels than on AVX2 machines; a wrong route or order is
  off by the logits' own size)."""
  expected = np.asarray(expected)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=3e-5 * scale)


# Fashion-MNIST IDX files made up for tests.

def idx_bytes(array, shape=None, dtype_code=0x08):
  """An IDX file: `array`'s bytes under a header declaring `shape` (default: the array's)."""
  shape = np.shape(array) if shape is None else shape
  header = bytes([0, 0, dtype_code, len(shape)]) + b''.join(d.to_bytes(4, 'big') for d in shape)
  return header + np.asarray(array, np.uint8).tobytes()


def fake_split(n=5):
  rng = np.random.default_rng(n)
  return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_split(directory, images, labels, split='train', compress=gzip.compress):
  """Writes a split's IDX files (each given as bytes or as an array) under Debian's names."""
  paths = fashion_mnist.idx_files(str(directory), split)
  for path, content in zip(paths, (images, labels)):
    with open(path, 'wb') as f:
      f.write(compress(content if isinstance(content, bytes) else idx_bytes(content)))
  return paths
