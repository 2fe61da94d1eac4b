"""Squeeze-and-excitation and the double-headed gate built on it.

In a model with a low-precision compute dtype these run in float32: the pooled vector is
float32 (`global_avg_pool`), so the SE's two small linears and the routing head are too, and
only the attention head's output is cast to the feature map's dtype before it rescales it.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsnet_jax.layers.linear import Dense, conv_kernel_init


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of NHWC, in at least float32 whatever x's dtype (summed in
  float32 and not rounded back: the vector feeds the SE, the gate and the classifier). Counted
  as C*H*W MAdds in complexity.py."""
  return x.mean(axis=(1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32))


class SqueezeExcite(nn.Module):
  """x * sigmoid(W_exp(relu(W_red(GAP(x))))); W_red sliced on its input, W_exp on its output.

  The reduced width is fixed (never sliced). The two 1x1 convs are Dense layers on the pooled
  vector, initialised like the authors' 1x1 convs.
  """
  in_features: int
  reduced: int

  def setup(self):
    self.conv_reduce = Dense(self.in_features, self.reduced,
                             kernel_init=conv_kernel_init(self.reduced))
    self.conv_expand = Dense(self.reduced, self.in_features,
                             kernel_init=conv_kernel_init(self.in_features))

  def squeeze(self, x: jax.Array) -> jax.Array:
    """The reduced vector z = relu(W_red(GAP(x))), shape (batch, reduced)."""
    return nn.relu(self.conv_reduce(global_avg_pool(x)))

  def excite(self, x: jax.Array, z: jax.Array, width=None) -> jax.Array:
    """x rescaled by sigmoid(W_exp(z)); `width` (a MaskedWidth) masks W_exp's output in the
    authors' placement."""
    logits = self.conv_expand(z, x.shape[-1])
    if width is not None:
      logits = width.conv_output(logits)
    return x * nn.sigmoid(logits)[:, None, None, :].astype(x.dtype)

  def __call__(self, x: jax.Array, width=None) -> jax.Array:
    return self.excite(x, self.squeeze(x), width)


class DoubleHeadedGate(nn.Module):
  """The DS-Net gate: the SE is its attention head; a bias-free linear on the SE's reduced
  vector is its routing head. Returns (x rescaled by the attention head, routing logits)."""
  in_features: int
  reduced: int
  num_routes: int

  def setup(self):
    self.se = SqueezeExcite(self.in_features, self.reduced)
    self.routing_head = Dense(self.reduced, self.num_routes, use_bias=False,
                              kernel_init=conv_kernel_init(self.num_routes))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = self.se.squeeze(x)
    return self.se.excite(x, z), self.route(z)

  def route(self, z: jax.Array) -> jax.Array:
    """Routing logits (batch, R) of the reduced vector, computed in float32 (argmax, Gumbel
    noise and calibrated offsets act on them)."""
    return self.routing_head(z.astype(jnp.float32))
