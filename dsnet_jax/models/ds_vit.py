"""DS-ViT++: a dynamic DeiT-style ViT supernet (reference section 6) [ours].

Sizes from a variant string ("Ti/16", "S/16", "B/16", `decode_variant`); routes slice heads,
MLP and embedding width per group of blocks, with idle slicing of the residual stream; a token
gate after group 0. The choices are documented in docs/design.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsnet_jax import routes as routes_lib
from dsnet_jax.layers import Dense, MaskedWidth, Width, channels
from dsnet_jax.models.gated import GatedSupernet
from dsnet_jax.layers.transformer import (LayerNorm, Mlp, MultiHeadAttention, PatchEmbed,
                                          TokenGate, trunc_normal_init)

# name -> (width, depth, num_heads, mlp_dim); the patch size follows the slash.
VARIANTS = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
}


@dataclasses.dataclass(frozen=True)
class ViTSize:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def decode_variant(variant: str | None, **overrides) -> ViTSize:
  """'S/16' -> ViTSize(384, 12, 6, 1536, 16); fields given in `overrides` (not None) win."""
  sizes: dict[str, Any] = {}
  if variant is not None:
    name, _, patch = variant.partition('/')
    if name not in VARIANTS or not patch.isdigit():
      raise ValueError(f'unknown ViT variant {variant!r}; use one of '
                       f'{", ".join(v + "/16" for v in VARIANTS)} (any patch size)')
    sizes = dict(zip(('width', 'depth', 'num_heads', 'mlp_dim'), VARIANTS[name]),
                 patch_size=int(patch))
  sizes.update({k: v for k, v in overrides.items() if v is not None})
  missing = [f.name for f in dataclasses.fields(ViTSize) if f.name not in sizes]
  if missing:
    raise ValueError(f'no variant given and missing sizes: {missing}')
  size = ViTSize(**sizes)
  if size.width % size.num_heads:
    raise ValueError(f'width {size.width} is not a multiple of {size.num_heads} heads')
  return size


class BlockWidths(NamedTuple):
  """One group's widths: ints on the sliced path, MaskedWidths on the masked path."""
  embed: Width
  heads: Width
  mlp: Width


def width_levels(size: ViTSize, fractions: Sequence[float]) -> tuple[tuple[int, int, int], ...]:
  """(embed_width, num_heads, mlp_dim) at each fraction of the full size (rounded half up)."""
  level = lambda full, f: max(1, math.floor(full * f + 0.5 + 1e-9))
  return tuple((level(size.width, f), level(size.num_heads, f), level(size.mlp_dim, f))
               for f in fractions)


@functools.lru_cache(maxsize=None)
def build_route_table(levels: tuple[tuple[int, int, int], ...], num_groups: int,
                      routing_space: tuple[int | str, ...]) -> routes_lib.RouteTable:
  """Numbered routes climbing `levels` one group at a time (deepest first), plus 'largest'."""
  if num_groups < 2:
    raise ValueError('DS-ViT needs at least 2 groups: one before the gate, one after')
  index = [0] * (num_groups - 1)
  chain = [tuple(index)]
  while min(index) < len(levels) - 1:
    lowest = min(index)
    index[max(s for s, i in enumerate(index) if i == lowest)] += 1
    chain.append(tuple(index))
  numbered = [routes_lib.Route(str(n), (levels[0], *(levels[i] for i in c)))
              for n, c in enumerate(chain)]
  largest = routes_lib.Route(routes_lib.LARGEST, (levels[-1],) * num_groups)
  return routes_lib.RouteTable([*numbered, largest], routing_space, shared_prefix=1)


class Block(nn.Module):
  """Pre-LN transformer block with idle slicing; widths are a `BlockWidths`."""
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Any = None

  def setup(self):
    self.norm1 = LayerNorm(self.width)
    self.attn = MultiHeadAttention(self.width, self.num_heads, self.head_dim, dtype=self.dtype)
    self.norm2 = LayerNorm(self.width)
    self.mlp = Mlp(self.width, self.mlp_dim, self.dropout_rate, dtype=self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, x: jax.Array, widths: BlockWidths, deterministic: bool = True) -> jax.Array:
    embed = widths.embed
    masked = embed if isinstance(embed, MaskedWidth) else None
    d = channels(embed)
    stream = x[..., :d]

    def residual(h):
      h = masked.apply(h) if masked is not None else h
      return self._drop_path(self.dropout(h, deterministic=deterministic), deterministic)

    stream = stream + residual(self.attn(self.norm1(stream, masked), widths.heads))
    stream = stream + residual(self.mlp(self.norm2(stream, masked), widths.mlp, deterministic))
    return stream if d == x.shape[-1] else jnp.concatenate([stream, x[..., d:]], axis=-1)

  def _drop_path(self, h: jax.Array, deterministic: bool) -> jax.Array:
    """Stochastic depth: drops the whole residual branch per example."""
    if deterministic or self.drop_path_rate == 0:
      return h
    keep = 1.0 - self.drop_path_rate
    shape = (h.shape[0],) + (1,) * (h.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return h * kept.astype(h.dtype) / keep


class DSViT(GatedSupernet):
  """Dynamic ViT supernet; defaults are DS-ViT++ on DeiT-S/16 at 224x224."""
  variant: str | None = 'S/16'
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  mlp_dim: int | None = None
  patch_size: int | None = None
  image_size: int = 224
  num_classes: int = 1000
  in_channels: int = 3
  group_depths: tuple[int, ...] | None = None  # Blocks per group. Default: 4 equal groups.
  level_fractions: tuple[float, ...] = (2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)
  routing_space: tuple[int | str, ...] | str = (0, 3, 6, 9)
  gate_reduction: float = 0.25
  # False: the gate only routes (no attention head rescaling the tokens), so 'largest' is the
  # plain ViT/DeiT backbone (what an imported timm network needs to compute exactly).
  gate_attention: bool = True
  drop_path_rate: float = 0.1  # Largest route only.
  dropout_rate: float = 0.0    # Largest route only.
  dtype: Any = None  # Compute dtype (None: the images'); see models/gated.py.

  @property
  def size(self) -> ViTSize:
    return decode_variant(self.variant, width=self.width, depth=self.depth,
                          num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                          patch_size=self.patch_size)

  @property
  def resolved_group_depths(self) -> tuple[int, ...]:
    """Blocks per group: `group_depths`, or 4 equal groups when it is None."""
    depth = self.size.depth
    depths = self.group_depths or (depth // 4,) * 4
    if sum(depths) != depth:
      raise ValueError(f'group depths {depths} do not sum to the depth {depth}')
    return tuple(depths)

  @property
  def routes(self) -> routes_lib.RouteTable:
    return build_route_table(width_levels(self.size, tuple(self.level_fractions)),
                             len(self.resolved_group_depths),
                             routes_lib.RouteTable.spec(self.routing_space))

  def setup(self):
    size = self.size
    if self.image_size % size.patch_size:
      raise ValueError(f'image size {self.image_size} is not a multiple of the patch size '
                       f'{size.patch_size}')
    self.num_tokens = (self.image_size // size.patch_size) ** 2 + 1
    self.patch_embed = PatchEmbed(self.in_channels, size.width, size.patch_size, dtype=self.dtype)
    self.cls_token = self.param('cls_token', trunc_normal_init, (1, 1, size.width))
    self.pos_embed = self.param('pos_embed', trunc_normal_init, (1, self.num_tokens, size.width))
    rates = [self.drop_path_rate * i / max(size.depth - 1, 1) for i in range(size.depth)]
    self.blocks = [Block(size.width, size.num_heads, size.head_dim, size.mlp_dim,
                         drop_path_rate=rate, dropout_rate=self.dropout_rate, dtype=self.dtype)
                   for rate in rates]
    self.gate = TokenGate(size.width, max(1, round(self.gate_reduction * size.width)),
                          len(self.routes.routing_space), attention=self.gate_attention)
    self.norm = LayerNorm(size.width)
    # The final LN and the head run in float32: logits are never rounded to the compute dtype.
    self.head = Dense(size.width, self.num_classes, kernel_init=trunc_normal_init,
                      dtype=jnp.float32)

  def prefix(self, images, train: bool = False, route=None):
    """Tokens through group 0 and the gate, at `route`'s group-0 widths (default: the routing
    space's). Returns (tokens (batch, tokens, width) rescaled by the gate's attention head,
    routing logits (batch, R))."""
    route = self.routes.routing_space[0] if route is None else self.routes[route]
    deterministic = not (train and route == self.routes.largest)
    x = self._embed(images)
    widths = BlockWidths(*route.widths[0])
    for block in self._group_blocks(0):
      x = block(x, widths, deterministic)
    return self.gate(x, widths.embed)

  def suffix(self, hidden, route, train: bool = False):
    """From group 1 to the logits, at `route`'s widths."""
    route = self.routes[route]
    deterministic = not (train and route == self.routes.largest)
    widths = [BlockWidths(*w) for w in route.widths[1:]]
    final = max(w[0] for w in route.widths)
    return self._suffix(hidden, widths, final, deterministic)

  def masked_suffix(self, hidden, route_weights, authors_masks: bool = False):
    """`suffix` for per-example route weights (batch, R), computed at the widest choice."""
    if authors_masks:
      raise ValueError("the authors' mask placement is their DS-MBNet's; this family has none")
    space = self.routes.routing_space
    choices = lambda g, i: tuple(r.widths[g][i] for r in space)
    widths = [BlockWidths(*(MaskedWidth(route_weights, choices(g, i)) for i in range(3)))
              for g in range(1, len(self.resolved_group_depths))]
    final = MaskedWidth(route_weights, tuple(max(w[0] for w in r.widths) for r in space))
    return self._suffix(hidden, widths, final, True)

  def _embed(self, images):
    expected = (self.image_size, self.image_size, self.in_channels)
    if images.shape[1:] != expected:
      raise ValueError(f'images of shape {images.shape[1:]}, the model was built for {expected}')
    x = self.patch_embed(images.astype(self.dtype or images.dtype))
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)

  def _group_blocks(self, group: int):
    depths = self.resolved_group_depths
    start = sum(depths[:group])
    return self.blocks[start:start + depths[group]]

  def _suffix(self, x, widths: Sequence[BlockWidths], final: Width, deterministic: bool):
    """Groups 1.. (widths[k] is group k+1's), then the final LN and head at width `final`."""
    for k, block_widths in enumerate(widths):
      for block in self._group_blocks(k + 1):
        x = block(x, block_widths, deterministic)
    masked = final if isinstance(final, MaskedWidth) else None
    cls = self.norm(x[:, 0, :channels(final)].astype(jnp.float32), masked)
    return self.head(cls)


Model = DSViT
