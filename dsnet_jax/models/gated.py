"""The base of every gated supernet, and its contract with the rest of the library.

A subclass defines `routes` (a RouteTable), `in_channels`, and three Flax methods:
`prefix(images, train, route)` -> (hidden, routing logits) up to and including the gate,
`suffix(hidden, route, train)` -> logits on dense slices, and `masked_suffix(hidden,
route_weights)` -> logits with per-example widths by masks. Everything outside `models/` uses
the typed entry points below (`apply_prefix`, `apply_suffix`, `apply_gated`, `routing_madds`).
A model's `dtype` is its compute dtype; what stays float32 is in docs/design.md.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax.complexity import route_complexity

RouteChoice = Callable[[jax.Array], jax.Array]
# Parameter paths ('a/b/kernel') of the routing head: the gate's route logits, trained in
# Stage II only.
ROUTING_HEAD = r'(.*/)?routing_head/.*'
# The variables collection of the budget calibration's per-route logit offsets (inference only).
ROUTING_COLLECTION = 'routing'


def argmax_choice(routing_logits: jax.Array) -> jax.Array:
  """One-hot (batch, R) weights of each example's highest routing logit (inference routing)."""
  return jax.nn.one_hot(jnp.argmax(routing_logits, -1), routing_logits.shape[-1],
                        dtype=routing_logits.dtype)


def check_images(images, in_channels: int, where: str) -> None:
  """Raises ValueError unless `images` is a floating (batch, H, W, in_channels) array.

  Shapes are static, so under jit this costs nothing at run time.
  """
  shape = tuple(getattr(images, 'shape', np.shape(images)))
  dtype = np.dtype(getattr(images, 'dtype', np.float32))
  if len(shape) != 4:
    raise ValueError(f'{where}: images must be (batch, H, W, {in_channels}) (NHWC), got shape '
                     f'{shape}')
  if shape[-1] != in_channels:
    hint = (f'; it looks channels-first (NCHW): transpose to (batch, H, W, C)'
            if shape[1] == in_channels else '')
    raise ValueError(f'{where}: images must be (batch, H, W, {in_channels}) (NHWC), got shape '
                     f'{shape}{hint}')
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{where}: images must be floating point (normalised as in training), '
                     f'got {dtype}')


class GatedSupernet(nn.Module):
  """`__call__` (one route for the batch), `masked` (one route per example), the contract."""

  def __call__(self, images, route, train: bool = False):
    """Logits of `route` (a Route or its name), computed on dense slices."""
    check_images(images, self.in_channels, type(self).__name__)
    route = self.routes[route]
    hidden, _ = self.prefix(images, train, route)
    return self.suffix(hidden, route, train)

  def masked(self, images, route_weights, authors_masks: bool = False):
    """Per-example routes over the routing space by masks (gate training; eval-mode BN, no
    dropout).

    Args:
      images: (batch, H, W, C).
      route_weights: (batch, R) one-hot (or straight-through) weights over the routing space.
    Returns:
      (logits, routing logits). Each example's logits equal its route's sliced logits.
    """
    check_images(images, self.in_channels, type(self).__name__)
    hidden, routing_logits = self.prefix(images, False)
    return self.masked_suffix(hidden, route_weights, authors_masks), routing_logits

  # --- the contract: pure functions of variables, used everywhere outside models/ ---------

  @nn.nowrap
  def init_variables(self, key: jax.Array, image_shape) -> dict[str, Any]:
    """Full-size {'params', 'batch_stats'} (batch_stats empty without BatchNorm)."""
    images = jnp.zeros((1, *image_shape), jnp.float32)
    variables = self.init(key, images, route=self.routes.largest)
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}

  @nn.nowrap
  def abstract_variables(self, image_shape) -> dict[str, Any]:
    """`init_variables` as ShapeDtypeStructs, without allocating or computing anything."""
    init = functools.partial(self.init_variables, image_shape=tuple(image_shape))
    return jax.eval_shape(init, jax.random.key(0))

  @nn.nowrap
  def apply_prefix(self, variables, images) -> tuple[Any, jax.Array]:
    """(hidden, routing logits (batch, R)) of eval-mode images at the routing space's prefix.

    The routing logits include the budget calibration's offsets when `variables` hold them
    (`variables['routing']['offsets']`, (R,), see `dsnet_jax.budget`).
    """
    check_images(images, self.in_channels, type(self).__name__)
    hidden, routing_logits = self.apply(variables, images, method=type(self).prefix)
    routing = variables.get(ROUTING_COLLECTION, {})
    if 'offsets' in routing:
      routing_logits = routing_logits + routing['offsets']
    return hidden, routing_logits

  @nn.nowrap
  def apply_suffix(self, variables, hidden, route) -> jax.Array:
    """Logits (batch, classes) of `route` from the prefix's `hidden`, on dense slices."""
    return self.apply(variables, hidden, self.routes[route], method=type(self).suffix)

  @nn.nowrap
  def apply_gated(self, variables, images, choose: RouteChoice = argmax_choice,
                  authors_masks: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gated model with per-example routes by masks, in one program (fixed shapes).

    Args:
      variables: the model's variables.
      images: (batch, H, W, C).
      choose: routing logits (batch, R) -> route weights (batch, R); default argmax one-hot,
        gate training passes Gumbel straight-through weights.
      authors_masks: the authors' mask placement in the masked suffix (DS-MBNet; the same
        values, their gradients in the route weights).
    Returns:
      (logits (batch, classes), routing logits (batch, R), route weights (batch, R)).
    """
    hidden, routing_logits = self.apply_prefix(variables, images)
    weights = choose(routing_logits)
    logits = self.apply(variables, hidden, weights, authors_masks,
                        method=type(self).masked_suffix)
    return logits, routing_logits, weights

  @nn.nowrap
  def routing_madds(self, image_shape) -> np.ndarray:
    """MAdds per image (float64, (R,)) of each routing-space route, gate included."""
    return np.asarray([route_complexity(self, r, tuple(image_shape), with_gate=True).madds
                       for r in self.routes.routing_space], np.float64)
