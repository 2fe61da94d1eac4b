"""BatchNorm with one shared full-width affine and private running statistics per width."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsnet_jax.layers.width import MaskedWidth


class SlicedBatchNorm(nn.Module):
  """PyTorch-convention BatchNorm over the last axis for a layer that runs at several widths.

  Parameters `scale`/`bias` are full width and prefix-sliced. Running statistics are stored
  as rows `mean`/`var` of shape (len(widths), max(widths)): row i holds the statistics of
  width `widths[i]` in its first `widths[i]` entries (the authors' `aux_bn.{i}`).
  Training normalises with the biased batch variance and tracks the unbiased one with
  momentum 0.1; eps is 1e-5.

  BN recalibration makes the collection `bn_moments` mutable: each training-mode call then
  also adds its batch mean / unbiased variance to per-row sums and counts, from which
  `bn_calibration` sets exact cumulative averages (PyTorch's momentum=None).
  """
  widths: Sequence[int]
  momentum: float = 0.1
  epsilon: float = 1e-5
  # Zeros for a residual block's last BN, so the block starts as its shortcut.
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  def setup(self):
    full = max(self.widths)
    n = len(self.widths)
    self.scale = self.param('scale', self.scale_init, (full,))
    self.bias = self.param('bias', nn.initializers.zeros, (full,))
    self.mean = self.variable('batch_stats', 'mean', jnp.zeros, (n, full), jnp.float32)
    self.var = self.variable('batch_stats', 'var', jnp.ones, (n, full), jnp.float32)
    if self.is_mutable_collection('bn_moments') and not self.is_initializing():
      self.mean_sum = self.variable('bn_moments', 'mean_sum', jnp.zeros, (n, full), jnp.float32)
      self.var_sum = self.variable('bn_moments', 'var_sum', jnp.zeros, (n, full), jnp.float32)
      self.count = self.variable('bn_moments', 'count', jnp.zeros, (n,), jnp.float32)

  def row(self, width: int) -> int:
    if width not in self.widths:
      raise ValueError(f'{self.name}: no statistics for width {width}; widths: {list(self.widths)}')
    return list(self.widths).index(width)

  def __call__(self, x: jax.Array, train: bool, width: MaskedWidth | None = None) -> jax.Array:
    """Sliced path when `width` is None (width = x.shape[-1]); masked path for a MaskedWidth."""
    if width is not None:
      return self._masked(x, train, width)
    w = x.shape[-1]
    i = self.row(w)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)
      if not self.is_initializing():
        n = x.size // w
        m = self.momentum
        unbiased = var * (n / max(n - 1, 1))
        self.mean.value = self.mean.value.at[i, :w].set((1 - m) * self.mean.value[i, :w] + m * mean)
        self.var.value = self.var.value.at[i, :w].set(
            (1 - m) * self.var.value[i, :w] + m * unbiased)
        if self.is_mutable_collection('bn_moments'):
          self._accumulate_moments(i, mean, unbiased)
    else:
      mean, var = self.mean.value[i, :w], self.var.value[i, :w]
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[:w] + self.bias[:w]
    return y.astype(x.dtype)

  def _accumulate_moments(self, i: int, mean: jax.Array, var: jax.Array):
    w = mean.shape[0]
    self.mean_sum.value = self.mean_sum.value.at[i, :w].add(mean)
    self.var_sum.value = self.var_sum.value.at[i, :w].add(var)
    self.count.value = self.count.value.at[i].add(1.0)

  def _masked(self, x: jax.Array, train: bool, width: MaskedWidth) -> jax.Array:
    if train:
      raise ValueError(f'{self.name}: the masked path runs BatchNorm with running statistics '
                       '(train=False); train BN on the sliced path')
    w = x.shape[-1]
    rows = jnp.asarray([self.row(c) for c in width.choices])
    mean, var = self.mean.value[rows, :w], self.var.value[rows, :w]
    if width.authors:  # Each width's statistics padded with zeros past it, as theirs.
      keep = width.keep(w, mean.dtype)
      mean, var = mean * keep, var * keep
    mean, var = width.select(mean, x.ndim), width.select(var, x.ndim)
    x32 = x.astype(jnp.float32)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[:w] + self.bias[:w]
    return width.apply(y).astype(x.dtype)


def statistics_widths(model, image_shape: Sequence[int]) -> dict[str, list[int]]:
  """{module path ('groups_0_0/bn1'): widths} of every SlicedBatchNorm in `model`: row i of its
  `batch_stats` `mean`/`var` holds the statistics of width widths[i] (in its first widths[i]
  entries). Checkpoints record it (meta `statistics_widths`), so that they describe themselves.
  Traced with abstract shapes only (nothing is computed)."""
  found = {}

  def record(call, args, kwargs, context):
    if isinstance(context.module, SlicedBatchNorm):
      found['/'.join(context.module.path)] = [int(w) for w in context.module.widths]
    return call(*args, **kwargs)

  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, route=model.routes.largest), image)
  return dict(sorted(found.items()))

