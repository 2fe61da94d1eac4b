"""`train_and_evaluate(config, workdir)`: Stage I supernet, BN recalibration, Stage II gate.

Each stage checkpoints under workdir/checkpoints/<stage>; a finished stage is marked complete
in its checkpoint metadata and skipped on resume, an unfinished one resumes at its latest
step. Every random choice (routes, dropout, Gumbel noise, batch order, augmentation) is a
function of (config.seed, step), so a resumed run continues exactly as an unbroken one.

Stage I compiles one gradient program per route (route is static), never one per route
combination: a step draws its sandwich on the host, sums the routes' gradients into one
accumulator and applies a single optimizer update.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from dsnet_jax import checkpointing, config_lib, eval_lib, losses, optim, sharding
from dsnet_jax import routes as routes_lib
from dsnet_jax.complexity import route_complexity
from dsnet_jax.data import input_pipeline
from dsnet_jax.models import get_model
from dsnet_jax.progress import ProgressLogger


@dataclasses.dataclass
class Run:
  """What every stage shares."""
  config: ml_collections.ConfigDict
  workdir: str
  model: Any
  mesh: jax.sharding.Mesh
  train_data: input_pipeline.Pipeline
  eval_data: input_pipeline.Pipeline

  @property
  def table(self) -> routes_lib.RouteTable:
    return self.model.routes

  def checkpointer(self, stage: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(os.path.join(self.workdir, 'checkpoints', stage),
                                      keep=self.config.keep_checkpoints)

  def batches(self, start_step: int):
    for batch in self.train_data.batches(start_step):
      yield sharding.global_batch(batch, self.mesh)

  def step_key(self, step: int, purpose: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), step), purpose)

  def meta(self, stage: str, complete: bool) -> dict[str, Any]:
    return {'stage': stage, 'complete': complete, 'seed': self.config.seed,
            'model_name': self.config.model_name, 'config': self.config.to_json()}


def make_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates the config and the data before building anything heavy."""
  config_lib.validate(config)
  input_pipeline.check_available(config.data)
  mesh = sharding.make_mesh(config.num_devices or None)
  model = get_model(config.model_name, **config.model)
  train_data = input_pipeline.make(config.data, 'train', batch_size=config.batch_size,
                                   train=True, seed=config.seed)
  eval_split = input_pipeline.EVAL_SPLITS[config.data.name]
  eval_data = input_pipeline.make(config.data, eval_split, batch_size=config.eval_batch_size,
                                  train=False)
  os.makedirs(workdir, exist_ok=True)
  return Run(config, workdir, model, mesh, train_data, eval_data)


def _init_fn(model, image_shape):
  images = jnp.zeros((1, *image_shape), jnp.float32)

  def init(key):
    variables = model.init(key, images, route=model.routes.largest)
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return init


def abstract_variables(model, image_shape, mesh=None):
  """Shapes of the full-size variables (replicated over `mesh`, else on one device)."""
  shapes = jax.eval_shape(_init_fn(model, image_shape), jax.random.key(0))
  return checkpointing.abstract_like(shapes, mesh and sharding.replicated(mesh))


def init_variables(run: Run) -> dict[str, Any]:
  """Full-size variables, from `config.init_checkpoint` or a fresh init, replicated."""
  if run.config.init_checkpoint:
    return restore_variables(run.config.init_checkpoint, abstract_variables(
        run.model, run.train_data.image_shape, run.mesh))
  init = jax.jit(_init_fn(run.model, run.train_data.image_shape),
                 out_shardings=sharding.replicated(run.mesh))
  return init(jax.random.key(run.config.seed))


def latest_stage_dir(workdir: str) -> str:
  """The checkpoint directory of the last stage that saved anything in `workdir`."""
  for stage in reversed(config_lib.STAGES):
    directory = os.path.join(workdir, 'checkpoints', stage)
    with checkpointing.Checkpointer(directory, keep=None) as ckpt:
      if ckpt.latest_step() is not None:
        return directory
  raise FileNotFoundError(f'no checkpoint under {os.path.join(workdir, "checkpoints")}; '
                          'train first (train.py) or pass --checkpoint')


def restore_variables(directory: str, target) -> dict[str, Any]:
  """{'params', 'batch_stats'} of a stage checkpoint (the EMA model's for the supernet)."""
  with checkpointing.Checkpointer(directory, keep=None) as ckpt:
    if os.path.basename(os.path.normpath(directory)) == 'supernet':
      return ckpt.restore_items({'ema': target})['ema']
    return ckpt.restore_items(target)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `config.stages` in order (resuming from `workdir`), then the final evaluation."""
  run = make_run(config, workdir)
  variables = init_variables(run)
  for stage in config.stages:
    variables = STAGES[stage](run, variables)
  return eval_lib.evaluate_and_report(run.model, variables, run.eval_data, run.mesh, workdir,
                                      gated='gate' in config.stages)


def _resume_or_start(run: Run, stage: str, fresh_state: Callable[[], dict], to_variables):
  """Returns (state, first step) or, for a finished stage, (variables, None)."""
  with run.checkpointer(stage) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      return fresh_state(), 0
    state, meta = ckpt.restore(checkpointing.abstract_like(fresh_state()), step)
  if meta.get('complete'):
    print(f'[{stage}] complete at step {step}; skipping', flush=True)
    return to_variables(state), None
  print(f'[{stage}] resuming at step {step}', flush=True)
  return state, step


# ----------------------------------------------------------------------------- Stage I


def supernet_stage(run: Run, variables: dict[str, Any]) -> dict[str, Any]:
  """Sandwich rule + in-place bootstrapping from an EMA teacher; returns the EMA variables."""
  cfg = run.config.supernet
  tx = optim.make_optimizer(cfg.optimizer, cfg.steps, variables['params'])

  def fresh():
    return sharding.replicate({'step': jnp.zeros((), jnp.int32), **variables,
                               'opt_state': tx.init(variables['params']),
                               'ema': jax.tree.map(jnp.copy, variables)}, run.mesh)

  state, start = _resume_or_start(run, 'supernet', fresh, lambda s: s['ema'])
  if start is None:
    return state
  fns = SupernetFunctions(run.model, tx, cfg, run.mesh)
  logger = ProgressLogger(run.workdir, 'supernet', cfg.steps, run.config.batch_size)
  logger.start(start)
  with run.checkpointer('supernet') as ckpt:
    for step, batch in zip(range(start, cfg.steps), run.batches(start)):
      state, metrics = fns.step(state, batch, run.table, run.config.seed, step,
                                run.step_key(step, 0))
      done = step + 1
      if done % run.config.log_every_steps == 0 or done == cfg.steps:
        logger.log(done, metrics)
      if run.config.eval_every_steps and done % run.config.eval_every_steps == 0:
        _log_eval(run, logger, done, state['ema'], [run.table.smallest, run.table.largest])
      if done % run.config.checkpoint_every_steps == 0 or done == cfg.steps:
        ckpt.save(done, state, run.meta('supernet', complete=done == cfg.steps))
  _log_eval(run, logger, cfg.steps, state['ema'], [run.table.smallest, run.table.largest])
  return state['ema']


class SupernetFunctions:
  """Compiled pieces of a Stage I step: teacher, per-route gradients, one update."""

  def __init__(self, model, tx, cfg, mesh):
    self.model, self.tx, self.cfg = model, tx, cfg
    replicated = sharding.replicated(mesh)
    self.teacher = jax.jit(self._teacher_probs, static_argnames='route',
                           out_shardings=sharding.batch_sharding(mesh))
    self.route_grad = jax.jit(self._route_grad, static_argnames='route', donate_argnums=(5,),
                              out_shardings=(replicated, replicated, replicated))
    self.update = jax.jit(self._update, donate_argnums=0, out_shardings=replicated)
    self.zeros = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=replicated)

  def _teacher_probs(self, ema, batch, route):
    """The EMA teacher's softmax, averaged over the views (MvCo) when there are two."""
    views = training_views(batch, self.cfg.mvco)
    probs = jax.nn.softmax(self.model.apply(ema, jnp.concatenate(views), route=route))
    return probs.reshape(len(views), -1, probs.shape[-1]).mean(0)

  def _route_grad(self, params, batch_stats, batch, targets, key, grads, route):
    largest = route == self.model.routes.largest
    views = training_views(batch, self.cfg.mvco)
    repeat = lambda x: jnp.concatenate([x] * len(views))

    def loss_fn(p):
      logits, updated = self.model.apply(
          {'params': p, 'batch_stats': batch_stats}, jnp.concatenate(views), route=route,
          train=True, mutable=['batch_stats'], rngs={'dropout': key})
      if largest:
        labels = batch.get('label_probs', batch['label'])
        loss = losses.cross_entropy(logits, repeat(labels), self.cfg.label_smoothing)
      else:
        loss = losses.soft_cross_entropy(logits, repeat(targets))
      return loss, updated['batch_stats']

    (loss, batch_stats), route_grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads, route_grads), batch_stats, loss

  def _update(self, state, grads, batch_stats):
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = jax.tree.map(jnp.add, state['params'], updates)
    new = {'params': params, 'batch_stats': batch_stats}
    return {'step': state['step'] + 1, **new, 'opt_state': opt_state,
            'ema': optim.ema_update(state['ema'], new, self.cfg.ema_decay)}

  def step(self, state, batch, table, seed: int, step: int, key):
    """One sandwich step; returns the new state and device-side metrics (no host sync)."""
    routes = routes_lib.sandwich_routes(table, seed, step, self.cfg.num_random_routes)
    teacher = self.teacher(state['ema'], batch, route=table.largest)
    if self.cfg.ensemble_ib:
      ensemble = [teacher] + [self.teacher(state['ema'], batch, route=r) for r in routes[1:-1]]
    grads = self.zeros(state['params'])
    batch_stats, metrics = state['batch_stats'], {}
    for i, route in enumerate(routes):
      targets = teacher
      if self.cfg.ensemble_ib and route == table.smallest:
        targets = sum(ensemble) / len(ensemble)
      grads, batch_stats, loss = self.route_grad(
          state['params'], batch_stats, batch, targets, jax.random.fold_in(key, i), grads,
          route=route)
      metrics[f'loss_{"largest" if i == 0 else "smallest" if i == len(routes) - 1 else i}'] = loss
    metrics['loss'] = sum(metrics.values())
    return self.update(state, grads, batch_stats), metrics


def training_views(batch, mvco: bool) -> list[jax.Array]:
  """The augmented views a step trains on: two for multi-view consistency, else one."""
  if not mvco:
    return [batch['image']]
  if 'image_view1' not in batch:
    raise ValueError('supernet.mvco needs two views per image: set config.data.views = 2')
  return [batch['image'], batch['image_view1']]


# --------------------------------------------------------------------- BN recalibration


def recalibrate_stage(run: Run, variables: dict[str, Any]) -> dict[str, Any]:
  with run.checkpointer('recalibrate') as ckpt:
    if ckpt.latest_step() is not None:
      print('[recalibrate] complete; skipping', flush=True)
      restored, _ = ckpt.restore(checkpointing.abstract_like(variables))
      return restored
    n = run.config.recalibrate.num_batches
    variables = recalibrate_bn(run.model, variables, run.batches(0), list(run.table), n)
    ckpt.save(n, variables, run.meta('recalibrate', complete=True))
  print(f'[recalibrate] running statistics of {len(run.table)} routes recomputed from '
        f'{n} batches', flush=True)
  return variables


def recalibrate_bn(model, variables, batches, routes, num_batches: int):
  """Replaces running statistics by their exact average over `num_batches` training batches,
  for every route (rows that no route reaches keep their values)."""

  @functools.partial(jax.jit, static_argnames='route')
  def accumulate(variables, moments, images, route):
    _, updated = model.apply({**variables, 'bn_moments': moments}, images, route=route,
                             train=True, mutable=['batch_stats', 'bn_moments'],
                             rngs={'dropout': jax.random.key(0)})
    return updated['bn_moments']

  moments = {}
  for _, batch in zip(range(num_batches), batches):
    for route in routes:
      moments = accumulate(variables, moments, batch['image'], route=route)

  def average(stats, mom):
    count = mom['count'][:, None]
    touched = mom['var_sum'] > 0
    return {'mean': jnp.where(touched, mom['mean_sum'] / jnp.maximum(count, 1), stats['mean']),
            'var': jnp.where(touched, mom['var_sum'] / jnp.maximum(count, 1), stats['var'])}

  batch_stats = _map_bn(average, variables['batch_stats'], moments)
  return {**variables, 'batch_stats': batch_stats}


def _map_bn(fn, stats, moments):
  """Applies fn to each BN layer's {'mean','var'} and its moments, over nested dicts."""
  if 'mean' in stats and 'var' in stats and not isinstance(stats['mean'], dict):
    return fn(stats, moments) if moments else stats
  return {k: _map_bn(fn, v, moments.get(k, {})) for k, v in stats.items()}


# ---------------------------------------------------------------------------- Stage II


def gate_stage(run: Run, variables: dict[str, Any]) -> dict[str, Any]:
  """Sandwich gate sparsification: only the routing head trains; BN in eval mode."""
  cfg = run.config.gate
  tx = optim.make_optimizer(cfg.optimizer, cfg.steps, variables['params'])

  def fresh():
    return sharding.replicate({'step': jnp.zeros((), jnp.int32), **variables,
                               'opt_state': tx.init(variables['params'])}, run.mesh)

  state, start = _resume_or_start(run, 'gate', fresh, _variables)
  if start is None:
    return state
  image_shape = run.train_data.image_shape
  madds = jnp.asarray([route_complexity(run.model, r, image_shape, with_gate=True).madds
                       for r in run.table.routing_space], jnp.float32)
  step_fn = jax.jit(functools.partial(gate_train_step, run.model, tx, cfg),
                    donate_argnums=(0,), out_shardings=sharding.replicated(run.mesh))
  logger = ProgressLogger(run.workdir, 'gate', cfg.steps, run.config.batch_size)
  logger.start(start)
  with run.checkpointer('gate') as ckpt:
    for step, batch in zip(range(start, cfg.steps), run.batches(start)):
      state, metrics = step_fn(state, madds, batch, run.step_key(step, 1))
      done = step + 1
      if done % run.config.log_every_steps == 0 or done == cfg.steps:
        logger.log(done, metrics)
      if done % run.config.checkpoint_every_steps == 0 or done == cfg.steps:
        ckpt.save(done, state, run.meta('gate', complete=done == cfg.steps))
  return _variables(state)


def _variables(state):
  return {'params': state['params'], 'batch_stats': state['batch_stats']}


def gate_train_step(model, tx, cfg, state, route_madds, batch, key):
  """One SGS step: targets from the smallest route, Gumbel straight-through routing."""
  images, labels = batch['image'], batch['label']
  batch_stats = state['batch_stats']
  space = model.routes.routing_space
  num_routes = len(space)
  smallest = model.apply({'params': state['params'], 'batch_stats': batch_stats}, images,
                         route=space[0])
  targets = losses.gate_targets(jnp.argmax(smallest, -1) == labels, num_routes)

  def loss_fn(params):
    v = {'params': params, 'batch_stats': batch_stats}
    features, gate_logits = model.apply(v, images, method='prefix')
    weights = losses.gumbel_straight_through(key, gate_logits, cfg.gumbel_tau)
    logits = model.apply(v, features, weights, method='masked_suffix')
    mean_madds = (weights @ route_madds).mean()
    gate_ce = losses.gate_cross_entropy(gate_logits, targets, cfg.double_softmax)
    ce = losses.cross_entropy(logits, labels)
    penalty = losses.madds_penalty(mean_madds, cfg.madds_weight, cfg.madds_scale,
                                   cfg.madds_target or None)
    loss = cfg.gate_ce_weight * gate_ce + cfg.ce_weight * ce + penalty
    return loss, dict(gate_ce=gate_ce, ce=ce, madds_penalty=penalty, mean_madds=mean_madds,
                      route_histogram=jax.lax.stop_gradient(weights).sum(0),
                      gate_accuracy=(jnp.argmax(gate_logits, -1) == targets).mean(),
                      accuracy=(jnp.argmax(logits, -1) == labels).mean())

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = jax.tree.map(jnp.add, state['params'], updates)
  return ({**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state},
          {'loss': loss, **metrics})


def _log_eval(run: Run, logger: ProgressLogger, step: int, variables, routes):
  accuracies = {f'eval_accuracy_{r.name}': eval_lib.route_accuracy(
      run.model, variables, run.eval_data, r, run.mesh) for r in routes}
  print(f'[{logger.stage}] eval at step {step}: ' +
        '  '.join(f'{k} {v:.4f}' for k, v in accuracies.items()), flush=True)
  logger.write(step, accuracies)


STAGES = {'supernet': supernet_stage, 'recalibrate': recalibrate_stage, 'gate': gate_stage}
