"""Sliceable layers: the fast CPU forms of depthwise and pointwise convs equal XLA's conv."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsnet_jax.layers import Conv
from dsnet_jax.layers import linear
from dsnet_jax.layers.linear import depthwise_implementation


@pytest.mark.parametrize('size', [9, 8])
@pytest.mark.parametrize('kernel', [3, 5])
@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_taps_equal_grouped_conv_values_and_gradients(stride, kernel, size):
  """The taps' written-out gradient (input and kernel) against autodiff of XLA's conv."""
  conv = Conv(8, 8, kernel, stride, depthwise=True)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
  params = conv.init(jax.random.key(1), x)

  def run(impl):
    with depthwise_implementation(impl):
      f = lambda p, x: (conv.apply(p, x) ** 2).sum()
      return conv.apply(params, x), jax.grad(f, argnums=(0, 1))(params, x)
  (y_conv, g_conv), (y_taps, g_taps) = run('conv'), run('taps')
  out = (size - 1) // stride + 1
  assert y_conv.shape == (2, out, out, 6)
  np.testing.assert_allclose(y_taps, y_conv, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_taps), jax.tree.leaves(g_conv)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_kernel_gradient_over_chunks_of_images(stride, monkeypatch):
  """The kernel's gradient summed chunk by chunk (a loop over 3 chunks of 2 images) against
  autodiff of XLA's conv."""
  conv = Conv(8, 8, 3, stride, depthwise=True)
  x = jax.random.normal(jax.random.key(0), (6, 9, 9, 6))
  params = conv.init(jax.random.key(1), x)
  monkeypatch.setattr(linear, '_KERNEL_GRADIENT_CHUNK_BYTES', 2 * 11 * 11 * 6 * 4)
  loss = lambda p: (conv.apply(p, x) ** 2).sum()
  grads = {}
  for impl in ('conv', 'taps'):
    with depthwise_implementation(impl):
      grads[impl] = jax.jit(jax.grad(loss))(params)['params']['kernel']
  np.testing.assert_allclose(grads['taps'], grads['conv'], rtol=1e-4, atol=1e-4)
  assert 'while' in jax.jit(jax.grad(loss)).lower(params).as_text()


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_conv_is_the_sliced_matmul(stride):
  conv = Conv(8, 16, 1, stride)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
  params = conv.init(jax.random.key(1), jnp.zeros((1, 6, 6, 8)))
  y = conv.apply(params, x, 12)
  kernel = np.asarray(params['params']['kernel'])[0, 0, :5, :12]
  expected = np.einsum('nhwc,cd->nhwd', np.asarray(x)[:, ::stride, ::stride], kernel)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_unknown_depthwise_implementation():
  with pytest.raises(ValueError, match="'conv', 'taps'"):
    with depthwise_implementation('winograd'):
      pass
