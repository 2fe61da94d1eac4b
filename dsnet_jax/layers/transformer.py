"""Sliceable transformer pieces: LayerNorm, multi-head attention, MLP, patch embedding, token gate.

Every parameter is stored at full size and prefix-sliced at call time. A width argument is a
Python int on the sliced path (dense, smaller tensors) or a `MaskedWidth` on the masked path
(shapes fixed at the widest choice, channels past each example's width zeroed).

Heads are sliced whole: q, k and v are separate Dense layers of shape (width, heads * head_dim)
with head-major columns, so the first h heads are the column prefix [:h * head_dim] and
head_dim never changes.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsnet_jax.layers.linear import Dense, conv_kernel_init
from dsnet_jax.layers.width import MaskedWidth, Width, channels

trunc_normal_init = nn.initializers.truncated_normal(stddev=0.02)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis for a layer that runs at several widths.

  Sliced path: normalises over all x.shape[-1] channels with scale/bias[:width]. Masked path:
  each example normalises over its own first d channels (mean and variance divided by its d),
  and the output is zero past d, so it equals that example's sliced output, zero-padded.
  """
  features: int
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, width: MaskedWidth | None = None) -> jax.Array:
    w = x.shape[-1]
    if not 0 < w <= self.features:
      raise ValueError(f'{self.name}: width {w} does not fit the full width {self.features}')
    scale = self.param('scale', nn.initializers.ones, (self.features,))[:w]
    bias = self.param('bias', nn.initializers.zeros, (self.features,))[:w]
    x32 = x.astype(jnp.float32)
    if width is None:
      mean = x32.mean(-1, keepdims=True)
      var = jnp.square(x32 - mean).mean(-1, keepdims=True)
      return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)
    if width.max != w:
      raise ValueError(f'{self.name}: masked width {width.choices} needs {width.max} channels, '
                       f'got {w}')
    mask = width.apply(jnp.ones((x.shape[0],) + (1,) * (x.ndim - 2) + (w,), jnp.float32))
    count = width.select(jnp.asarray(width.choices, jnp.float32)[:, None], x.ndim)
    mean = (x32 * mask).sum(-1, keepdims=True) / count
    var = (jnp.square(x32 - mean) * mask).sum(-1, keepdims=True) / count
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return (y * mask).astype(x.dtype)


def head_channels(heads: Width, head_dim: int) -> Width:
  """Heads -> the channels of the merged (heads * head_dim) axis."""
  if isinstance(heads, MaskedWidth):
    return MaskedWidth(heads.weights, tuple(h * head_dim for h in heads.choices))
  return heads * head_dim


class MultiHeadAttention(nn.Module):
  """Self-attention on x (batch, tokens, d) with `heads` whole heads; output width d.

  q/k/v kernels are (features, num_heads * head_dim) sliced to [:d, :heads * head_dim]; the
  output projection (num_heads * head_dim, features) to [:heads * head_dim, :d].
  """
  features: int
  num_heads: int
  head_dim: int
  dtype: jnp.dtype | None = None

  def setup(self):
    inner = self.num_heads * self.head_dim
    dense = lambda i, o: Dense(i, o, kernel_init=trunc_normal_init, dtype=self.dtype)
    self.query = dense(self.features, inner)
    self.key = dense(self.features, inner)
    self.value = dense(self.features, inner)
    self.out = dense(inner, self.features)

  def __call__(self, x: jax.Array, heads: Width) -> jax.Array:
    h = channels(heads)
    if not 0 < h <= self.num_heads:
      raise ValueError(f'{self.name}: {h} heads do not fit {self.num_heads}')
    inner = h * self.head_dim
    split = lambda t: t.reshape(t.shape[:-1] + (h, self.head_dim))
    q = split(self.query(x, inner)) * (self.head_dim ** -0.5)
    k = split(self.key(x, inner))
    v = split(self.value(x, inner))
    # Scores straight from the float32 accumulator (not rounded to a low-precision compute
    # dtype first), softmax in float32; the probabilities then in v's dtype.
    scores = jnp.einsum('bqhc,bkhc->bhqk', q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    o = jnp.einsum('bhqk,bkhc->bqhc', probs, v).reshape(x.shape[:-1] + (inner,))
    if isinstance(heads, MaskedWidth):
      o = head_channels(heads, self.head_dim).apply(o)
    return self.out(o, x.shape[-1])


class Mlp(nn.Module):
  """fc1 (features -> hidden[:m]) -> exact GELU -> dropout -> fc2 (-> d); d = x.shape[-1]."""
  features: int
  hidden: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype | None = None

  def setup(self):
    self.fc1 = Dense(self.features, self.hidden, kernel_init=trunc_normal_init, dtype=self.dtype)
    self.fc2 = Dense(self.hidden, self.features, kernel_init=trunc_normal_init, dtype=self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, x: jax.Array, hidden: Width, deterministic: bool = True) -> jax.Array:
    y = nn.gelu(self.fc1(x, channels(hidden)), approximate=False)
    if isinstance(hidden, MaskedWidth):
      y = hidden.apply(y)
    y = self.dropout(y, deterministic=deterministic)
    return self.fc2(y, x.shape[-1])


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> full-width tokens (a stride-p VALID conv, never sliced)."""
  in_channels: int
  features: int
  patch_size: int
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (p, p, self.in_channels, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    dtype = self.dtype or images.dtype
    y = jax.lax.conv_general_dilated(
        images.astype(dtype), kernel.astype(dtype), window_strides=(p, p), padding='VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y + bias.astype(dtype)
    return y.reshape(y.shape[0], -1, self.features)


class TokenGate(nn.Module):
  """The double-headed gate for token sequences, reading the class token.

  z = relu(W_red(LN(cls[:width]))) is shared by both heads. The attention head rescales every
  channel of every token, SE-style: tokens * sigmoid(W_exp(z)) over the full width (the later
  groups may read any prefix of the stream). The routing head is a bias-free linear z -> R
  logits. W_red is sliced on its input; W_exp and the routing head are never sliced. The
  gate runs in float32 on the class token whatever the tokens' dtype; only the attention head's
  output is cast to it. With `attention` False there is no attention head (no W_exp): the
  tokens pass unchanged and the gate only routes.
  """
  features: int
  reduced: int
  num_routes: int
  attention: bool = True

  def setup(self):
    self.norm = LayerNorm(self.features)
    self.reduce = Dense(self.features, self.reduced, kernel_init=conv_kernel_init(self.reduced))
    self.expand = Dense(self.reduced, self.features, kernel_init=conv_kernel_init(self.features))
    self.routing_head = Dense(self.reduced, self.num_routes, use_bias=False,
                              kernel_init=conv_kernel_init(self.num_routes))

  def __call__(self, tokens: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    z = nn.relu(self.reduce(self.norm(tokens[:, 0, :width].astype(jnp.float32))))
    if not self.attention:
      return tokens, self.routing_head(z)
    attention = nn.sigmoid(self.expand(z)).astype(tokens.dtype)
    return tokens * attention[:, None, :], self.routing_head(z)
