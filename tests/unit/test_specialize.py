"""specialize: a function of (variables, inputs) partially evaluated at the variables, against
NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsnet_jax.specialize import specialize

EPS = 1e-5


def variables(seed=0):
  rng = np.random.default_rng(seed)
  return {'params': {'conv': {'kernel': rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
                     'bn': {'scale': rng.uniform(0.5, 1.5, 8).astype(np.float32),
                            'bias': rng.normal(size=8).astype(np.float32)},
                     'head': {'kernel': rng.normal(size=(8, 5)).astype(np.float32),
                              'bias': rng.normal(size=5).astype(np.float32)}},
          # Two rows of statistics, per width as in SlicedBatchNorm.
          'batch_stats': {'bn': {'mean': rng.normal(size=(2, 8)).astype(np.float32),
                                 'var': rng.uniform(0.5, 1.5, (2, 8)).astype(np.float32)}}}


def sliced_net(v, x, width=6, row=1):
  """conv (prefix slice) -> BatchNorm with row `row` of its statistics -> relu -> pool -> dense."""
  p, s = v['params'], v['batch_stats']
  y = jax.lax.conv_general_dilated(x, p['conv']['kernel'][:, :, :, :width], (1, 1),
                                   ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = ((y - s['bn']['mean'][row, :width]) * jax.lax.rsqrt(s['bn']['var'][row, :width] + EPS)
       * p['bn']['scale'][:width] + p['bn']['bias'][:width])
  y = jax.nn.relu(y).mean(axis=(1, 2))
  return y @ p['head']['kernel'][:width] + p['head']['bias']


def numpy_net(v, x, width=6, row=1):
  p, s = v['params'], v['batch_stats']
  k = p['conv']['kernel'][..., :width].astype(np.float64)
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  y = sum(np.einsum('nhwc,cd->nhwd', xp[:, i:i + h, j:j + w], k[i, j])
          for i in range(3) for j in range(3))
  y = ((y - s['bn']['mean'][row, :width]) / np.sqrt(s['bn']['var'][row, :width] + EPS)
       * p['bn']['scale'][:width] + p['bn']['bias'][:width])
  y = np.maximum(y, 0).mean(axis=(1, 2))
  return y @ p['head']['kernel'][:width] + p['head']['bias']


def test_slices_and_folds_batchnorm_into_the_conv():
  v = variables()
  batch = jax.export.symbolic_shape('batch')[0]
  program = specialize(sliced_net, v, jax.ShapeDtypeStruct((batch, 6, 6, 4), jnp.float32))
  shapes = {name: p.shape for name, p in program.params.items()}
  # The conv's prefix slice with the row-1 BatchNorm folded in (kernel * s, bias t); the head's
  # rows for width 6. No statistics, no BN affine, no unused rows or channels.
  assert shapes == {'conv/kernel': (3, 3, 4, 6), 'conv/bias': (6,),
                    'head/kernel': (6, 5), 'head/bias': (5,)}
  assert program.num_params == 3 * 3 * 4 * 6 + 6 + 6 * 5 + 5
  assert not {'rsqrt', 'sub', 'slice'} & set(program.primitives)
  p, s = v['params'], v['batch_stats']
  scale = p['bn']['scale'][:6] / np.sqrt(s['bn']['var'][1, :6].astype(np.float64) + EPS)
  np.testing.assert_allclose(program.params['conv/kernel'], p['conv']['kernel'][..., :6] * scale,
                             rtol=1e-6)
  np.testing.assert_allclose(program.params['conv/bias'],
                             p['bn']['bias'][:6] - s['bn']['mean'][1, :6] * scale, rtol=1e-5,
                             atol=1e-6)
  for n in (1, 3):  # The batch stayed symbolic.
    x = np.random.default_rng(n).normal(size=(n, 6, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(program.call(x), numpy_net(v, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(program.call(x), sliced_net(v, x), rtol=1e-5, atol=1e-5)


def test_a_chain_that_cannot_fold_stays_exact():
  """A conv output used twice, and a per-position (not per-channel) scale, are left alone."""
  v = variables()

  def net(v, x):
    y = jax.lax.conv_general_dilated(x, v['params']['conv']['kernel'], (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    z = y * v['params']['bn']['scale']  # Foldable on its own, but y is also used below.
    return z + y * jnp.arange(6.0)[:, None, None]  # Per-row scale: not foldable.

  x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype(np.float32)
  program = specialize(net, v, jax.ShapeDtypeStruct(x.shape, jnp.float32))
  assert set(program.params) == {'conv/kernel', 'bn/scale'}
  np.testing.assert_allclose(program.call(x), net(v, x), rtol=1e-5, atol=1e-5)


def test_depthwise_taps_and_onnx_max_pool_compute_the_same():
  rng = np.random.default_rng(0)
  v = {'dw': rng.normal(size=(3, 3, 1, 5)).astype(np.float32)}

  def net(v, x):
    y = jax.lax.conv_general_dilated(x, v['dw'], (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     feature_group_count=5)
    return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))

  x = rng.normal(size=(2, 9, 9, 5)).astype(np.float32)
  program = specialize(net, v, jax.ShapeDtypeStruct(x.shape, jnp.float32))
  want = np.asarray(jax.jit(net)(v, x))
  params = {k: jnp.asarray(a) for k, a in program.params.items()}
  xla = jax.jit(lambda p, x: program(p, x))(params, x)  # Taps on this CPU.
  onnx = jax.jit(lambda p, x: program(p, x, onnx=True))(params, x)  # Max of shifted windows.
  np.testing.assert_allclose(xla, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(onnx, want)  # The same grouped conv; a max is exact.
  with pytest.raises(KeyError, match='params lack'):
    program({}, x)
