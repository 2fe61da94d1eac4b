"""DS-ResNet-50: a dynamic bottleneck ResNet-50 supernet with the DS-MBNet mechanics [ours].

Reference section 6 names DS-ResNet, but no public code builds it: every choice below is this
project's, documented here and configurable through the module's fields.

Backbone (torchvision ResNet-50 v1.5): stem 7x7/2 conv 64 (pad 3) -> BN -> ReLU -> 3x3/2 max
pool (pad 1, as PyTorch pads); groups of bottlenecks [3, 4, 6, 3], each 1x1 -> 3x3 (carrying the
group's stride) -> 1x1 with expansion 4, BN after every conv, ReLU after the add; global average
pool; linear 2048 -> 1000 with bias. No dropout (ResNet-50 has none).

Slicing:
- A route gives the stem a width and every group an `(inner, out)` pair: conv1/conv2 of each
  bottleneck output `inner` channels, conv3 and the shortcut output `out`. Widths are constant
  within a group, so identity shortcuts always add equal widths.
- The first block of every group has a 1x1 projection + BN shortcut (stride on the projection),
  because its input and output widths change independently across routes. In ResNet-50 these
  are exactly the blocks that have one, so 'largest' is a plain ResNet-50.
- Every BN keeps running statistics for each width its layer runs at in the route table.
- Each block's last BN starts with scale 0, so a fresh block is ReLU(shortcut).

Gate: one double-headed gate at the *input* of the first block of `gate_group` (default 2, i.e.
layer3). Its squeeze z = relu(W_red(GAP(x))) reads the block's input (the prefix output); the
attention head rescales that input, which feeds both the residual branch and the projection
shortcut; the routing head is a bias-free linear z -> R logits. We put it at the block input
(not after conv2) so that the route fixes all of that block's convs and the prefix hands the
suffix a single tensor. The reduced width is fixed at round(`se_ratio` * full input width)
(128) and never sliced. The attention head costs C*H*W + 2*C*128 MAdds over a plain ResNet-50
(0.53 M at 224 on 'largest', C = 512); `gate_attention=False` drops it (routing head only), and
then 'largest' costs exactly a plain ResNet-50.

Routes: numbered routes 0..n-1 run the stem and the groups before the gate at `prefix_ratio`
(0.5) of full width, and the groups from the gate on at `route_ratios[i]` (default i/16 for
i = 4..16, i.e. 0.25, 0.3125, ..., 1.0: 13 routes); channels are rounded to multiples of
`channel_multiple` (8). 'largest' runs every layer at full width (the Stage I teacher). The
routing space is the 4 slimmest routes. MAdds at 224 (reference convention; a max pool does no
multiply-add and is free, and complexity.py ignores `reduce_window_max`):

    route  stem  layer1     layer2     layer3      layer4      MAdds (M)  params (M)
        0    32  (32,128)   (64,256)   (64,256)    (128,512)       638.6        2.37
        1    32  (32,128)   (64,256)   (80,320)    (160,640)       717.9        3.28
        2    32  (32,128)   (64,256)   (96,384)    (192,768)       813.3        4.34
        3    32  (32,128)   (64,256)   (112,448)   (224,896)       924.9        5.58
        4    32  (32,128)   (64,256)   (128,512)   (256,1024)     1052.6        6.98
        5    32  (32,128)   (64,256)   (144,576)   (288,1152)     1196.5        8.55
        6    32  (32,128)   (64,256)   (160,640)   (320,1280)     1356.6       10.29
        7    32  (32,128)   (64,256)   (176,704)   (352,1408)     1532.8       12.19
        8    32  (32,128)   (64,256)   (192,768)   (384,1536)     1725.1       14.26
        9    32  (32,128)   (64,256)   (208,832)   (416,1664)     1933.6       16.50
       10    32  (32,128)   (64,256)   (224,896)   (448,1792)     2158.3       18.91
       11    32  (32,128)   (64,256)   (240,960)   (480,1920)     2399.1       21.48
       12    32  (32,128)   (64,256)   (256,1024)  (512,2048)     2656.1       24.22
  largest    64  (64,256)   (128,512)  (256,1024)  (512,2048)     4089.8       25.69

Widths are (inner, out); MAdds and params include the gate's attention head but not its routing
head (`complexity.route_complexity(..., with_gate=True)` adds it). A plain ResNet-50 is 4089.3 M
MAdds and 25.557 M params ('largest' with `gate_attention=False`).

    model = Model()
    variables = model.init(key, images, route='largest')
    logits = model.apply(variables, images, route=3)               # sliced, dense
    logits, gate_logits = model.apply(variables, images, onehot,   # masked, per example
                                      method=Model.masked)
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

  def masked_suffix(self, hidden, route_weights):
    """`suffix` for per-example route weights (batch, R), computed at the widest choice."""
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
