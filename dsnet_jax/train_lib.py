"""`train_and_evaluate(config, workdir)`: Stage I supernet, BN recalibration, Stage II gate.

Each stage checkpoints under the run directory (`rundir`); a stage is finished when its latest
step reaches the configured total, and a finished stage is skipped on resume. Stages are
chained lazily from the last: a finished stage returns its own variables without touching the
stages before it, an unfinished one resumes from its own checkpoint, and only a stage that
starts fresh asks the stage before it for its output. Before any work the workdir is locked
(one run per workdir) and every existing checkpoint is checked against the current config
and against the checkpoint it was computed from, so nothing resumes into a different run.

With `config.gate.budget`, Stage II is held to an average cost (dsnet_jax.budget): dual ascent
while it trains, then routing offsets calibrated on held-out training images; with
`model.routing_space='auto'` it first chooses the routing space for the budget.

Every random choice (routes, dropout, Gumbel noise, batch order, augmentation) is a
function of (config.seed, step), so a resumed run continues exactly as an unbroken one.
A stage changes only what it trains: Stage I never moves the routing head (it gets no
gradient there), Stage II moves nothing else (`config.gate.optimizer.param_groups`).

Stage I compiles one gradient program per route (route is static), never one per route
combination: a step draws its sandwich on the host, sums the routes' gradients into one
accumulator and applies a single optimizer update.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dsnet_jax import errors
from dsnet_jax import bn_calibration, checkpointing, config_lib, eval_lib, optim
from dsnet_jax import budget as budget_lib
from dsnet_jax import routes as routes_lib
from dsnet_jax import rundir as rundir_lib
from dsnet_jax import sharding
from dsnet_jax.data import input_pipeline
from dsnet_jax.models import get_model
from dsnet_jax.models.gated import ROUTING_HEAD
from dsnet_jax.progress import ProgressLogger
from dsnet_jax.train_steps import (GateState, SupernetFunctions, TrainState, Variables,
                                   gate_train_step)

# What a stage hands the next: its variables and the checkpoint they come from.
StageOutput = tuple[Variables, dict[str, Any]]


@dataclasses.dataclass
class Run:
  """What every stage shares."""
  config: ml_collections.ConfigDict
  rundir: rundir_lib.RunDir
  model: Any
  mesh: jax.sharding.Mesh
  train_data: input_pipeline.Pipeline
  eval_data: input_pipeline.Pipeline
  allow_changes: tuple[str, ...] = ()
  # The training batches of each later stage (config_lib.stage_data).
  stage_data: dict[str, input_pipeline.Pipeline] = dataclasses.field(default_factory=dict)
  # With a gate budget, the held-out end of the training split that the routing offsets are
  # calibrated on (eval preprocessing).
  calibration_data: input_pipeline.Pipeline | None = None

  @property
  def table(self) -> routes_lib.RouteTable:
    return self.model.routes

  @functools.cached_property
  def abstract_variables(self) -> Variables:
    return rundir_lib.abstract_variables(self.model, self.train_data.image_shape, self.mesh)

  @functools.cached_property
  def budget(self) -> budget_lib.Budget | None:
    """The gate's budget with the routing space's route costs (None without one)."""
    return budget_lib.make_budget(self.config.gate, self.model, self.train_data.image_shape,
                                  self.rundir.workdir)

  def route_costs(self) -> np.ndarray:
    """Each routing-space route's cost: in the budget's unit, else MAdds (gate included)."""
    if self.budget:
      return self.budget.route_costs
    return self.model.routing_madds(self.train_data.image_shape)

  def use_model(self, model) -> None:
    """From now on, `model` (the same one with the gate stage's chosen routing space)."""
    self.model = model
    self.__dict__.pop('abstract_variables', None)
    self.__dict__.pop('budget', None)

  def batches(self, start_step: int, stage: str = 'supernet'):
    """Global training batches of `stage` from `start_step` on."""
    pipeline = self.stage_data.get(stage, self.train_data)
    for batch in pipeline.batches(start_step):
      yield sharding.global_batch(batch, self.mesh)

  def step_key(self, step: int, purpose: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), step), purpose)

  def meta(self, stage: str, step: int, total: int, source: dict[str, Any],
           variables_key: str = '', gated: bool = False, **extra) -> dict[str, Any]:
    """What a checkpoint says of itself (see rundir's docstring)."""
    return {'stage': stage, 'step': step, 'total_steps': total, 'complete': step >= total,
            'source': source, 'variables_key': variables_key, 'gated': gated,
            'seed': self.config.seed, 'model_name': self.config.model_name,
            'config': self.config.to_json(), **extra}


def make_run(config: ml_collections.ConfigDict, workdir: str,
             allow_config_changes: Iterable[str] = ()) -> Run:
  """Validates the config, the data and the batch sizes before building anything heavy; the
  run holds the config with its durations resolved (resolve_config)."""
  config = resolve_config(config)
  config_lib.check_key_paths(config, allow_config_changes, '--allow_config_change key')
  config_lib.validate_devices(config, len(jax.devices()), jax.process_count())
  input_pipeline.check_available(config_lib.data_spec(config.data))
  mesh = sharding.make_mesh(config.num_devices or None)
  model = get_model(config.model_name, **config.model)

  def training(stage, examples=None):
    return input_pipeline.make(config_lib.stage_data(config, stage), 'train',
                               batch_size=config.batch_size, train=True, seed=config.seed,
                               examples=examples)

  train_data = training('supernet')
  run_dir = rundir_lib.RunDir(workdir)
  budget = budget_lib.make_budget(config.gate, model, train_data.image_shape, run_dir.workdir)
  held_out = _held_out(config, train_data.num_examples)
  stage_data = {'recalibrate': training('recalibrate'),
                'gate': training('gate', (0, -held_out) if held_out else None)}
  calibration_data = input_pipeline.make(
      config_lib.stage_data(config, 'gate'), 'train', batch_size=config.eval_batch_size,
      train=False, examples=(-held_out, None)) if held_out else None
  eval_data = eval_lib.eval_pipeline(config)
  run = Run(config, run_dir, model, mesh, train_data, eval_data,
            config_lib.with_derived_keys(allow_config_changes),
            stage_data, calibration_data)
  run.budget = budget  # Checked above, before any work.
  return run


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config as training runs it: validated, with every duration in steps at its batch
  size (config_lib.resolve_durations; an epoch of the gate stage leaves out the examples
  held out to calibrate the budget).

  Raises:
    errors.ConfigError: an invalid config; FileNotFoundError: the data is missing.
  """
  config_lib.validate(config)
  if not config_lib.counts_in_epochs(config):  # The data's size is not needed.
    return config_lib.resolve_durations(config, None)
  input_pipeline.check_available(config_lib.data_spec(config.data), 'train')
  examples = input_pipeline.num_examples(config_lib.stage_data(config, 'supernet'), 'train')
  return config_lib.resolve_durations(
      config, {'supernet': examples, 'gate': examples - _held_out(config, examples)})


def _held_out(config: ml_collections.ConfigDict, examples: int) -> int:
  """The training examples held out to calibrate the gate's budget (0 without a budget).

  Raises:
    errors.ConfigError: they leave the gate stage less than one batch.
  """
  held_out = config.gate.calibration_examples if config.gate.budget else 0
  if held_out and examples - held_out < config.batch_size:
    raise errors.ConfigError(
        f'config key gate.calibration_examples={held_out} leaves fewer than one batch of the '
        f'{examples} training examples for the gate stage')
  return held_out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_changes: Iterable[str] = ()) -> dict[str, Any]:
  """Runs `config.stages` in order (resuming from `workdir`), then the final evaluation.

  Args:
    config: a training config (configs/*.py).
    workdir: the run directory; created if missing.
    allow_config_changes: config keys (or 'section.' prefixes) that may differ from those
      the workdir's checkpoints were written with, e.g. 'supernet.steps' to extend a stage.
  Raises:
    errors.ConfigError, errors.ConfigMismatchError, errors.StaleStageError,
    errors.LockedError: before any training.
  """
  run = make_run(config, workdir, allow_config_changes)
  with run.rundir.lock():
    check_resumable(run)
    output: Callable[[], StageOutput] = functools.partial(start_variables, run)
    for stage in config.stages:
      output = functools.partial(STAGES[stage], run, output)
    variables, _ = output()
    gated = 'gate' in config.stages
    # The budget the gate's offsets were calibrated for, as eval.py reads it.
    budget = eval_lib.budget_of(run.rundir.status('gate').meta) if gated else None
    return eval_lib.evaluate_and_report(
        run.model, variables, run.eval_data, run.mesh, run.rundir.workdir, gated=gated,
        budget=budget, latency=eval_lib.workdir_latency(run.rundir.workdir,
                                                        run.eval_data.image_shape, run.model),
        title=f'{type(run.model).__name__} on {config.data.name}, after {config.stages[-1]}')


def stage_steps(config: ml_collections.ConfigDict, stage: str) -> int:
  """The step at which `stage` is finished."""
  return {'supernet': config.supernet.steps, 'recalibrate': config.recalibrate.num_batches,
          'gate': config.gate.steps}[stage]


def check_resumable(run: Run) -> None:
  """Refuses, before any work, checkpoints of another config or computed from another input.

  A stage's checkpoint is compared on every key but the run-neutral ones and the sections of
  later stages; a later stage's checkpoint must have started from the output that the stage
  before it will have (else it is stale: e.g. the supernet was extended after the gate ran).
  """
  previous = _earlier_stage(run)
  for stage in run.config.stages:
    status = run.rundir.status(stage)
    if status.exists and 'config' in status.meta:
      _check_stage_config(run, stage, status.meta)
    if status.exists and previous is not None and 'source' in status.meta:
      step = max(previous.step or 0, stage_steps(run.config, previous.stage))
      expected = {'stage': previous.stage, 'step': step}
      if status.meta['source'] != expected:
        raise errors.StaleStageError(
            f'checkpoints/{stage} was computed from {status.meta["source"]}, but this run '
            f'hands it {expected}: it would go on from a stale input. Move '
            f'{run.rundir.stage_dir(stage)} (and the stages after it) aside, or use a new '
            'workdir.')
    previous = status


def _check_stage_config(run: Run, stage: str, meta: dict[str, Any]) -> None:
  """A stage's checkpoint must have the current config but for run-neutral keys, later
  stages' sections and the allowed changes (and, once an ungated stage is finished, the
  routing space: the gate stage re-initialises the routing head)."""
  later = [f'{s}.' for s in rundir_lib.STAGES[rundir_lib.STAGES.index(stage) + 1:]]
  finished = meta.get('step', 0) >= stage_steps(run.config, stage)
  routing = rundir_lib.ROUTING_SPACE_KEYS if stage != 'gate' and finished else ()
  rundir_lib.check_config(meta, run.config, None, run.allow_changes,
                          f'checkpoints/{stage} in {run.rundir.workdir}',
                          ignore=(*rundir_lib.RUN_NEUTRAL_KEYS, *later, *routing))


def _earlier_stage(run: Run) -> rundir_lib.StageStatus | None:
  """The last finished stage before the first configured one, if the workdir has one (e.g.
  the supernet, when a later run configures only the gate stage) and no init_checkpoint is
  set."""
  if run.config.init_checkpoint:
    return None
  first = rundir_lib.STAGES.index(run.config.stages[0])
  for stage in reversed(rundir_lib.STAGES[:first]):
    status = run.rundir.status(stage)
    if status.exists and status.meta.get('complete'):
      return status
  return None


def start_variables(run: Run) -> StageOutput:
  """What the first configured stage starts from: the last finished earlier stage of the
  workdir (its variables as its meta says), else `init_variables`."""
  earlier = _earlier_stage(run)
  if earlier is None:
    return init_variables(run)
  restored = rundir_lib.restore_variables(
      run.rundir.stage_dir(earlier.stage), run.model, run.train_data.image_shape, run.mesh,
      config=run.config, allow_changes=run.allow_changes)
  print(f'starting from {restored.describe()}', flush=True)
  return restored.variables, {'stage': earlier.stage, 'step': restored.step}


def init_variables(run: Run) -> StageOutput:
  """Full-size variables, from `config.init_checkpoint` or a fresh init, replicated."""
  if run.config.init_checkpoint:
    restored = rundir_lib.restore_variables(
        run.config.init_checkpoint, run.model, run.train_data.image_shape, run.mesh,
        config=run.config, allow_changes=run.allow_changes)
    print(f'initialised from {restored.describe()}', flush=True)
    return restored.variables, {'init_checkpoint': run.config.init_checkpoint,
                                'step': restored.step}
  init = jax.jit(functools.partial(run.model.init_variables,
                                   image_shape=run.train_data.image_shape),
                 out_shardings=sharding.replicated(run.mesh))
  return init(jax.random.key(run.config.seed)), {'init_seed': run.config.seed}


def _finished_output(run: Run, stage: str) -> StageOutput | None:
  """The variables of a stage whose checkpoint reached the configured steps, as
  `rundir.restore_variables` reads them (so a routing space changed since an ungated stage
  gets a new routing head), else None."""
  total = stage_steps(run.config, stage)
  if (run.rundir.status(stage).step or 0) < total:
    return None
  restored = rundir_lib.restore_variables(
      run.rundir.stage_dir(stage), run.model, run.train_data.image_shape, run.mesh, run.config,
      run.allow_changes, log=lambda line: print(f'[{stage}] {line}', flush=True))
  if restored.step < total:  # The finished step was unreadable: the stage resumes.
    return None
  print(f'[{stage}] finished at step {restored.step}; skipping', flush=True)
  return restored.variables, {'stage': stage, 'step': restored.step}


def _stage_start(run: Run, stage: str, total: int, abstract_state, fresh_state: Callable,
                 upstream: Callable[[], StageOutput]):
  """(state, first step, source) of a stage: its checkpoint's, else fresh from `upstream`.

  Unreadable newer steps are set aside (renamed, never deleted) so the stage can redo them.
  """
  def target(meta):  # The step actually restored may be older than the one checked before.
    if 'config' in meta:
      _check_stage_config(run, stage, meta)
    return abstract_state

  with run.rundir.checkpointer(stage, keep=None) as ckpt:
    if ckpt.latest_step() is not None:
      state, meta, step = ckpt.restore(target, fallback=True,
                                       log=lambda line: print(f'[{stage}] {line}', flush=True))
      for bad in [s for s in ckpt.all_steps() if s > step]:
        print(f'[{stage}] step {bad} set aside as {ckpt.set_aside(bad)}', flush=True)
      print(f'[{stage}] ' + (f'finished at step {step}; skipping' if step >= total
                             else f'resuming at step {step}'), flush=True)
      return state, step, meta.get('source')
  variables, source = upstream()
  # One compiled program, not an eager op (and a compile) per leaf of the state.
  return sharding.replicate(jax.jit(fresh_state)(variables), run.mesh), 0, source


def _abstract_state(run: Run, fresh_state: Callable):
  return checkpointing.abstract_like(jax.eval_shape(fresh_state, run.abstract_variables),
                                     sharding.replicated(run.mesh))


def _train_steps(run: Run, stage: str, state, start: int, total: int, step_fn: Callable,
                 checkpoint_meta: Callable[[int], dict], after_step: Callable | None = None):
  """Runs steps start..total-1 of `step_fn(state, batch, step) -> (state, metrics)`, logging
  and saving as the config says; `after_step(done, state, logger)` runs after each step."""
  config = run.config
  run.rundir.truncate_metrics(stage, start)
  logger = ProgressLogger(run.rundir.metrics_path, stage, total, config.batch_size)
  logger.start(start)
  with run.rundir.checkpointer(stage, keep=config.keep_checkpoints) as ckpt:
    for step, batch in zip(range(start, total), run.batches(start, stage)):
      state, metrics = step_fn(state, batch, step)
      done = step + 1
      if step == start:  # The first step compiles: speed and ETA count from its end.
        jax.block_until_ready(metrics)
        logger.compiled(done)
      if done % config.log_every_steps == 0 or done == total:
        logger.log(done, metrics)
      if after_step:
        after_step(done, state, logger)
      if done % config.checkpoint_every_steps == 0 or done == total:
        ckpt.save(done, state, checkpoint_meta(done))
  return state, logger


# ----------------------------------------------------------------------------- Stage I


def supernet_stage(run: Run, upstream: Callable[[], StageOutput]) -> StageOutput:
  """Sandwich rule + in-place bootstrapping from an EMA teacher; hands on the EMA variables."""
  cfg = run.config.supernet
  if (finished := _finished_output(run, 'supernet')) is not None:
    return finished
  tx = supernet_optimizer(run)
  fresh = functools.partial(TrainState.create, tx=tx, with_ema=True)
  state, start, source = _stage_start(run, 'supernet', cfg.steps, _abstract_state(run, fresh),
                                      fresh, upstream)
  if start < cfg.steps:
    fns = SupernetFunctions(run.model, tx, config_lib.supernet_recipe(run.config), run.mesh)
    evaluated = ([run.table[cfg.train_route]] if cfg.train_route
                 else [run.table.smallest, run.table.largest])

    def step_fn(state, batch, step):
      return fns.step(state, batch, run.table, run.config.seed, step, run.step_key(step, 0))

    def after_step(done, state, logger):
      if run.config.eval_every_steps and done % run.config.eval_every_steps == 0:
        _log_eval(run, logger, done, state.ema, evaluated)

    state, logger = _train_steps(
        run, 'supernet', state, start, cfg.steps, step_fn,
        lambda done: run.meta('supernet', done, cfg.steps, source, variables_key='ema'),
        after_step)
    _log_eval(run, logger, cfg.steps, state.ema, evaluated)
  return state.ema, {'stage': 'supernet', 'step': max(start, cfg.steps)}


def supernet_optimizer(run: Run) -> optax.GradientTransformation:
  """Stage I's optimizer: `supernet.optimizer` over `supernet.steps`, the routing head frozen
  (it gets no gradient in Stage I, but weight decay would still move it)."""
  cfg = run.config.supernet
  return optim.make_optimizer(cfg.optimizer, cfg.steps, run.abstract_variables['params'],
                              frozen=ROUTING_HEAD)


# --------------------------------------------------------------------- BN recalibration


def recalibrate_stage(run: Run, upstream: Callable[[], StageOutput]) -> StageOutput:
  """Every route's running statistics set to their exact average over training batches."""
  n = run.config.recalibrate.num_batches
  if (finished := _finished_output(run, 'recalibrate')) is not None:
    return finished
  identity = lambda variables: variables
  variables, step, source = _stage_start(run, 'recalibrate', n,
                                         _abstract_state(run, identity), identity, upstream)
  if step < n:
    variables = bn_calibration.recalibrate(run.model, variables, run.batches(0, 'recalibrate'),
                                           list(run.table), n)
    with run.rundir.checkpointer('recalibrate', keep=None) as ckpt:
      ckpt.save(n, variables, run.meta('recalibrate', n, n, source))
    print(f'[recalibrate] running statistics of {len(run.table)} routes recomputed from '
          f'{n} batches', flush=True)
  return variables, {'stage': 'recalibrate', 'step': max(step, n)}


# ---------------------------------------------------------------------------- Stage II


def gate_stage(run: Run, upstream: Callable[[], StageOutput]) -> StageOutput:
  """Sandwich gate sparsification: only the routing head trains; BN in eval mode; hands on
  the EMA of the variables (`gate.ema_decay`), as the authors report theirs. With a budget,
  the routing offsets are calibrated on the held-out examples at the last step and saved
  with it (dsnet_jax.budget)."""
  cfg = run.config.gate
  if run.table.auto:
    upstream = _choose_routing_space(run, upstream)
  if (finished := _finished_output(run, 'gate')) is not None:
    return finished
  tx = optim.make_optimizer(cfg.optimizer, cfg.steps, run.abstract_variables['params'])
  fresh = functools.partial(GateState.create, tx=tx, with_ema=True)
  state, start, source = _stage_start(run, 'gate', cfg.steps, _abstract_state(run, fresh),
                                      fresh, upstream)
  route_costs = run.route_costs()
  calibration = {}
  budget = run.budget.value if run.budget else 0.0
  compiled = jax.jit(functools.partial(gate_train_step, run.model, tx,
                                       config_lib.gate_recipe(run.config), budget),
                     donate_argnums=(0,), out_shardings=sharding.replicated(run.mesh))
  costs = jnp.asarray(route_costs, jnp.float32)

  def after_step(done, state, logger):
    if done == cfg.steps and run.budget:
      calibration.update(calibrate_routing(run, state.ema, logger, done))

  state, _ = _train_steps(
      run, 'gate', state, start, cfg.steps,
      lambda state, batch, step: compiled(state, costs, batch, run.step_key(step, 1)),
      lambda done: run.meta('gate', done, cfg.steps, source, variables_key='ema', gated=True,
                            routing_space=[r.name for r in run.table.routing_space],
                            **(calibration if done == cfg.steps else {})),
      after_step)
  variables = state.ema
  if calibration:
    variables = budget_lib.with_offsets(variables, calibration['routing_offsets'], run.mesh)
  return variables, {'stage': 'gate', 'step': cfg.steps}


def _choose_routing_space(run: Run, upstream: Callable[[], StageOutput]
                          ) -> Callable[[], StageOutput]:
  """`model.routing_space='auto'`: the gate checkpoint's routing space when there is one,
  else `budget.propose_routing_space` from the upstream variables' routes measured on the
  held-out calibration examples; `run` uses the model with it from now on. Returns what
  the gate stage starts from (the upstream variables with a routing head for that space)."""
  status = run.rundir.status('gate')
  if 'routing_space' in status.meta:
    run.use_model(run.model.clone(routing_space=tuple(status.meta['routing_space'])))
    return upstream
  variables, source = upstream()
  shape = run.train_data.image_shape
  rows = [{'route': r.name, 'madds': cost,
           'accuracy': eval_lib.route_accuracy(run.model, variables, run.calibration_data, r,
                                               run.mesh)}
          for r, cost in zip(run.table.routing_space, run.route_costs())]
  space = budget_lib.propose_routing_space(rows, run.budget.value)
  print('[gate] routes on the held-out training images: ' + '  '.join(
      f'{r["route"]} {r["accuracy"]:.4f} @ {run.budget.format(r["madds"])}' for r in rows) +
        f'\n[gate] routing space for the budget: {list(space)}', flush=True)
  run.use_model(run.model.clone(routing_space=space))
  run.budget  # The routing head's cost depends on the number of routes: check it again.
  variables = rundir_lib.replace_routing_head(variables, run.model, shape, run.mesh,
                                              run.config.seed)
  return lambda: (variables, source)


def calibrate_routing(run: Run, variables: Variables, logger: ProgressLogger, step: int
                      ) -> dict[str, Any]:
  """{'budget_madds' or 'budget_ms', 'routing_offsets'}: offsets after which argmax routing of
  `variables` spends `run.budget` on average over `run.calibration_data`
  (budget.calibrate_offsets)."""
  routing_logits = jax.jit(lambda v, batch: (run.model.apply_prefix(v, batch['image'])[1],
                                             batch['mask']),
                           out_shardings=sharding.replicated(run.mesh))
  outputs = jax.device_get([routing_logits(variables, sharding.global_batch(batch, run.mesh))
                            for batch in run.calibration_data.batches()])
  logits = np.concatenate([l for l, _ in outputs])[np.concatenate([m for _, m in outputs])]
  budget = run.budget
  offsets = budget_lib.calibrate_offsets(logits, budget.route_costs, budget.value)
  before, after = (budget_lib.routed_cost(logits, budget.route_costs, o) for o in (None, offsets))
  print(f'[gate] routing offsets {[round(float(o), 4) + 0.0 for o in offsets]} calibrated on '
        f'{len(logits)} held-out training images: argmax cost {budget.format(before)} -> '
        f'{budget.format(after)} (budget {budget.format(budget.value)})', flush=True)
  logger.write(step, {'calibration_cost_before': before, 'calibration_cost_after': after})
  return {**budget.meta(), 'routing_offsets': offsets.tolist()}


def _log_eval(run: Run, logger: ProgressLogger, step: int, variables, routes):
  accuracies = {f'eval_accuracy_{r.name}': eval_lib.route_accuracy(
      run.model, variables, run.eval_data, r, run.mesh) for r in routes}
  print(f'[{logger.stage}] eval at step {step}: ' +
        '  '.join(f'{k} {v:.4f}' for k, v in accuracies.items()), flush=True)
  logger.write(step, accuracies)


STAGES = {'supernet': supernet_stage, 'recalibrate': recalibrate_stage, 'gate': gate_stage}
