"""Per-example widths for the masked path (gate training only).

The sliced path passes widths as Python ints and slices dense tensors. The masked path keeps
shapes fixed at the widest choice and zeroes channels past each example's width; the
per-example choice is a one-hot (or straight-through) weight over a few widths, so the masks,
and everything computed from them, are differentiable in those weights.
"""
from __future__ import annotations

from typing import Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class MaskedWidth:
  """Width chosen per example among `choices` by `weights` (batch, len(choices)).

  `authors`: the authors' mask placement (their DS-MBNet code): every dynamic conv's output is
  masked as well, and BatchNorm mixes per-width statistics padded with zeros past each width.
  Under a one-hot the values are the same; the gradients in `weights` are theirs.
  """
  weights: jax.Array
  choices: tuple[int, ...] = flax.struct.field(pytree_node=False)
  authors: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def max(self) -> int:
    return max(self.choices)

  def mask(self) -> jax.Array:
    """(batch, max) channel mask: sum_k weights[:, k] * [c < choices[k]]."""
    return self.weights @ self.keep(self.max, self.weights.dtype)

  def apply(self, x: jax.Array) -> jax.Array:
    """Zeroes the channels (last axis) of `x` past each example's width."""
    return x * _broadcast(self.mask().astype(x.dtype), x.ndim)

  def conv_output(self, x: jax.Array) -> jax.Array:
    """A dynamic conv's output: masked in the authors' placement, else as it is (the layer
    after it masks)."""
    return self.apply(x) if self.authors else x

  def keep(self, width: int, dtype) -> jax.Array:
    """(len(choices), width): 1 where a channel lies within each choice."""
    return jnp.asarray(np.arange(width)[None, :] < np.asarray(self.choices)[:, None], dtype)

  def select(self, rows: jax.Array, ndim: int) -> jax.Array:
    """Mixes per-choice rows (len(choices), C) into per-example rows, broadcastable to ndim."""
    return _broadcast(self.weights.astype(rows.dtype) @ rows, ndim)


def _broadcast(per_example: jax.Array, ndim: int) -> jax.Array:
  """(batch, C) -> (batch, 1, ..., 1, C) with `ndim` axes."""
  return per_example.reshape(per_example.shape[:1] + (1,) * (ndim - 2) + per_example.shape[1:])


Width = Union[int, MaskedWidth]


def channels(width: Width) -> int:
  """Channels a layer computes for `width`: the width itself, or the widest masked choice."""
  return width.max if isinstance(width, MaskedWidth) else width
