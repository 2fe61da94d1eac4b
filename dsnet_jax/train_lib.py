"""`train_and_evaluate(config, workdir)`: Stage I supernet, BN recalibration, Stage II gate.

Orchestration only: resolves the config into a RunSpec, locks the workdir, checks that every
checkpoint belongs to this run, chains the stages lazily (a finished stage is skipped), saves,
logs and evaluates. The steps themselves are `train_steps`; how stages chain and resume is in
docs/design.md.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dsnet_jax import bn_calibration, checkpointing, config_lib, errors, eval_lib, optim
from dsnet_jax import budget as budget_lib
from dsnet_jax import escalation as escalation_lib
from dsnet_jax import routes as routes_lib
from dsnet_jax import rundir as rundir_lib
from dsnet_jax import sharding
from dsnet_jax.data import input_pipeline
from dsnet_jax.layers.norm import statistics_widths
from dsnet_jax.models.gated import ROUTING_HEAD
from dsnet_jax.progress import ProgressLogger, say
from dsnet_jax.train_steps import (GateState, SupernetFunctions, TrainState, Variables,
                                   gate_train_step)

# What a stage hands the next: its variables and the checkpoint they come from.
StageOutput = tuple[Variables, dict[str, Any]]


@dataclasses.dataclass
class Run:
  """What every stage shares."""
  spec: config_lib.RunSpec
  rundir: rundir_lib.RunDir
  model: Any
  mesh: jax.sharding.Mesh
  train_data: input_pipeline.Pipeline
  eval_data: input_pipeline.Pipeline
  allow_changes: tuple[str, ...] = ()
  # The training batches of each later stage.
  stage_data: dict[str, input_pipeline.Pipeline] = dataclasses.field(default_factory=dict)
  # With a gate budget, the held-out end of the training split that the routing offsets are
  # calibrated on (eval preprocessing).
  calibration_data: input_pipeline.Pipeline | None = None

  @property
  def table(self) -> routes_lib.RouteTable:
    return self.model.routes

  @functools.cached_property
  def statistics_widths(self) -> dict[str, list[int]]:
    return statistics_widths(self.model, self.train_data.image_shape)

  @functools.cached_property
  def abstract_variables(self) -> Variables:
    return rundir_lib.abstract_variables(self.model, self.train_data.image_shape, self.mesh)

  @functools.cached_property
  def budget(self) -> budget_lib.Budget | None:
    """The gate's budget with the routing space's route costs (None without one)."""
    return budget_lib.make_budget(self.spec.gate, self.model, self.train_data.image_shape,
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
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.spec.seed), step), purpose)

  def meta(self, stage: str, step: int, total: int, source: dict[str, Any],
           variables_key: str = '', gated: bool = False, **extra) -> dict[str, Any]:
    """What a checkpoint says of itself (see rundir's docstring)."""
    return {'stage': stage, 'step': step, 'total_steps': total, 'complete': step >= total,
            'source': source, 'variables_key': variables_key, 'gated': gated,
            'seed': self.spec.seed, 'model_name': self.spec.model_name,
            'statistics_widths': self.statistics_widths, 'config': self.spec.config_json,
            **extra}


def make_run(config: ml_collections.ConfigDict, workdir: str,
             allow_config_changes: Iterable[str] = ()) -> Run:
  """Resolves the config (`config_lib.resolve`) and checks the devices, the data and the
  budget before building anything heavy."""
  spec = config_lib.resolve(config)
  config_lib.check_key_paths(spec.config, allow_config_changes, '--allow_config_change key')
  if spec.init_checkpoint and not epath.Path(spec.init_checkpoint).is_dir():
    raise FileNotFoundError(f'config key init_checkpoint={spec.init_checkpoint}: no such '
                            'checkpoint directory')
  config_lib.validate_devices(spec.config, len(jax.devices()), jax.process_count())
  input_pipeline.check_available(spec.eval_data)
  mesh = sharding.make_mesh(spec.num_devices or None)

  def training(data, examples=None):
    return input_pipeline.make(data, 'train', batch_size=spec.batch_size, train=True,
                               seed=spec.seed, examples=examples)

  train_data = training(spec.supernet.data)
  run_dir = rundir_lib.RunDir(workdir)
  budget = budget_lib.make_budget(spec.gate, spec.model, train_data.image_shape,
                                  run_dir.workdir)
  held_out = spec.gate.held_out
  stage_data = {'recalibrate': training(spec.recalibrate.data),
                'gate': training(spec.gate.data, (0, -held_out) if held_out else None)}
  calibration_data = input_pipeline.make(
      spec.gate.data, 'train', batch_size=spec.eval_batch_size, train=False,
      examples=(-held_out, None)) if held_out else None
  eval_data = eval_lib.eval_pipeline(spec.eval_data, spec.eval_batch_size)
  run = Run(spec, run_dir, spec.model, mesh, train_data, eval_data,
            config_lib.with_derived_keys(allow_config_changes),
            stage_data, calibration_data)
  run.budget = budget  # Checked above, before any work.
  if spec.escalation and not spec.model.routes.auto:  # 'auto': checked once it is chosen.
    e = spec.escalation
    eval_lib.escalation_candidates(spec.model, train_data.image_shape, e.chain, e.budget,
                                   e.budget_unit, e.confidence)
  elif spec.escalation and spec.escalation.chain != escalation_lib.AUTO:
    for route in spec.escalation.chain:  # Its names at least, before the space is chosen.
      spec.model.routes[route]  # noqa: B018  (raises UnknownRouteError)
  if spec.escalation:
    eval_lib.check_calibration_images(spec.eval_data, spec.escalation.calibration_split,
                                      spec.escalation.calibration_examples)
  return run


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
  spec = run.spec
  with run.rundir.lock():
    check_resumable(run)
    output: Callable[[], StageOutput] = functools.partial(start_variables, run)
    for stage in spec.stages:
      output = functools.partial(STAGE_FUNCTIONS[stage], run, output)
    variables, _ = output()
    rule = calibrate_escalation(run, variables) if spec.escalation else None
    gated = 'gate' in spec.stages
    # The budget the gate's offsets were calibrated for, as eval.py reads it.
    calibrated = eval_lib.calibrated_budget(run.rundir.status('gate').meta) if gated else None
    return eval_lib.evaluate_and_report(
        run.model, variables, run.eval_data, run.mesh, run.rundir.workdir, gated=gated,
        budget_meta=calibrated, latency=eval_lib.workdir_latency(run.rundir.workdir,
                                                        run.eval_data.image_shape, run.model),
        title=f'{type(run.model).__name__} on {spec.eval_data.name}, after {spec.stages[-1]}',
        escalation=rule)


def calibrate_escalation(run: Run, variables: Variables):
  """config.escalation's router for the last stage's variables, calibrated on held-out
  training images and saved beside that stage's checkpoint."""
  e, stage = run.spec.escalation, run.spec.stages[-1]
  rule, found = eval_lib.calibrate_escalation(
      run.model, variables, run.spec.eval_data, run.spec.eval_batch_size, e.chain, e.budget,
      e.budget_unit, e.confidence, e.calibration_examples, run.mesh, e.calibration_split)
  rundir_lib.save_escalation(run.rundir.stage_dir(stage), rule, run.rundir.status(stage).step,
                             run.model, run.train_data.image_shape,
                             **found)
  return rule


def check_resumable(run: Run) -> None:
  """Refuses, before any work, checkpoints of another config or computed from another input.

  A stage's checkpoint is compared on every key but the run-neutral ones and the sections of
  later stages; a later stage's checkpoint must have started from the output that the stage
  before it will have (else it is stale: e.g. the supernet was extended after the gate ran).
  """
  previous = _earlier_stage(run)
  first = run.spec.stages[0]
  if (first != 'supernet' and previous is None and not run.spec.init_checkpoint
      and not run.rundir.status(first).exists):
    before = config_lib.STAGES[:config_lib.STAGES.index(first)]
    raise errors.ConfigError(
        f'config key stages={run.spec.stages} starts at {first}, but {run.rundir.workdir} has '
        f'no finished {" or ".join(before)} stage and config.init_checkpoint is not set: '
        f'{first} would start from a randomly initialised supernet. Run the earlier stages '
        'first, or name the checkpoint to start from in init_checkpoint.')
  for stage in run.spec.stages:
    status = run.rundir.status(stage)
    if status.exists and 'config' in status.meta:
      _check_stage_config(run, stage, status.meta)
    if status.exists and previous is not None and 'source' in status.meta:
      step = max(previous.step or 0, run.spec.stage_steps(previous.stage))
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
  later = [f'{s}.' for s in config_lib.STAGES[config_lib.STAGES.index(stage) + 1:]]
  finished = meta.get('step', 0) >= run.spec.stage_steps(stage)
  routing = rundir_lib.ROUTING_SPACE_KEYS if stage != 'gate' and finished else ()
  rundir_lib.check_config(meta, run.spec.config, None, run.allow_changes,
                          f'checkpoints/{stage} in {run.rundir.workdir}',
                          ignore=(*rundir_lib.RUN_NEUTRAL_KEYS, *later, *routing))


def _earlier_stage(run: Run) -> rundir_lib.StageStatus | None:
  """The last finished stage before the first configured one, if the workdir has one (e.g.
  the supernet, when a later run configures only the gate stage) and no init_checkpoint is
  set."""
  if run.spec.init_checkpoint:
    return None
  first = config_lib.STAGES.index(run.spec.stages[0])
  for stage in reversed(config_lib.STAGES[:first]):
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
      config=run.spec.config, allow_changes=run.allow_changes)
  say(f'starting from {restored.describe()}')
  return restored.variables, {'stage': earlier.stage, 'step': restored.step}


def init_variables(run: Run) -> StageOutput:
  """Full-size variables, from `config.init_checkpoint` or a fresh init, replicated."""
  if run.spec.init_checkpoint:
    restored = rundir_lib.restore_variables(
        run.spec.init_checkpoint, run.model, run.train_data.image_shape, run.mesh,
        config=run.spec.config, allow_changes=run.allow_changes)
    say(f'initialised from {restored.describe()}')
    return restored.variables, {'init_checkpoint': run.spec.init_checkpoint,
                                'step': restored.step}
  init = jax.jit(functools.partial(run.model.init_variables,
                                   image_shape=run.train_data.image_shape),
                 out_shardings=sharding.replicated(run.mesh))
  return init(jax.random.key(run.spec.seed)), {'init_seed': run.spec.seed}


def _finished_output(run: Run, stage: str) -> StageOutput | None:
  """The variables of a stage whose checkpoint reached the configured steps, as
  `rundir.restore_variables` reads them (so a routing space changed since an ungated stage
  gets a new routing head), else None."""
  total = run.spec.stage_steps(stage)
  if (run.rundir.status(stage).step or 0) < total:
    return None
  restored = rundir_lib.restore_variables(
      run.rundir.stage_dir(stage), run.model, run.train_data.image_shape, run.mesh, run.spec.config,
      run.allow_changes, log=lambda line: say(f'[{stage}] {line}'))
  if restored.step < total:  # The finished step was unreadable: the stage resumes.
    return None
  say(f'[{stage}] finished at step {restored.step}; skipping')
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
                                       log=lambda line: say(f'[{stage}] {line}'))
      for bad in [s for s in ckpt.all_steps() if s > step]:
        say(f'[{stage}] step {bad} set aside as {ckpt.set_aside(bad)}')
      say(f'[{stage}] ' + (f'finished at step {step}; skipping' if step >= total
                           else f'resuming at step {step}'))
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
  spec = run.spec
  run.rundir.truncate_metrics(stage, start)
  logger = ProgressLogger(run.rundir.metrics_path, stage, total, spec.batch_size)
  logger.start(start)
  with run.rundir.checkpointer(stage, keep=spec.keep_checkpoints) as ckpt:
    for step, batch in zip(range(start, total), run.batches(start, stage)):
      state, metrics = step_fn(state, batch, step)
      done = step + 1
      if step == start:  # The first step compiles: speed and ETA count from its end.
        jax.block_until_ready(metrics)
        logger.compiled(done)
      if done % spec.log_every_steps == 0 or done == total:
        logger.log(done, metrics)
      if after_step:
        after_step(done, state, logger)
      if done % spec.checkpoint_every_steps == 0 or done == total:
        ckpt.save(done, state, checkpoint_meta(done))
  return state, logger


# ----------------------------------------------------------------------------- Stage I


def supernet_stage(run: Run, upstream: Callable[[], StageOutput]) -> StageOutput:
  """Sandwich rule + in-place bootstrapping from an EMA teacher; hands on the EMA variables."""
  cfg = run.spec.supernet
  if (finished := _finished_output(run, 'supernet')) is not None:
    return finished
  tx = supernet_optimizer(run)
  fresh = functools.partial(TrainState.create, tx=tx, with_ema=True)
  state, start, source = _stage_start(run, 'supernet', cfg.steps, _abstract_state(run, fresh),
                                      fresh, upstream)
  if start < cfg.steps:
    fns = SupernetFunctions(run.model, tx, cfg.recipe, run.mesh)
    evaluated = ([run.table[cfg.recipe.train_route]] if cfg.recipe.train_route
                 else [run.table.smallest, run.table.largest])

    def step_fn(state, batch, step):
      return fns.step(state, batch, run.table, run.spec.seed, step, run.step_key(step, 0))

    def after_step(done, state, logger):
      if run.spec.eval_every_steps and done % run.spec.eval_every_steps == 0:
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
  cfg = run.spec.supernet
  return optim.make_optimizer(cfg.optimizer, cfg.steps, run.abstract_variables['params'],
                              frozen=ROUTING_HEAD)


# --------------------------------------------------------------------- BN recalibration


def recalibrate_stage(run: Run, upstream: Callable[[], StageOutput]) -> StageOutput:
  """Every route's running statistics set to their exact average over training batches."""
  n = run.spec.recalibrate.num_batches
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
    say(f'[recalibrate] running statistics of {len(run.table)} routes recomputed from '
        f'{n} batches')
  return variables, {'stage': 'recalibrate', 'step': max(step, n)}


# ---------------------------------------------------------------------------- Stage II


def gate_stage(run: Run, upstream: Callable[[], StageOutput]) -> StageOutput:
  """Sandwich gate sparsification: only the routing head trains; BN in eval mode; hands on
  the EMA of the variables (`gate.ema_decay`), as the authors report theirs. With a budget,
  the routing offsets are calibrated on the held-out examples at the last step and saved
  with it (dsnet_jax.budget)."""
  cfg = run.spec.gate
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
  target_cost = run.budget.value if run.budget else 0.0
  compiled = jax.jit(functools.partial(gate_train_step, run.model, tx, cfg.recipe, target_cost),
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
  rows = [{'route': r.name, 'cost': cost,
           'accuracy': eval_lib.route_accuracy(run.model, variables, run.calibration_data, r,
                                               run.mesh)}
          for r, cost in zip(run.table.routing_space, run.route_costs())]
  space = budget_lib.propose_routing_space(rows, run.budget.value)
  say('[gate] routes on the held-out training images: ' + '  '.join(
      f'{r["route"]} {r["accuracy"]:.4f} @ {run.budget.format(r["cost"])}' for r in rows) +
      f'\n[gate] routing space for the budget: {list(space)}')
  run.use_model(run.model.clone(routing_space=space))
  run.budget  # The routing head's cost depends on the number of routes: check it again.
  variables = rundir_lib.replace_routing_head(variables, run.model, shape, run.mesh,
                                              run.spec.seed)
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
  say(f'[gate] routing offsets {[round(float(o), 4) + 0.0 for o in offsets]} calibrated on '
      f'{len(logits)} held-out training images: argmax cost {budget.format(before)} -> '
      f'{budget.format(after)} (budget {budget.format(budget.value)})')
  logger.write(step, {'calibration_cost_before': before, 'calibration_cost_after': after})
  return {**budget.meta(), 'routing_offsets': offsets.tolist()}


def _log_eval(run: Run, logger: ProgressLogger, step: int, variables, routes):
  accuracies = {f'eval_accuracy_{r.name}': eval_lib.route_accuracy(
      run.model, variables, run.eval_data, r, run.mesh) for r in routes}
  say(f'[{logger.stage}] eval at step {step}: ' +
      '  '.join(f'{k} {v:.4f}' for k, v in accuracies.items()))
  logger.write(step, accuracies)


STAGE_FUNCTIONS = {'supernet': supernet_stage, 'recalibrate': recalibrate_stage, 'gate': gate_stage}
