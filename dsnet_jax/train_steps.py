"""The compiled pieces of both training stages, as pure functions of state, batch and key:
Stage I's sandwich step (`SupernetFunctions`) and Stage II's SGS step (`gate_train_step`),
with the states they update. What a step does is a frozen recipe (`SupernetRecipe`,
`GateRecipe`: the loss and update fields of `config.supernet` / `config.gate`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dsnet_jax import budget as budget_lib
from dsnet_jax import losses, optim, sharding
from dsnet_jax import routes as routes_lib

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SupernetRecipe:
  """What a Stage I step trains: `num_random_routes` between 'largest' and 'smallest' (the
  sandwich), 'largest' on the labels with `label_smoothing`, the others on the EMA teacher's
  soft targets (`inplace_bootstrapping`; the smallest on the ensemble of the step's teachers
  with `ensemble_ib`), two views with multi-view consistency (`mvco`), the teacher an EMA of
  decay `ema_decay`; `train_route`, when set, trains that route alone on the labels."""
  num_random_routes: int
  label_smoothing: float
  ema_decay: float
  ensemble_ib: bool
  mvco: bool
  inplace_bootstrapping: bool
  train_route: str


@dataclasses.dataclass(frozen=True)
class GateRecipe:
  """What a Stage II step trains (reference section 5): SGS targets (`sgs_targets`), Gumbel
  straight-through routing at temperature `gumbel_tau`, `ce_weight` * task CE +
  `gate_ce_weight` * gate CE (label smoothing `label_smoothing`; Gumbel noise on the gate
  loss's logits with `gumbel_gate_loss`; `double_softmax` as the authors' code), the MAdds
  penalty (`madds_weight`, `madds_scale`, `madds_target`) or, with a budget, dual ascent at
  `dual_lr`; the variables' EMA of decay `ema_decay`; `authors_mode`: the double softmax and
  the authors' mask placement (their gradient in the route weights)."""
  gumbel_tau: float
  ce_weight: float
  gate_ce_weight: float
  madds_weight: float
  madds_scale: float
  madds_target: float
  double_softmax: bool
  label_smoothing: float
  ema_decay: float
  gumbel_gate_loss: bool
  sgs_targets: str
  dual_lr: float
  authors_mode: bool = False  # Double softmax and the authors' mask placement.


@flax.struct.dataclass
class TrainState:
  """A training stage's state: the model's variables, the optimizer's, and (Stage I) the EMA
  teacher's variables {'params', 'batch_stats'}."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any = None

  @classmethod
  def create(cls, variables: Variables, tx, with_ema: bool = False) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=variables['params'],
               batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']),
               ema=jax.tree.map(jnp.copy, variables) if with_ema else None)

  @property
  def variables(self) -> Variables:
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class GateState(TrainState):
  """Stage II's state: TrainState plus the budget constraint's dual variable (float32 scalar;
  stays 0 without a budget)."""
  dual: Any = None

  @classmethod
  def create(cls, variables: Variables, tx, with_ema: bool = False) -> GateState:
    return super().create(variables, tx, with_ema).replace(dual=jnp.zeros((), jnp.float32))


class SupernetFunctions:
  """Compiled pieces of a Stage I step: teacher, per-route gradients, one update."""

  def __init__(self, model, tx, recipe: SupernetRecipe, mesh):
    self.model, self.tx, self.recipe = model, tx, recipe
    replicated = sharding.replicated(mesh)
    self.teacher = jax.jit(self._teacher_probs, static_argnames='route',
                           out_shardings=sharding.batch_sharding(mesh))
    self.route_grad = jax.jit(self._route_grad, static_argnames='route', donate_argnums=(5,),
                              out_shardings=(replicated, replicated, replicated))
    self.update = jax.jit(self._update, donate_argnums=0, out_shardings=replicated)
    self.zeros = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=replicated)

  def _teacher_probs(self, ema, batch, route):
    """The EMA teacher's softmax, averaged over the views (MvCo) when there are two."""
    views = training_views(batch, self.recipe.mvco)
    probs = jax.nn.softmax(self.model.apply(ema, jnp.concatenate(views), route=route))
    return probs.reshape(len(views), -1, probs.shape[-1]).mean(0)

  def _route_grad(self, params, batch_stats, batch, targets, key, grads, route):
    """`targets`: soft targets, or None for the labels ('largest' always learns the labels)."""
    largest = route == self.model.routes.largest or targets is None
    views = training_views(batch, self.recipe.mvco)
    repeat = lambda x: jnp.concatenate([x] * len(views))

    def loss_fn(p):
      logits, updated = self.model.apply(
          {'params': p, 'batch_stats': batch_stats}, jnp.concatenate(views), route=route,
          train=True, mutable=['batch_stats'], rngs={'dropout': key})
      if largest:
        labels = batch.get('label_probs', batch['label'])
        loss = losses.cross_entropy(logits, repeat(labels), self.recipe.label_smoothing)
      else:
        loss = losses.soft_cross_entropy(logits, repeat(targets))
      return loss, updated['batch_stats']

    (loss, batch_stats), route_grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads, route_grads), batch_stats, loss

  def _update(self, state: TrainState, grads, batch_stats) -> TrainState:
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
    new = {'params': params, 'batch_stats': batch_stats}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state,
                         ema=optim.ema_update(state.ema, new, self.recipe.ema_decay))

  def step(self, state: TrainState, batch, table, seed: int, step: int, key):
    """One sandwich step (or one step of `train_route` alone); returns the new state and
    device-side metrics (no host sync)."""
    if self.recipe.train_route:
      routes = [table[self.recipe.train_route]]
    else:
      routes = routes_lib.sandwich_routes(table, seed, step, self.recipe.num_random_routes)
    teacher = None
    if self.recipe.inplace_bootstrapping and not self.recipe.train_route:
      teacher = self.teacher(state.ema, batch, route=table.largest)
    if self.recipe.ensemble_ib:
      ensemble = [teacher] + [self.teacher(state.ema, batch, route=r) for r in routes[1:-1]]
    grads = self.zeros(state.params)
    batch_stats, metrics = state.batch_stats, {}
    for i, route in enumerate(routes):
      targets = teacher
      if self.recipe.ensemble_ib and route == table.smallest:
        targets = sum(ensemble) / len(ensemble)
      grads, batch_stats, loss = self.route_grad(
          state.params, batch_stats, batch, targets, jax.random.fold_in(key, i), grads,
          route=route)
      name = ('largest' if route == table.largest else 'smallest' if route == table.smallest
              else route.name if self.recipe.train_route else i)
      metrics[f'loss_{name}'] = loss
    metrics['loss'] = sum(metrics.values())
    return self.update(state, grads, batch_stats), metrics


def training_views(batch, mvco: bool) -> list[jax.Array]:
  """The augmented views a step trains on: two for multi-view consistency, else one (a batch
  without its second view is refused here for callers outside train_lib; a config is refused
  before any work by config_lib.validate)."""
  if not mvco:
    return [batch['image']]
  if 'image_view1' not in batch:
    raise ValueError('supernet.mvco needs two views per image: set config.data.views = 2')
  return [batch['image'], batch['image_view1']]


def gate_train_step(model, tx, recipe: GateRecipe, target_cost: float, state: GateState,
                    route_costs, batch, key):
  """One SGS step: targets from the smallest route, Gumbel straight-through routing, the EMA
  of the variables updated; with a budget (`target_cost`, the cost per image in its unit,
  else 0; `route_costs` (R,) in that unit, MAdds without a budget) the cost term is the dual
  variable times the excess cost, and the dual variable takes its ascent step."""
  images, labels = batch['image'], batch['label']
  space = model.routes.routing_space
  def correct(route):
    return jnp.argmax(model.apply(state.variables, images, route=route), -1) == labels

  widest_correct = correct(space[-1]) if recipe.sgs_targets == 'widest_helps' else None
  targets = losses.gate_targets(correct(space[0]), len(space), widest_correct)
  gumbel = jax.random.gumbel(key, (images.shape[0], len(space)), jnp.float32)

  def loss_fn(params):
    logits, routing_logits, weights = model.apply_gated(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        lambda routing_logits: losses.straight_through(routing_logits + gumbel, recipe.gumbel_tau),
        authors_masks=recipe.authors_mode)
    mean_cost = (weights @ route_costs).mean()
    gate_input = routing_logits + gumbel if recipe.gumbel_gate_loss else routing_logits
    gate_ce = losses.gate_cross_entropy(gate_input, targets,
                                        recipe.double_softmax or recipe.authors_mode,
                                        recipe.label_smoothing)
    ce = losses.cross_entropy(logits, labels, recipe.label_smoothing)
    if target_cost:
      cost = {'budget_loss': state.dual * budget_lib.excess(mean_cost, target_cost, route_costs)}
    else:
      cost = {'madds_penalty': losses.madds_penalty(
          mean_cost, recipe.madds_weight, recipe.madds_scale, recipe.madds_target or None)}
    loss = recipe.gate_ce_weight * gate_ce + recipe.ce_weight * ce + sum(cost.values())
    histogram = jax.lax.stop_gradient(weights).sum(0)
    return loss, dict(gate_ce=gate_ce, ce=ce, **cost, mean_cost=mean_cost,
                      argmax_cost=route_costs[jnp.argmax(routing_logits, -1)].mean(),
                      route_histogram={r.name: histogram[i] for i, r in enumerate(space)},
                      gate_accuracy=(jnp.argmax(routing_logits, -1) == targets).mean(),
                      accuracy=(jnp.argmax(logits, -1) == labels).mean())

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(jnp.add, state.params, updates)
  ema = optim.ema_update(state.ema, {'params': params, 'batch_stats': state.batch_stats},
                         recipe.ema_decay)
  dual = state.dual
  if target_cost:
    dual = dual + recipe.dual_lr * budget_lib.excess(metrics['argmax_cost'], target_cost,
                                                     route_costs)
    metrics['dual'] = dual
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                        dual=dual), {'loss': loss, **metrics})
