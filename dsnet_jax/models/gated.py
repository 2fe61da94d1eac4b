"""The base of every gated supernet: entry points written once in terms of four methods.

A subclass defines `routes` (a RouteTable), `prefix(images, train, route)` -> (features,
routing logits) up to and including the gate, `suffix(features, route, train)` -> logits on
dense slices, and `masked_suffix(features, route_weights)` -> logits with per-example widths
by masks. The inference engine runs `prefix` once per batch and `suffix` per route group;
gate training runs `prefix` and `masked_suffix`.
"""
import flax.linen as nn


class GatedSupernet(nn.Module):
  """`__call__` (one route for the batch) and `masked` (one route per example)."""

  def __call__(self, images, route, train: bool = False):
    """Logits of `route` (a Route, its name or index), computed on dense slices."""
    route = self.routes[route]
    features, _ = self.prefix(images, train, route)
    return self.suffix(features, route, train)

  def masked(self, images, route_weights):
    """Per-example routes over the routing space by masks (gate training; eval-mode BN, no
    dropout).

    Args:
      images: (batch, H, W, C).
      route_weights: (batch, R) one-hot (or straight-through) weights over the routing space.
    Returns:
      (logits, routing logits). Each example's logits equal its route's sliced logits.
    """
    features, gate_logits = self.prefix(images, False)
    return self.masked_suffix(features, route_weights), gate_logits
