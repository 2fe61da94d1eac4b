"""DS-MBNet: sliced == masked per example, one compile per route, slice-local gradients, BN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest


import checks
from dsnet_jax.models import ds_mbnet
from dsnet_jax.errors import UnknownRouteError

IMAGE = (32, 32, 3)  # The net runs at any multiple of 32; small keeps the test fast.


@pytest.fixture(scope='module')
def model_and_variables():
  model = ds_mbnet.Model(num_classes=10)
  key = jax.random.key(0)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *IMAGE)), route='largest'))(key)
  # Random running statistics, so a wrong per-width row would show.
  leaves, treedef = jax.tree.flatten(variables['batch_stats'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  stats = [jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5) if i % 2 else
           0.1 * jax.random.normal(k, x.shape) for i, (k, x) in enumerate(zip(keys, leaves))]
  return model, {**variables, 'batch_stats': jax.tree.unflatten(treedef, stats)}


def images(n, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, *IMAGE))


def test_route_table_and_unknown_route(model_and_variables):
  model, variables = model_and_variables
  assert model.routes.names == [str(i) for i in range(14)] + ['largest']
  assert [r.name for r in model.routes.routing_space] == ['0', '1', '2', '3']
  assert model.routes[5].widths == (16, 32, 48, 96, 384, 896)
  assert model.routes['largest'].widths == (24, 88, 168, 264, 640, 1152)
  with pytest.raises(UnknownRouteError, match=r"unknown route '14'.*0, 1, .*13, largest"):
    model.apply(variables, images(1), route='14')


def test_sliced_equals_masked_for_mixed_routes(model_and_variables):
  model, variables = model_and_variables
  x = images(6)
  per_example = np.array([3, 0, 2, 1, 1, 3])
  masked, _ = checks.assert_masked_equals_sliced(
      model, variables, x, per_example,
      lambda route: jax.jit(lambda v, x: model.apply(v, x, route=route))(variables, x))
  assert np.abs(np.asarray(masked)).max() > 1e-2  # Not trivially zero.


def test_one_compile_per_route(model_and_variables):
  model, variables = model_and_variables
  checks.assert_one_compile_per_route(model, variables, images(2), [0, 1, 'largest'], 2)


def test_gradients_outside_the_slice_are_zero(model_and_variables):
  model, variables = model_and_variables
  grads = checks.train_mode_gradients(model, variables, images(2), route=0)
  slices = [
      (grads['stem_conv']['kernel'], np.s_[..., :16]),
      (grads['groups_0_0']['conv_dw']['kernel'], np.s_[..., :16]),
      (grads['groups_3_1']['conv_pw']['kernel'], np.s_[:, :, :224, :224]),
      (grads['groups_4_1']['bn2']['scale'], np.s_[:736]),
      (grads['groups_4_1']['se']['conv_reduce']['kernel'], np.s_[:736, :]),
      (grads['classifier']['kernel'], np.s_[:736]),
  ]
  checks.assert_gradients_only_inside(slices)
  # The gate's routing head is not on a static route's loss.
  assert np.all(np.asarray(grads['groups_3_0']['gate']['routing_head']['kernel']) == 0)


def test_batchnorm_updates_only_its_width_row(model_and_variables):
  model, variables = model_and_variables
  x = images(4)
  _, updated = jax.jit(lambda v, x: model.apply(v, x, route=2, train=True,
                                                mutable=['batch_stats']))(variables, x)
  old = variables['batch_stats']['groups_3_2']['bn2']
  new = updated['batch_stats']['groups_3_2']['bn2']
  row = 2  # Width 288 is row 2 of (224, 256, ..., 640).
  for name in ('mean', 'var'):
    changed = np.asarray(new[name] != old[name])
    assert changed[row, :288].all() and not changed[row, 288:].any()
    assert not np.delete(changed, row, axis=0).any()
  # PyTorch convention on the stem: momentum 0.1, unbiased running variance.
  stem = model.apply(variables, x, 16, method=lambda m, x, w: m.stem_conv(x, w))
  stem = np.asarray(stem, np.float64).reshape(-1, 16)
  old_stem = variables['batch_stats']['stem_bn']
  new_stem = updated['batch_stats']['stem_bn']
  np.testing.assert_allclose(new_stem['mean'][0, :16],
                             0.9 * old_stem['mean'][0, :16] + 0.1 * stem.mean(0), rtol=1e-5)
  np.testing.assert_allclose(new_stem['var'][0, :16],
                             0.9 * old_stem['var'][0, :16] + 0.1 * stem.var(0, ddof=1), rtol=1e-4)


def test_dropout_only_on_largest(model_and_variables):
  model, variables = model_and_variables
  x = images(2)

  @jax.jit(static_argnames='route')
  def run(route, seed):
    out, _ = model.apply(variables, x, route=route, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(seed)})
    return out
  assert not np.allclose(run('largest', 0), run('largest', 1))
  np.testing.assert_array_equal(run(13, 0), run(13, 1))
