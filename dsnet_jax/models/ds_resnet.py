"""DS-ResNet-50: a dynamic bottleneck ResNet-50 supernet with the DS-MBNet mechanics [ours].

'largest' with `gate_attention=False` is torchvision's ResNet-50 (v1.5); routes slice every
group's (inner, out) widths after the gate, which sits at the input of `gate_group`. Every
choice (gate placement, route ratios, the route table with its MAdds) is documented in
docs/design.md and configurable through the fields.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dsnet_jax import routes as routes_lib
from dsnet_jax.layers import (Conv, Dense, DoubleHeadedGate, MaskedWidth, SlicedBatchNorm, Width,
                              channels, global_avg_pool)
from dsnet_jax.models.gated import GatedSupernet

RESNET50_DEPTHS = (3, 4, 6, 3)
RESNET50_INNER = (64, 128, 256, 512)
DEFAULT_ROUTE_RATIOS = tuple(i / 16 for i in range(4, 17))


def round_width(ratio: float, full: int, multiple: int) -> int:
  """`ratio * full` rounded to a multiple of `multiple`, within [multiple, full]."""
  if not 0 < ratio <= 1:
    raise ValueError(f'width ratio {ratio} is not in (0, 1]')
  return min(full, max(multiple, int(round(ratio * full / multiple)) * multiple))


@functools.lru_cache(maxsize=None)
def build_route_table(stem_features: int, group_inner_features: tuple[int, ...], expansion: int,
                      gate_group: int, prefix_ratio: float,
                      route_ratios: tuple[float | tuple[float, ...], ...],
                      channel_multiple: int, routing_space: tuple[int | str, ...]
                      ) -> routes_lib.RouteTable:
  """Routes 0..n-1 and 'largest'; widths = (stem, (inner, out) per group).

  `route_ratios[i]` is route i's width ratio for every group from the gate on, or a tuple with
  one ratio per such group. Groups before the gate run at `prefix_ratio` on numbered routes.
  """
  if not 0 <= gate_group < len(group_inner_features):
    raise ValueError(f'gate_group {gate_group} is not one of the {len(group_inner_features)} '
                     'groups')
  n_dynamic = len(group_inner_features) - gate_group

  def group(g: int, ratio: float) -> tuple[int, int]:
    inner = group_inner_features[g]
    return (round_width(ratio, inner, channel_multiple),
            round_width(ratio, expansion * inner, channel_multiple))

  prefix = (round_width(prefix_ratio, stem_features, channel_multiple),
            *(group(g, prefix_ratio) for g in range(gate_group)))
  numbered = []
  for i, ratios in enumerate(route_ratios):
    ratios = (ratios,) * n_dynamic if isinstance(ratios, (int, float)) else tuple(ratios)
    if len(ratios) != n_dynamic:
      raise ValueError(f'route {i}: {n_dynamic} groups from the gate on, got ratios {ratios}')
    dynamic = tuple(group(gate_group + k, r) for k, r in enumerate(ratios))
    numbered.append(routes_lib.Route(str(i), prefix + dynamic))
  largest = routes_lib.Route(routes_lib.LARGEST,
                             (stem_features, *((f, expansion * f) for f in group_inner_features)))
  return routes_lib.RouteTable([*numbered, largest], routing_space, shared_prefix=gate_group + 1)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 bottleneck; `front` is the gate (gate block only), `back` the residual."""
  in_features: int
  inner_features: int
  features: int
  inner_widths: tuple[int, ...]
  widths: tuple[int, ...]
  stride: int
  projection: bool
  num_routes: int = 0  # > 0: this block holds the gate.
  gate_reduced: int = 0
  gate_attention: bool = True
  dtype: Any = None

  def setup(self):
    self.conv1 = Conv(self.in_features, self.inner_features, 1, dtype=self.dtype)
    self.bn1 = SlicedBatchNorm(self.inner_widths)
    self.conv2 = Conv(self.inner_features, self.inner_features, 3, self.stride, dtype=self.dtype)
    self.bn2 = SlicedBatchNorm(self.inner_widths)
    self.conv3 = Conv(self.inner_features, self.features, 1, dtype=self.dtype)
    self.bn3 = SlicedBatchNorm(self.widths, scale_init=nn.initializers.zeros)
    if self.projection:
      self.shortcut_conv = Conv(self.in_features, self.features, 1, self.stride, dtype=self.dtype)
      self.shortcut_bn = SlicedBatchNorm(self.widths)
    if self.num_routes:
      self.gate = DoubleHeadedGate(self.in_features, self.gate_reduced, self.num_routes)

  def front(self, x):
    """The gate on the block input: (x, maybe rescaled by the attention head; logits or None)."""
    if not self.num_routes:
      return x, None
    if self.gate_attention:
      return self.gate(x)
    return x, self.gate.route(self.gate.se.squeeze(x))

  def back(self, x, inner: Width, width: Width, train: bool):
    y = nn.relu(self.bn1(self.conv1(x, channels(inner)), train, _masked(inner)))
    y = nn.relu(self.bn2(self.conv2(y, channels(inner)), train, _masked(inner)))
    y = self.bn3(self.conv3(y, channels(width)), train, _masked(width))
    if self.projection:
      x = self.shortcut_bn(self.shortcut_conv(x, channels(width)), train, _masked(width))
    elif x.shape[-1] != y.shape[-1]:
      raise ValueError(f'{self.name}: identity shortcut of width {x.shape[-1]} cannot add to '
                       f'width {y.shape[-1]}; widths must be constant within a group')
    return nn.relu(y + x)

  def __call__(self, x, inner: Width, width: Width, train: bool):
    x, _ = self.front(x)
    return self.back(x, inner, width, train)


def _masked(width: Width) -> MaskedWidth | None:
  return width if isinstance(width, MaskedWidth) else None


def _layer_widths(table: routes_lib.RouteTable, pick: Callable[[tuple], int]) -> tuple[int, ...]:
  """Sorted distinct widths one layer runs at over the route table (its BN statistics rows)."""
  return tuple(sorted({pick(r.widths) for r in table}))


class DSResNet(GatedSupernet):
  """Dynamic bottleneck ResNet supernet; defaults are DS-ResNet-50 for ImageNet."""
  num_classes: int = 1000
  in_channels: int = 3
  stem_features: int = 64
  group_inner_features: tuple[int, ...] = RESNET50_INNER  # inner (bottleneck) width per group
  group_depths: tuple[int, ...] = RESNET50_DEPTHS
  group_strides: tuple[int, ...] = (1, 2, 2, 2)
  expansion: int = 4
  gate_group: int = 2
  prefix_ratio: float = 0.5
  route_ratios: tuple[float | tuple[float, ...], ...] = DEFAULT_ROUTE_RATIOS
  channel_multiple: int = 8
  routing_space: tuple[int | str, ...] | str = (0, 1, 2, 3)
  se_ratio: float = 0.25
  gate_attention: bool = True
  dtype: Any = None  # Compute dtype (None: the images'); see models/gated.py.

  @property
  def routes(self) -> routes_lib.RouteTable:
    return build_route_table(
        self.stem_features, tuple(self.group_inner_features), self.expansion, self.gate_group,
        self.prefix_ratio, tuple(r if isinstance(r, (int, float)) else tuple(r)
                                 for r in self.route_ratios),
        self.channel_multiple, routes_lib.RouteTable.spec(self.routing_space))

  def setup(self):
    table = self.routes
    self.stem_conv = Conv(self.in_channels, self.stem_features, 7, 2, dtype=self.dtype)
    self.stem_bn = SlicedBatchNorm(_layer_widths(table, lambda w: w[0]))
    groups, in_features = [], self.stem_features
    for g, (inner, depth, stride) in enumerate(
        zip(self.group_inner_features, self.group_depths, self.group_strides)):
      features = self.expansion * inner
      inner_widths = _layer_widths(table, lambda w: w[g + 1][0])
      widths = _layer_widths(table, lambda w: w[g + 1][1])
      blocks = []
      for b in range(depth):
        gate = (g, b) == (self.gate_group, 0)
        blocks.append(Bottleneck(
            in_features, inner, features, inner_widths, widths,
            stride=stride if b == 0 else 1, projection=b == 0,
            num_routes=len(table.routing_space) if gate else 0,
            gate_reduced=max(1, round(self.se_ratio * in_features)) if gate else 0,
            gate_attention=self.gate_attention, dtype=self.dtype))
        in_features = features
      groups.append(blocks)
    self.groups = groups
    # float32, on the float32 pooled vector: logits are never rounded to the compute dtype.
    self.classifier = Dense(in_features, self.num_classes, dtype=jnp.float32)

  def prefix(self, images, train: bool = False, route=None):
    """Stem and the groups before the gate, then the gate, at `route`'s widths (default: the
    routing space's). Returns (gate block input rescaled by the attention head, routing logits).
    """
    route = self.routes.routing_space[0] if route is None else self.routes[route]
    widths = route.widths
    x = self._stem(images, widths[0], train)
    for g in range(self.gate_group):
      inner, width = widths[g + 1]
      for block in self.groups[g]:
        x = block(x, inner, width, train)
    return self.groups[self.gate_group][0].front(x)

  def suffix(self, hidden, route, train: bool = False):
    """From the gate block's conv1 to the logits, at `route`'s widths."""
    route = self.routes[route]
    return self._suffix(hidden, route.widths[self.gate_group + 1:], train)

  def masked_suffix(self, hidden, route_weights, authors_masks: bool = False):
    """`suffix` for per-example route weights (batch, R), computed at the widest choice."""
    if authors_masks:
      raise ValueError("the authors' mask placement is their DS-MBNet's; this family has none")
    space = self.routes.routing_space
    widths = tuple(
        tuple(MaskedWidth(route_weights, tuple(r.widths[g + 1][part] for r in space))
              for part in (0, 1))
        for g in range(self.gate_group, len(self.group_inner_features)))
    return self._suffix(hidden, widths, False)

  def _stem(self, images, width: int, train: bool):
    x = self.stem_conv(images.astype(self.dtype or images.dtype), width)
    x = nn.relu(self.stem_bn(x, train))
    # Max pool is free in the MAdds convention (no multiply-adds).
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  def _suffix(self, x, widths: Sequence[tuple[Width, Width]], train: bool):
    """Runs the groups from the gate on; widths[k] is group gate_group + k's (inner, out)."""
    gg = self.gate_group
    for k, (inner, width) in enumerate(widths):
      for b, block in enumerate(self.groups[gg + k]):
        if (k, b) == (0, 0):
          x = block.back(x, inner, width, train)  # Its front (the gate) ran in `prefix`.
        else:
          x = block(x, inner, width, train)
    return self.classifier(global_avg_pool(x))


Model = DSResNet
