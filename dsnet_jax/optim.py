"""Optimizers: SGD-Nesterov or AdamW, warm-up + cosine, parameter groups, and the EMA."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.traverse_util
import jax
import optax

FROZEN = 'frozen'


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """A stage's optimizer (`config.<stage>.optimizer` once resolved: `lr` already scaled to the
  batch size, warm-up in steps).

  name: 'sgd' | 'adamw'; lr, end_lr: the schedule's peak and end; warmup_steps; momentum,
  nesterov (sgd); b1, b2 (adamw); weight_decay (never on biases or other 1-D params);
  param_groups: ((regex, multiplier | None), ...) matched in order against 'a/b/kernel'
  paths; the multiplier scales that group's learning rate, None freezes it.
  """
  name: str
  lr: float
  end_lr: float
  warmup_steps: int
  momentum: float
  nesterov: bool
  b1: float
  b2: float
  weight_decay: float
  param_groups: tuple[tuple[str, float | None], ...]


def learning_rate_schedule(config: OptimizerSpec, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine to `end_lr` at `total_steps`."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else config.lr, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.end_lr)


def param_path(path: Sequence[Any]) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def group_labels(params, param_groups: Sequence[tuple[str, float | None]]):
  """Tree of group labels: the index of the first matching regex, or FROZEN."""
  def label(path, _):
    name = param_path(path)
    for i, (pattern, multiplier) in enumerate(param_groups):
      if re.fullmatch(pattern, name):
        return FROZEN if multiplier is None else str(i)
    raise ValueError(f'parameter {name!r} matches no param_groups regex {param_groups}')
  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: OptimizerSpec, total_steps: int, params, frozen: str | None = None
                   ) -> optax.GradientTransformation:
  """The optax transformation of `config` for `total_steps` steps over `params`.

  `frozen`: a regex of parameter paths that never change, whatever `param_groups` says (a
  stage's parameters that get no gradient: weight decay would still move them).
  """
  schedule = learning_rate_schedule(config, total_steps)
  if config.name == 'sgd':
    base = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
  elif config.name == 'adamw':
    base = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                       weight_decay=config.weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f"config.optimizer.name={config.name!r}; valid: 'sgd', 'adamw'")
  groups = ((frozen, None),) * bool(frozen) + tuple(config.param_groups)
  transforms = {FROZEN: optax.set_to_zero()}
  for i, (_, multiplier) in enumerate(groups):
    if multiplier is not None:
      transforms[str(i)] = optax.chain(base, optax.scale(multiplier)) if multiplier != 1 else base
  labels = group_labels(params, groups)
  used = set(jax.tree.leaves(labels))
  return optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels)


def trainable_count(params, param_groups) -> int:
  labels = flax.traverse_util.flatten_dict(group_labels(params, tuple(param_groups)))
  flat = flax.traverse_util.flatten_dict(params)
  return sum(flat[k].size for k, label in labels.items() if label != FROZEN)


def ema_update(ema, new, decay: float):
  """ema <- decay * ema + (1 - decay) * new, leaf by leaf, written as ema + (1 - decay) *
  (new - ema) so that a leaf equal to its EMA (a frozen parameter) stays bit-identical."""
  return jax.tree.map(lambda e, n: e + (1.0 - decay) * (n - e), ema, new)
