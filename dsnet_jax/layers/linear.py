"""Sliceable Dense and Conv: full-size parameters, prefix-sliced with Python ints at call time."""
from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv_kernel_init(fan_out: int) -> nn.initializers.Initializer:
  """N(0, sqrt(2 / fan_out)), fan_out = k * k * c_out / groups (the authors' init)."""
  return nn.initializers.normal(stddev=math.sqrt(2.0 / fan_out))


def linear_kernel_init(features: int) -> nn.initializers.Initializer:
  """U(-1/sqrt(out), 1/sqrt(out)) (the authors' classifier init)."""
  bound = 1.0 / math.sqrt(features)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
  """y = x @ kernel[:d_in, :d_out] + bias[:d_out]; d_in is read off x, d_out is an argument."""
  in_features: int
  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer | None = None
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, out_features: int | None = None) -> jax.Array:
    out = self.features if out_features is None else out_features
    d_in = x.shape[-1]
    _check_slice(self, d_in, self.in_features, out, self.features)
    init = self.kernel_init or linear_kernel_init(self.features)
    kernel = self.param('kernel', init, (self.in_features, self.features))[:d_in, :out]
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))[:out].astype(dtype)
    return y


class Conv(nn.Module):
  """2-D conv on NHWC with explicit symmetric padding (k-1)//2, as PyTorch pads.

  Regular: kernel (k, k, in_features, features) sliced to [:, :, :c_in, :c_out].
  Depthwise: kernel (k, k, 1, features) sliced to [..., :c_in]; output width = input width.
  """
  in_features: int
  features: int
  kernel_size: int = 3
  stride: int = 1
  depthwise: bool = False
  use_bias: bool = False
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, out_features: int | None = None) -> jax.Array:
    c_in = x.shape[-1]
    k = self.kernel_size
    if self.depthwise:
      out = c_in
      fan_out = k * k
      shape = (k, k, 1, self.features)
    else:
      out = self.features if out_features is None else out_features
      fan_out = k * k * self.features
      shape = (k, k, self.in_features, self.features)
    _check_slice(self, c_in, self.in_features, out, self.features)
    kernel = self.param('kernel', conv_kernel_init(fan_out), shape)
    kernel = kernel[..., :out] if self.depthwise else kernel[:, :, :c_in, :out]
    dtype = self.dtype or x.dtype
    pad = (k - 1) // 2
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if self.depthwise and _depthwise_by_taps():
      y = depthwise_conv_by_taps(x, kernel, self.stride, pad)
    elif k == 1 and not self.depthwise:  # A pointwise conv is a matmul; XLA:CPU runs it faster.
      y = jnp.dot(x[:, ::self.stride, ::self.stride], kernel[0, 0])
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride, self.stride), padding=((pad, pad), (pad, pad)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=c_in if self.depthwise else 1)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))[:out].astype(dtype)
    return y


# How depthwise convs run: 'auto' (taps on CPU, XLA's grouped conv elsewhere), 'conv', 'taps'.
_DEPTHWISE_IMPLEMENTATION = ['auto']


@contextlib.contextmanager
def depthwise_implementation(name: str):
  """Forces how depthwise convs are traced inside the block ('conv' or 'taps')."""
  if name not in ('auto', 'conv', 'taps'):
    raise ValueError(f"depthwise implementation {name!r}; valid: 'auto', 'conv', 'taps'")
  _DEPTHWISE_IMPLEMENTATION.append(name)
  try:
    yield
  finally:
    _DEPTHWISE_IMPLEMENTATION.pop()


def _depthwise_by_taps() -> bool:
  name = _DEPTHWISE_IMPLEMENTATION[-1]
  return name == 'taps' or (name == 'auto' and jax.default_backend() == 'cpu')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_by_taps(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise conv as a sum of k*k strided, shifted, per-channel-scaled copies of x.

  The same arithmetic as the grouped conv, but XLA:CPU runs it 4-9x faster (forward and
  backward) than its grouped `conv_general_dilated`, which dominated CPU time of DS-MBNet.
  Its gradient is written out (`_taps_backward`): autodiff's would pad every tap's cotangent
  to the input's size and add k*k of them; the written one reads one padded copy.
  """
  return _taps(x, kernel, stride, pad)


def _taps(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  k = kernel.shape[0]
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  y = None
  for i in range(k):
    for j in range(k):
      tap = jax.lax.slice(x, (0, i, j, 0), (n, i + (h_out - 1) * stride + 1,
                                            j + (w_out - 1) * stride + 1, c),
                          (1, stride, stride, 1))
      y = tap * kernel[i, j, 0] if y is None else y + tap * kernel[i, j, 0]
  return y


def _taps_forward(x, kernel, stride, pad):
  return _taps(x, kernel, stride, pad), (x, kernel)


def _taps_backward(stride, pad, residuals, dy):
  """dx: dy dilated by the stride, padded, correlated with the flipped kernel (the same taps
  form at stride 1); dkernel: `_kernel_gradient`."""
  x, kernel = residuals
  k = kernel.shape[0]
  h, w = x.shape[1:3]
  h_out, w_out = dy.shape[1:3]
  lo = k - 1 - pad
  dilated = jax.lax.pad(dy, jnp.zeros((), dy.dtype), (
      (0, 0, 0), (lo, h - 1 + pad - (h_out - 1) * stride, stride - 1),
      (lo, w - 1 + pad - (w_out - 1) * stride, stride - 1), (0, 0, 0)))
  dx = _taps(dilated, kernel[::-1, ::-1], 1, 0)
  return dx.astype(x.dtype), _kernel_gradient(x, dy, k, stride, pad).astype(kernel.dtype)


# Bytes of padded input per chunk of images in `_kernel_gradient` (about a core's L2 cache).
_KERNEL_GRADIENT_CHUNK_BYTES = 1 << 20


def _kernel_gradient(x, dy, k: int, stride: int, pad: int) -> jax.Array:
  """dkernel[i, j, 0, c]: the sum over batch and space of tap (i, j) of x times dy, in float32.

  A loop over chunks of images of about `_KERNEL_GRADIENT_CHUNK_BYTES` of padded input each
  sums all k*k taps of a chunk before the next (docs/design.md, "Depthwise convs on the CPU")."""
  n, c = x.shape[0], x.shape[3]
  h_out, w_out = dy.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  per_image = padded[0].size * padded.dtype.itemsize
  size = max([b for b in range(1, n + 1)
              if n % b == 0 and b * per_image <= _KERNEL_GRADIENT_CHUNK_BYTES] or [1])

  def chunk_sums(index, total):
    xs = jax.lax.dynamic_slice_in_dim(padded, index * size, size)
    dys = jax.lax.dynamic_slice_in_dim(dy, index * size, size)
    return total + jnp.stack([
        jnp.sum((jax.lax.slice(xs, (0, i, j, 0), (size, i + (h_out - 1) * stride + 1,
                                                  j + (w_out - 1) * stride + 1, c),
                               (1, stride, stride, 1)) * dys).astype(jnp.float32),
                axis=(0, 1, 2)) for i in range(k) for j in range(k)])

  sums = jax.lax.fori_loop(0, n // size, chunk_sums, jnp.zeros((k * k, c), jnp.float32))
  return sums.reshape(k, k, 1, c)


depthwise_conv_by_taps.defvjp(_taps_forward, _taps_backward)


def _check_slice(module: nn.Module, d_in: int, in_max: int, d_out: int, out_max: int):
  if not (0 < d_in <= in_max and 0 < d_out <= out_max):
    raise ValueError(
        f'{module.name or type(module).__name__}: slice {d_in}->{d_out} does not fit the full '
        f'size {in_max}->{out_max}')
