"""Losses of both training stages (reference sections 4-5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Mean CE against integer labels (or label distributions, e.g. from mixup), with optional
  label smoothing."""
  if labels.ndim < logits.ndim:
    labels = jax.nn.one_hot(labels, logits.shape[-1])
  targets = optax.smooth_labels(labels.astype(jnp.float32), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
  """In-place bootstrapping: mean(sum(-p_teacher * log_softmax(student)))."""
  target_probs = jax.lax.stop_gradient(target_probs)
  return -(target_probs * jax.nn.log_softmax(logits.astype(jnp.float32))).sum(-1).mean()


def gate_targets(smallest_correct: jax.Array, num_routes: int,
                 widest_correct: jax.Array | None = None) -> jax.Array:
  """SGS targets: the first route of the routing space where the smallest route is right
  ("easy"), the last where it is wrong ("hard"). [ours] With `widest_correct` (the routing
  space's widest route is right), only inputs that the widest route gets right and the
  smallest wrong are hard: compute cannot help the rest."""
  hard = ~smallest_correct
  if widest_correct is not None:
    hard &= widest_correct
  return jnp.where(hard, num_routes - 1, 0).astype(jnp.int32)


def gumbel_straight_through(key: jax.Array, logits: jax.Array, tau: float = 1.0) -> jax.Array:
  """Gumbel-softmax sample: an exact one-hot forward, the soft sample's gradient backward."""
  return straight_through(gumbel_perturbed(key, logits), tau)


def gumbel_perturbed(key: jax.Array, logits: jax.Array) -> jax.Array:
  """logits + Gumbel(0, 1) noise, in float32."""
  return logits.astype(jnp.float32) + jax.random.gumbel(key, logits.shape, jnp.float32)


def straight_through(noisy_logits: jax.Array, tau: float = 1.0) -> jax.Array:
  """One-hot of the argmax forward, softmax(noisy_logits / tau)'s gradient backward."""
  soft = jax.nn.softmax(noisy_logits / tau)
  hard = jax.nn.one_hot(jnp.argmax(soft, -1), noisy_logits.shape[-1], dtype=soft.dtype)
  return hard + soft - jax.lax.stop_gradient(soft)


def gate_cross_entropy(gate_logits: jax.Array, targets: jax.Array, double_softmax: bool = False,
                       label_smoothing: float = 0.0) -> jax.Array:
  """CE of the routing logits against SGS targets. `double_softmax` reproduces the authors'
  quirk of feeding softmax probabilities into the CE."""
  if double_softmax:
    gate_logits = jax.nn.softmax(gate_logits)
  return cross_entropy(gate_logits, targets, label_smoothing)


def madds_penalty(mean_madds: jax.Array, weight: float, scale: float,
                  target: float | None = None) -> jax.Array:
  """weight * ((mean MAdds - target) / scale)^2; target None penalises all MAdds."""
  excess = mean_madds - (target or 0.0)
  return weight * jnp.square(excess / scale)
