"""The run directory: the one module that knows a workdir's layout and what its checkpoints hold.

    workdir/
      checkpoints/<stage>/<step>/   orbax steps of one training stage (supernet, recalibrate,
                                    gate); `<step>.unreadable` folders were set aside
      checkpoints/<stage>/escalation.json   an escalation router calibrated for one of its
                                    steps (dsnet_jax.escalation; tools/escalate writes it)
      metrics.jsonl                  progress and evaluation records of every stage
      eval.json, eval.png            the last evaluation
      .lock                          held by the one training process (its PID inside)

A checkpoint's meta says what it holds, so nothing depends on folder names: `stage` (the stage
that wrote it), `variables_key` (where {'params', 'batch_stats'} sit in the state: 'ema' for
the supernet's EMA teacher, '' for the top level), `gated` (the routing head was trained),
`complete`, `step` / `total_steps`, `source` (the checkpoint the stage started from), the
run's `config` (JSON) and, for a gate trained to a budget, `budget_madds` and the calibrated
`routing_offsets` (dsnet_jax.budget), and `statistics_widths` ({BatchNorm path: widths}: row
i of its `mean`/`var` holds width widths[i]; a restore compares it with the model's).
Checkpoints from outside (the importer) carry `variables_key` ''.

Every reader here probes without creating folders, and restores are exact: a checkpoint that
does not match the model, or whose saved config differs from the current one in what changes
the model or the run, is refused with the list of differences.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from typing import Any, Iterable, Iterator, Sequence

from etils import epath
from flax import traverse_util
import ml_collections
import jax
from jax.experimental import multihost_utils
import numpy as np

from dsnet_jax import budget as budget_lib
from dsnet_jax import checkpointing, config_lib, errors, paths, sharding
from dsnet_jax import escalation as escalation_lib
from dsnet_jax import inference
from dsnet_jax.data import input_pipeline
from dsnet_jax.layers.norm import statistics_widths
from dsnet_jax.models import get_model
from dsnet_jax.models.gated import ROUTING_HEAD
from dsnet_jax.progress import say
from dsnet_jax.routes import RouteTable

# Config keys that change neither the model nor the numbers a run computes.
RUN_NEUTRAL_KEYS = ('stages', 'num_devices', 'eval_batch_size', 'log_every_steps',
                    'eval_every_steps', 'eval_every_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
                    'data.data_dir', 'data.debian_dir', 'data.in_memory', 'data.num_workers',
                    'data.num_threads', 'data.prefetch', 'escalation.')
# What may differ between an ungated checkpoint and the model it restores into (the routing
# head is then re-initialised).
ROUTING_SPACE_KEYS = ('model.routing_space',)
# The config keys that define the evaluated model and its evaluation data.
MODEL_KEYS = ('model_name', 'model.', 'data.name', 'data.image_size', 'data.num_classes',
              'data.channels', 'data.crop_pct', 'data.normalization')
# The compute dtype: the variables are float32 whichever it is, so a checkpoint restores (for
# eval, export, a later stage, init_checkpoint) under another one. Resuming a stage still
# compares it: it changes the numbers the run computes.
COMPUTE_KEYS = ('model.dtype',)
def abstract_variables(model, image_shape: Sequence[int], mesh=None) -> dict[str, Any]:
  """Shapes of the full-size {'params', 'batch_stats'}, replicated over `mesh` (else on one
  device): the restore target of every checkpoint."""
  shapes = model.abstract_variables(tuple(image_shape))
  return checkpointing.abstract_like(shapes, mesh and sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class Restored:
  """Variables read from a checkpoint, what its meta says of them, and the model they are for
  (the one given, with the gate's chosen routing space if that was 'auto')."""
  variables: dict[str, Any]
  meta: dict[str, Any]
  step: int
  directory: str
  model: Any = None

  @property
  def gated(self) -> bool:
    return is_gated(self.meta)

  @property
  def complete(self) -> bool:
    return bool(self.meta.get('complete', True))

  def describe(self) -> str:
    stage = self.meta.get('stage') or self.meta.get('source') or 'imported'
    total = self.meta.get('total_steps')
    state = '' if self.complete else f', UNFINISHED (step {self.step} of {total})'
    return f'{self.directory} step {self.step} ({stage}{state})'


def is_gated(meta: dict[str, Any]) -> bool:
  """Whether a checkpoint's routing head was trained (Stage II)."""
  return bool(meta.get('gated', meta.get('stage') == 'gate'))


def variables_key(meta: dict[str, Any]) -> str:
  """Where a checkpoint's variables sit in its state ('' = top level)."""
  return meta.get('variables_key', 'ema' if meta.get('stage') == 'supernet' else '')


def _numbers(value) -> bool:
  return isinstance(value, list) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)


def check_meta(directory: str, meta: Any) -> None:
  """Raises errors.CheckpointMismatchError naming the checkpoint when its meta is damaged: not
  a dict, a config that is not JSON, statistics widths or routing offsets of the wrong types
  (a NaN offset would send every image to one route, silently)."""
  def bad(what: str):
    return errors.CheckpointMismatchError(f'{directory}: its meta is damaged ({what}); restore '
                                          'the checkpoint from a copy, or train it again')
  if not isinstance(meta, dict):
    raise bad(f'{type(meta).__name__}, not a JSON object')
  if 'config' in meta:
    try:
      if not isinstance(json.loads(meta['config']) if isinstance(meta['config'], str)
                        else meta['config'], dict):
        raise ValueError('not an object')
    except (TypeError, ValueError) as e:
      raise bad(f'config is not a JSON object: {e}') from None
  widths = meta.get('statistics_widths', {})
  if not isinstance(widths, dict) or not all(
      _numbers(w) and all(isinstance(x, int) for x in w) for w in widths.values()):
    raise bad(f'statistics_widths {str(widths)[:80]} is not {{layer: [widths]}}')
  if 'routing_offsets' in meta and not _numbers(meta['routing_offsets']):
    raise bad(f'routing_offsets {meta["routing_offsets"]} are not finite numbers')


def _check_statistics_widths(directory: str, saved: dict[str, list[int]],
                             model: dict[str, list[int]]) -> None:
  """A checkpoint's BatchNorm rows must be of the model's widths (the same shapes can hold
  another network's: rows of other widths). Layers only one of them has are left to the
  restore's array check, which names every key."""
  differ = [f'{k}: {saved[k]} saved, {model[k]} in the model'
            for k in sorted(set(saved) & set(model)) if saved[k] != model[k]]
  if differ:
    raise errors.CheckpointMismatchError(
        f'{directory} holds BatchNorm statistics of other widths than the model\'s (another '
        f'network): {"; ".join(differ[:4])}{" ..." if len(differ) > 4 else ""}')


def restore_variables(directory: str | os.PathLike, model, image_shape: Sequence[int],
                      mesh=None, config=None, allow_changes: Iterable[str] = (),
                      log=say) -> Restored:
  """The variables a checkpoint directory holds, read as its meta says.

  {'params', 'batch_stats'}, plus {'routing': {'offsets': (R,)}} when the meta holds a budget
  calibration's `routing_offsets`. An ungated checkpoint (Stage I, recalibration) written
  with another routing space restores with the model's routing head re-initialised from
  `config.seed` (the routing space is chosen after Stage I); a gated one must match, and
  for a model whose routing space is 'auto' it says which one the gate stage chose
  (`Restored.model` has it).
  Falls back to the previous step when the latest cannot be read (one line through `log`).
  Raises:
    FileNotFoundError: no checkpoint in `directory`.
    errors.CheckpointMismatchError: the stored arrays differ from the model's.
    errors.ConfigMismatchError: `config` differs from the saved one in MODEL_KEYS (except
      `allow_changes`, the compute dtype, and the routing space of an ungated checkpoint).
  """
  directory = os.fspath(directory)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f'no checkpoint directory {directory}')
  stored = {}  # The model the checkpoint was written for, when only its routing space differs.

  def target(meta):
    check_meta(directory, meta)
    saved_name = meta.get('model_name')  # Every checkpoint's since the first importer.
    if config is not None and saved_name and saved_name != config.model_name:
      raise errors.CheckpointMismatchError(
          f'{directory} holds a {saved_name} checkpoint, the config is for {config.model_name}')
    gated = is_gated(meta)
    if config is not None and 'config' in meta:
      check_config(meta, config, MODEL_KEYS, allow_changes, f'checkpoint {directory}',
                   ignore=(*COMPUTE_KEYS, *(() if gated else ROUTING_SPACE_KEYS)))
    saved_space = _saved_routing_space(meta, model)
    if gated and 'routing_space' in meta:
      saved_space = tuple(str(r) for r in meta['routing_space'])
    if gated and model.routes.auto and 'routing_space' in meta:
      stored['model'] = model.clone(routing_space=tuple(meta['routing_space']))
    elif gated and saved_space is not None and saved_space != _routing_space(model):
      raise errors.CheckpointMismatchError(
          f'{directory} holds a gate trained for routing space {list(saved_space)}; its '
          f'routing logits mean nothing for {list(_routing_space(model))}. Use that routing '
          'space (or \'auto\'), or train a new gate (move this gate checkpoint aside).')
    elif gated or saved_space is None or saved_space == _routing_space(model):
      stored['model'] = model
    else:
      stored['model'] = model.clone(routing_space=saved_space)
    if 'statistics_widths' in meta:
      _check_statistics_widths(directory, meta['statistics_widths'],
                               statistics_widths(stored['model'], image_shape))
    variables = abstract_variables(stored['model'], image_shape, mesh)
    key = variables_key(meta)
    return {key: variables} if key else variables

  with checkpointing.Checkpointer(directory, keep=None, create=False) as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    state, meta, step = ckpt.restore(target, partial=True, fallback=True, log=log)
  key = variables_key(meta)
  variables = state[key] if key else state
  if not is_gated(meta) and stored['model'] is not model:
    variables = replace_routing_head(variables, model, image_shape, mesh,
                                     config.seed if config is not None else 0)
    log(f'{directory}: routing space {list(_routing_space(stored["model"]))} -> '
        f'{list(_routing_space(model))}; routing head re-initialised')
    stored['model'] = model
  if 'routing_offsets' in meta:
    offsets = meta['routing_offsets']
    if len(offsets) != len(stored['model'].routes.routing_space):
      raise errors.CheckpointMismatchError(
          f'{directory}: meta routing_offsets {offsets} has {len(offsets)} entries, the routing '
          f'space {list(_routing_space(stored["model"]))} {len(_routing_space(stored["model"]))}')
    variables = budget_lib.with_offsets(variables, offsets, mesh)
  return Restored(variables, meta, step, directory, stored['model'])


@dataclasses.dataclass
class Loaded:
  """What `load` returns: a trained model ready to apply."""
  model: Any
  variables: dict[str, Any]
  config: Any  # ml_collections.ConfigDict
  image_shape: tuple[int, int, int]
  restored: Restored
  # The escalation router calibrated for this checkpoint (tools/escalate), if any.
  escalation: escalation_lib.Escalation | None = None

  @property
  def routes(self):
    """The model's RouteTable (routes, routing space)."""
    return self.model.routes

  def predictor(self, router: str = '', **kwargs) -> inference.RoutedPredictor:
    """A RoutedPredictor for this checkpoint, routed by what it has calibrated or trained:
    `router` 'escalation' (its saved escalation rule), 'gate' (its trained gate), or '' (the
    escalation if there is one, else the gate). `kwargs` go to RoutedPredictor.

    Raises:
      errors.ConfigError: the router asked for (or, with '', either) is not there: a gate
        never trained (a checkpoint before the gate stage) is refused, never used.
    """
    where = self.restored.directory
    if router not in ('', 'escalation', 'gate'):
      raise errors.ConfigError(f"router {router!r}: use 'escalation', 'gate' or '' (either)")
    if 'escalation' in kwargs or 'gate_trained' in kwargs:
      raise errors.ConfigError("predictor(): the checkpoint's own router is used; choose it with "
                               "router='escalation' or 'gate'")
    if not self.restored.complete:
      say(f'warning: {where} is unfinished (step {self.restored.step} of '
          f'{self.restored.meta.get("total_steps")}): its router is used as it is')
    if router == 'escalation' or (not router and self.escalation is not None):
      if self.escalation is None:
        raise errors.ConfigError(f'{where} has no calibrated escalation: run '
                                 'python -m dsnet_jax.tools.escalate on it first')
      return inference.RoutedPredictor(self.model, self.variables, self.image_shape,
                                       escalation=self.escalation,
                                       gate_trained=self.restored.gated, **kwargs)
    if not self.restored.gated:
      raise errors.ConfigError(
          f'{where} holds a {self.restored.meta.get("stage", "supernet")} checkpoint: its gate '
          'was never trained, and routing by it would be arbitrary. Calibrate an escalation '
          'router for it (python -m dsnet_jax.tools.escalate), or load a gate-stage checkpoint.')
    return inference.RoutedPredictor(self.model, self.variables, self.image_shape, **kwargs)


def load(workdir: str | os.PathLike = '', checkpoint: str | os.PathLike = '', config=None,
         allow_changes: Iterable[str] = (), mesh=None, log=say,
         with_escalation: bool = True) -> Loaded:
  """The model, variables and route table of a training workdir's latest stage (or of the
  stage folder `checkpoint`), in one call: the one restore path of `dsnet_jax.load`, eval.py,
  export and the latency tool.

      loaded = dsnet_jax.load('workdir/ds_mbnet_fmnist')
      logits = loaded.model.apply(loaded.variables, images, route=loaded.routes.largest)

  The config is the one saved with the checkpoint unless `config` is given (an imported
  checkpoint has none); the variables are replicated over `mesh` (else on one device); the
  escalation router saved for the checkpoint is read unless `with_escalation` is False (the
  escalate tool, which replaces it, does not read it).
  Raises as `restore_variables`, and ConfigError for a checkpoint without a saved config and
  no `config`.
  """
  directory = os.fspath(checkpoint) if checkpoint else RunDir(workdir).latest_stage_dir()
  config = saved_config(directory) if config is None else config
  model = get_model(config.model_name, **config.model)
  image_shape = input_pipeline.preprocessing(config_lib.data_spec(config.data)).image_shape
  restored = restore_variables(directory, model, image_shape, mesh, config, allow_changes, log)
  return Loaded(restored.model, restored.variables, config, image_shape, restored,
                read_escalation(directory, restored.step, restored.model, image_shape, log)
                if with_escalation else None)


def save_escalation(directory: str, rule: escalation_lib.Escalation, step: int, model,
                    image_shape: Sequence[int], **extra: Any) -> str:
  """Writes the escalation router calibrated for step `step` of the stage folder `directory`
  (`<directory>/escalation.json`, replaced atomically; process 0 writes), with the MAdds per
  image of each level on `model` (`level_madds`: a reader compares them with its model).
  Returns its path."""
  path = epath.Path(directory) / escalation_lib.ESCALATION_FILE
  costs = escalation_lib.level_costs(model, rule.chain, image_shape)
  if jax.process_index() == 0:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(rule.to_json(step=step, level_madds=costs.tolist(), **extra))
    tmp.replace(path)
  return os.fspath(path)


def read_escalation(directory: str, step: int, model, image_shape: Sequence[int], log=say
                    ) -> escalation_lib.Escalation | None:
  """The escalation router saved in the stage folder `directory`, if it was calibrated for
  `step` (one calibrated for another step is not used: a line through `log` says so).

  Raises:
    errors.ConfigError naming the file: it is not a rule for `model` (damaged, values out of
      range, a chain outside its routing space or out of order, or levels whose recorded MAdds
      are another network's).
  """
  path = epath.Path(directory) / escalation_lib.ESCALATION_FILE
  if not path.exists():
    return None
  text = path.read_text()
  fix = ('move it aside, or calibrate again: python -m dsnet_jax.tools.escalate '
         f'--checkpoint={directory} ...')
  try:
    saved = json.loads(text)
    if isinstance(saved.get('step'), bool) or not isinstance(saved.get('step'), int):
      raise ValueError(f'its step is {saved.get("step")!r}, not a step number')
    rule = escalation_lib.Escalation.from_json(text)
  except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors.
    raise errors.ConfigError(f'{path} is not an escalation rule ({type(e).__name__}: {e}); '
                             f'{fix}') from None
  try:
    escalation_lib.checked_chain(model, rule.chain, image_shape)
  except (errors.ConfigError, errors.UnknownRouteError) as e:
    raise errors.ConfigError(f'{path}: {e}; {fix}') from None
  costs = escalation_lib.level_costs(model, rule.chain, image_shape)
  recorded = saved.get('level_madds')
  if recorded is not None and (not isinstance(recorded, list) or len(recorded) != len(costs)
                               or not np.allclose(recorded, costs, rtol=1e-9)):
    raise errors.ConfigError(
        f'{path} was calibrated for levels of {recorded} MAdds per image; on this model '
        f'{rule.chain} cost {costs.tolist()}: a rule of another network. {fix}')
  if saved['step'] != step:
    log(f'{path} was calibrated for step {saved["step"]}, not {step}: not used (calibrate again '
        'with python -m dsnet_jax.tools.escalate)')
    return None
  return rule


def saved_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a stage folder's latest checkpoint was written with, every key it predates
  at its default (so it validates as the config it was).

  Raises:
    FileNotFoundError: no checkpoint in `directory`; ValueError: it saved no config.
  """
  with checkpointing.Checkpointer(os.fspath(directory), keep=None, create=False) as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    meta = ckpt.restore_meta()
  check_meta(os.fspath(directory), meta)
  if 'config' not in meta:
    raise errors.ConfigError(f'{directory} saved no config (an imported checkpoint?): '
                                 'give its config')
  saved = json.loads(meta['config']) if isinstance(meta['config'], str) else meta['config']
  return config_lib.from_json(json.dumps(config_lib.with_defaults(saved)))


def _routing_space(model) -> tuple[str, ...]:
  return tuple(r.name for r in model.routes.routing_space)


def _saved_routing_space(meta: dict[str, Any], model) -> tuple[str, ...] | None:
  """The routing space (route names) of the model a checkpoint's config built; None when the
  checkpoint has no config (imported)."""
  if 'config' not in meta:
    return None
  saved = json.loads(meta['config']) if isinstance(meta['config'], str) else meta['config']
  space = saved.get('model', {}).get('routing_space')
  if space is None:
    space = type(model).__dataclass_fields__['routing_space'].default
  return _routing_space(model.clone(routing_space=RouteTable.spec(space)))


def replace_routing_head(variables, model, image_shape, mesh, seed: int):
  """`variables` with the routing head's parameters replaced by `model`'s fresh ones from
  `seed` (e.g. for another routing space; everything else must match).

  Raises:
    errors.CheckpointMismatchError: other parameters differ in name.
  """
  init = jax.jit(functools.partial(model.init_variables, image_shape=tuple(image_shape)),
                 out_shardings=mesh and sharding.replicated(mesh))
  fresh = traverse_util.flatten_dict(init(jax.random.key(seed))['params'], sep='/')
  params = traverse_util.flatten_dict(variables['params'], sep='/')
  params = {k: fresh[k] if re.fullmatch(ROUTING_HEAD, k) else v for k, v in params.items()}
  if params.keys() != fresh.keys():
    raise errors.CheckpointMismatchError(
        f'parameters {sorted(params.keys() ^ fresh.keys())} differ between the checkpoint and '
        'the model beyond the routing head')
  return {**variables, 'params': traverse_util.unflatten_dict(params, sep='/')}


# --- config comparison ----------------------------------------------------------------------

def config_differences(saved: dict[str, Any], current, keys: Sequence[str] | None = None,
                       ignore: Iterable[str] = ()) -> list[str]:
  """'key: saved -> current' for each differing key (dotted paths).

  `keys` limits the comparison to those keys and key prefixes ending in '.'; `ignore` drops
  keys and prefixes (e.g. 'gate.').
  """
  try:
    saved = json.loads(saved if isinstance(saved, str) else json.dumps(saved))
  except json.JSONDecodeError as e:
    raise errors.ConfigMismatchError(
        f'the saved config is not JSON ({e}); cannot compare') from None
  current = json.loads(current.to_json() if hasattr(current, 'to_json') else json.dumps(current))
  old, new = (config_lib.flat_items(config_lib.with_defaults(tree)) for tree in (saved, current))

  def matches(key, patterns):
    return any(key == p or (p.endswith('.') and key.startswith(p)) for p in patterns)

  ignore = tuple(ignore)
  lines = []
  for key in sorted(old.keys() | new.keys()):
    if (keys is not None and not matches(key, keys)) or matches(key, ignore):
      continue
    if old.get(key, '<unset>') != new.get(key, '<unset>'):
      lines.append(f'{key}: {old.get(key, "<unset>")!r} -> {new.get(key, "<unset>")!r}')
  return lines


def check_config(meta: dict[str, Any], config, keys: Sequence[str] | None,
                 allow_changes: Iterable[str], what: str, ignore: Iterable[str] = ()) -> None:
  """Raises ConfigMismatchError listing how `config` differs from `meta['config']`."""
  allow = tuple(allow_changes)
  differences = config_differences(meta['config'], config, keys, (*ignore, *allow))
  if differences:
    raise errors.ConfigMismatchError(
        f'{what} was written with a different config ({len(differences)} differences):\n  '
        + '\n  '.join(differences) +
        '\nUse the config it was written with, a new workdir, or allow the keys that may '
        'differ (train.py/eval.py --allow_config_change=KEY,...).')


# --- the workdir ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StageStatus:
  """What a stage's checkpoint folder holds now (read from the latest step's meta)."""
  stage: str
  step: int | None
  meta: dict[str, Any]

  @property
  def exists(self) -> bool:
    return self.step is not None


def _process_0s(value: int) -> int:
  """Process 0's `value` on every process (an int or bool)."""
  if jax.process_count() == 1:
    return value
  return type(value)(multihost_utils.broadcast_one_to_all(np.asarray(value)))


class RunDir:
  """A training workdir, local or remote (gs://, through etils.epath, as big_vision's).
  Reading never creates anything; `lock()` and checkpointers for saving do."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = paths.absolute(workdir)

  @property
  def metrics_path(self) -> str:
    return os.fspath(epath.Path(self.workdir) / 'metrics.jsonl')

  def stage_dir(self, stage: str) -> str:
    return os.fspath(epath.Path(self.workdir) / 'checkpoints' / stage)

  def checkpointer(self, stage: str, keep: int | None) -> checkpointing.Checkpointer:
    """The stage's checkpointer for saving (creates the folder)."""
    return checkpointing.Checkpointer(self.stage_dir(stage), keep=keep)

  def status(self, stage: str) -> StageStatus:
    """What the stage's folder holds, as process 0 sees it (every process then takes the same
    path, and makes the same orbax calls, whatever the file system showed it a moment later)."""
    directory = self.stage_dir(stage)
    if not _process_0s(epath.Path(directory).is_dir()):
      return StageStatus(stage, None, {})
    with checkpointing.Checkpointer(directory, keep=None, create=False) as ckpt:
      step = _process_0s(-1 if (s := ckpt.latest_step()) is None else s)
      step = None if step < 0 else step
      try:
        meta = ckpt.restore_meta(step) if step is not None else {}
      except Exception:  # pylint: disable=broad-except  # Unreadable: the restore falls back.
        meta = {}
      return StageStatus(stage, step, meta)

  def latest_stage_dir(self) -> str:
    """The checkpoint folder of the last stage (in training order) that saved a step."""
    if not epath.Path(self.workdir).is_dir():
      raise FileNotFoundError(f'no workdir {self.workdir}')
    for stage in reversed(config_lib.STAGES):
      if self.status(stage).exists:
        return self.stage_dir(stage)
    raise FileNotFoundError(f'no checkpoint under {epath.Path(self.workdir) / "checkpoints"}; '
                            'train first (train.py) or pass --checkpoint')

  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Holds `workdir/.lock` (an flock, released even on kill -9) while training; process 0
    holds it for a multi-process run. A remote workdir (gs://) has no file locks: nothing is
    held there (as in big_vision, one run per workdir is the user's to keep).

    Raises:
      errors.LockedError: another process holds it (its PID is named).
    """
    if jax.process_index() != 0 or paths.is_remote(self.workdir):
      epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
      yield
      return
    os.makedirs(self.workdir, exist_ok=True)
    busy = lambda pid: (f'{self.workdir} is in use by another training process (PID {pid}); '
                        'one run per workdir')
    with paths.exclusive_lock(os.path.join(self.workdir, '.lock'), busy):
      yield

  def truncate_metrics(self, stage: str, after_step: int) -> None:
    """Drops `stage`'s records past `after_step` (a resumed stage logs those steps again)."""
    path = epath.Path(self.metrics_path)
    if jax.process_index() != 0 or not path.exists():
      return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not _record_after(line, stage, after_step)]
    if len(kept) != len(lines):
      tmp = path.with_name(path.name + '.tmp')
      tmp.write_text(''.join(kept))
      tmp.replace(path)


def _record_after(line: str, stage: str, step: int) -> bool:
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False
  return record.get('stage') == stage and record.get('step', 0) > step
