"""DS-MBNet: the authors' dynamic MobileNetV1 supernet (reference section 2).

stem 3x3 conv -> 5 groups of depthwise-separable blocks (dw3x3 -> BN -> SiLU -> SE -> pw1x1 ->
BN -> SiLU), no residuals -> global average pool -> dropout (largest route only) -> linear.
The double-headed gate replaces the SE of the gate group's first block. Everything before it
runs at the routing space's (shared) prefix widths; the route fixes every later width.

    model = Model()
    variables = model.init(key, images, route='largest')
    logits = model.apply(variables, images, route=3)               # sliced, dense
    logits, gate_logits = model.apply(variables, images, onehot,   # masked, per example
                                      method=Model.masked)
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dsnet_jax import routes as routes_lib
from dsnet_jax.layers import (Conv, Dense, DoubleHeadedGate, MaskedWidth, SlicedBatchNorm,
                              SqueezeExcite, Width, channels, global_avg_pool)
from dsnet_jax.models.gated import GatedSupernet

GROUP3_WIDTHS = tuple(range(224, 641, 32))
GROUP4_WIDTHS = tuple(range(736, 1153, 32))


@functools.lru_cache(maxsize=None)
def build_route_table(stem_widths: tuple[int, ...], group_widths: tuple[tuple[int, ...], ...],
                      gate_group: int, routing_space: tuple[int | str, ...]
                      ) -> routes_lib.RouteTable:
  """Routes 0..n-1 and 'largest'.

  Groups before the gate group list (route width, largest width); the gate group and later
  list one width per numbered route (n of them), the last being the largest's.
  """
  dynamic = group_widths[gate_group:]
  n = len(dynamic[0])
  for g, widths in enumerate((stem_widths, *group_widths[:gate_group])):
    if len(widths) != 2:
      raise ValueError(f'group {g - 1} before the gate needs (route width, largest width), '
                       f'got {widths}')
  if any(len(w) != n for w in dynamic):
    raise ValueError(f'groups from the gate on need {n} widths each, got {dynamic}')
  prefix = (stem_widths[0], *(w[0] for w in group_widths[:gate_group]))
  numbered = [routes_lib.Route(str(i), prefix + tuple(w[i] for w in dynamic)) for i in range(n)]
  largest = routes_lib.Route(routes_lib.LARGEST, (stem_widths[-1], *(w[-1] for w in group_widths)))
  return routes_lib.RouteTable([*numbered, largest], routing_space, shared_prefix=gate_group + 1)


class Block(nn.Module):
  """Depthwise-separable block; `front` runs up to the SE (or gate), `back` the pointwise conv."""
  in_features: int
  features: int
  in_widths: tuple[int, ...]
  widths: tuple[int, ...]
  stride: int
  se_reduced: int
  num_routes: int = 0  # > 0: this block holds the gate.
  dtype: Any = None

  def setup(self):
    self.conv_dw = Conv(self.in_features, self.in_features, 3, self.stride, depthwise=True,
                        dtype=self.dtype)
    self.bn1 = SlicedBatchNorm(self.in_widths)
    if self.num_routes:
      self.gate = DoubleHeadedGate(self.in_features, self.se_reduced, self.num_routes)
    else:
      self.se = SqueezeExcite(self.in_features, self.se_reduced)
    self.conv_pw = Conv(self.in_features, self.features, 1, dtype=self.dtype)
    self.bn2 = SlicedBatchNorm(self.widths)

  def front(self, x, train: bool, in_width: Width | None = None):
    """dw -> BN -> SiLU -> SE/gate. Returns (hidden, gate logits or None)."""
    masked = _masked(in_width)
    x = self.conv_dw(x)
    if masked is not None:
      x = masked.conv_output(x)
    x = nn.silu(self.bn1(x, train, masked))
    if self.num_routes:
      return self.gate(x)
    return self.se(x, masked), None

  def back(self, x, width: Width, train: bool):
    masked = _masked(width)
    x = self.conv_pw(x, channels(width))
    if masked is not None:
      x = masked.conv_output(x)
    return nn.silu(self.bn2(x, train, masked))

  def __call__(self, x, width: Width, train: bool, in_width: Width | None = None):
    x, _ = self.front(x, train, in_width)
    return self.back(x, width, train)


def _masked(width: Width | None) -> MaskedWidth | None:
  return width if isinstance(width, MaskedWidth) else None


class DSMBNet(GatedSupernet):
  """Dynamic MobileNetV1 supernet; defaults are the authors' ImageNet DS-MBNet."""
  num_classes: int = 1000
  in_channels: int = 3
  stem_widths: tuple[int, ...] = (16, 24)
  stem_stride: int = 2
  group_widths: tuple[tuple[int, ...], ...] = (
      (32, 88), (48, 168), (96, 264), GROUP3_WIDTHS, GROUP4_WIDTHS)
  group_depths: tuple[int, ...] = (1, 2, 2, 6, 2)
  group_strides: tuple[int, ...] = (1, 2, 2, 2, 2)
  gate_group: int = 3
  routing_space: tuple[int | str, ...] | str = (0, 1, 2, 3)
  se_ratio: float = 0.25
  dropout_rate: float = 0.2
  dtype: Any = None  # Compute dtype (None: the images'); see models/gated.py.

  @property
  def routes(self) -> routes_lib.RouteTable:
    return build_route_table(tuple(self.stem_widths), tuple(map(tuple, self.group_widths)),
                             self.gate_group, routes_lib.RouteTable.spec(self.routing_space))

  def setup(self):
    n_routes = len(self.routes.routing_space)
    self.stem_conv = Conv(self.in_channels, max(self.stem_widths), 3, self.stem_stride,
                          dtype=self.dtype)
    self.stem_bn = SlicedBatchNorm(self.stem_widths)
    groups, in_widths = [], tuple(self.stem_widths)
    for g, (widths, depth, stride) in enumerate(
        zip(self.group_widths, self.group_depths, self.group_strides)):
      blocks = []
      for b in range(depth):
        blocks.append(Block(
            max(in_widths), max(widths), in_widths, tuple(widths),
            stride=stride if b == 0 else 1,
            se_reduced=max(1, round(self.se_ratio * max(in_widths))),
            num_routes=n_routes if (g, b) == (self.gate_group, 0) else 0,
            dtype=self.dtype))
        in_widths = tuple(widths)
      groups.append(blocks)
    self.groups = groups
    self.dropout = nn.Dropout(self.dropout_rate)
    # float32, on the float32 pooled vector: logits are never rounded to the compute dtype.
    self.classifier = Dense(max(self.group_widths[-1]), self.num_classes, dtype=jnp.float32)

  def prefix(self, images, train: bool = False, route=None):
    """Stem up to the gate (inclusive), at `route`'s widths (default: the routing space's).

    Returns (hidden rescaled by the gate's attention head, routing logits).
    """
    route = self.routes.routing_space[0] if route is None else self.routes[route]
    widths = route.widths
    x = self._stem(images, widths[0], train)
    for g in range(self.gate_group):
      for block in self.groups[g]:
        x = block(x, widths[g + 1], train)
    return self.groups[self.gate_group][0].front(x, train)

  def suffix(self, hidden, route, train: bool = False):
    """From the gate block's pointwise conv to the logits, at `route`'s widths."""
    route = self.routes[route]
    drop = train and route == self.routes.largest
    return self._suffix(hidden, route.widths[self.gate_group + 1:], train, drop)

  def masked_suffix(self, hidden, route_weights, authors_masks: bool = False):
    """`suffix` for per-example route weights (batch, R), computed at the widest choice
    (`authors_masks`: with the authors' mask placement, see MaskedWidth)."""
    space = self.routes.routing_space
    widths = tuple(
        MaskedWidth(route_weights, tuple(r.widths[i] for r in space), authors_masks)
        for i in range(self.gate_group + 1, len(self.group_widths) + 1))
    return self._suffix(hidden, widths, False, False)

  def _stem(self, images, width: int, train: bool):
    return nn.silu(self.stem_bn(self.stem_conv(images.astype(self.dtype or images.dtype), width),
                                train))

  def _suffix(self, x, widths: Sequence[Width], train: bool, drop: bool):
    """Runs the groups from the gate on; widths[k] is group gate_group + k's width."""
    gg = self.gate_group
    x = self.groups[gg][0].back(x, widths[0], train)
    in_width = widths[0]
    for k, width in enumerate(widths):
      for b, block in enumerate(self.groups[gg + k]):
        if (k, b) != (0, 0):
          x = block(x, width, train, in_width)
          in_width = width
    x = global_avg_pool(x)
    x = self.dropout(x, deterministic=not drop)
    return self.classifier(x)


Model = DSMBNet
