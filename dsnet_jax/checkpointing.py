"""Checkpoints: the one place that knows orbax.

Each step holds `state` (a pytree of arrays) and `meta` (a JSON dict). Restores are exact and
go into a sharded target checked against the stored tree first; saves are atomic; a NaN/Inf
state is never written; an unreadable step falls back to the one before (docs/design.md).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dsnet_jax.errors import (CheckpointMismatchError, CheckpointSaveError, NonFiniteStateError,
                              UnreadableCheckpointError)
from dsnet_jax.progress import say

PyTree = Any


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding | PyTree | None = None) -> PyTree:
  """A `jax.ShapeDtypeStruct` tree of `tree` (arrays or ShapeDtypeStructs).

  Args:
    tree: the target structure.
    sharding: one sharding for every leaf, a tree of shardings matching `tree`, or None to
      keep each leaf's own sharding (leaves without one go to the default device).
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x, s=None):
    s = s or getattr(x, 'sharding', None) or default
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: leaf(x, sharding), tree)
  return jax.tree.map(leaf, tree, sharding)


def _describe(x) -> str:
  return f'{tuple(x.shape)} {np.dtype(x.dtype).name}'


class Checkpointer:
  """Saves and restores (state, meta) steps under `directory`, keeping the latest `keep`.

  Step lists are read when the Checkpointer opens and updated by its own saves. With
  `create=False` a missing directory is not created (it simply has no steps).
  """

  def __init__(self, directory: str | os.PathLike, keep: int | None = 3, create: bool = True):
    path = epath.Path(directory)
    self.directory = path if path.is_absolute() else path.absolute()  # tensorstore needs it.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves `state` and JSON-able `meta` at `step`; returns once both are on disk.

    As in orbax, a step at or below the latest is skipped (returns False) unless `force`;
    an existing step is never overwritten (`force` then raises StepAlreadyExistsError).
    Raises:
      NonFiniteStateError: a floating leaf holds NaN or Inf (nothing is written).
      CheckpointSaveError: the directory cannot be written.
    """
    bad = non_finite_leaves(state)
    if bad:
      latest = self.latest_step()
      kept = 'no step was saved' if latest is None else f'the last saved step is {latest}'
      raise NonFiniteStateError(
          f'not saving step {step} to {self.directory}: non-finite values in '
          f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}; {kept}')
    try:
      _check_writable(self.directory)
      saved = self._manager.save(int(step), force=force, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(dict(meta or {}))))
      self._manager.wait_until_finished()
    except (OSError, ValueError) as e:
      if isinstance(e, ValueError) and 'already exists' in str(e):
        raise
      raise CheckpointSaveError(
          f'saving step {step} to {self.directory} failed: {type(e).__name__}: {e}') from e
    return saved

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, target: PyTree, step: int | None = None, *, partial: bool = False,
              fallback: bool = False, log=say) -> tuple[PyTree, dict[str, Any], int]:
    """Restores (state, meta, step) at `step` (default: latest) into `target`'s structure.

    Args:
      target: ShapeDtypeStructs (their shardings are used) or concrete arrays; or a function
        of the step's meta returning them (errors it raises propagate).
      step: the step to read; None reads the latest.
      partial: restore only `target`'s top-level items (e.g. {'params', 'batch_stats'}) of
        a larger state; within them the stored tree must match exactly.
      fallback: when a step cannot be read (a truncated or missing file), say so in one line
        through `log` and try the step before it, down to the oldest.
    Raises:
      CheckpointMismatchError: the stored tree differs from `target` (never falls back).
      UnreadableCheckpointError: no step could be read.
    """
    steps = [self._resolve(step)]
    if fallback:
      steps += [s for s in reversed(self.all_steps()) if s < steps[0]]
    errors = []

    def unreadable(s, error):
      errors.append(f'step {s}: {_first_line(error)}')
      if not fallback:
        raise error
      earlier = [x for x in steps if x < s]
      log(f'checkpoint {self.directory / str(s)} is unreadable ({_first_line(error)}); '
          + (f'falling back to step {earlier[0]}' if earlier else 'no earlier step'))

    # Whatever orbax or tensorstore raise while reading a step's files means that step is
    # unreadable (their error types vary: ValueError, KeyError, bare Exception, OSError...);
    # a mismatch with the target and errors of `target` itself are not.
    for s in steps:
      try:
        meta = self.restore_meta(s)
      except Exception as e:  # pylint: disable=broad-except
        try:
          self._check_layout(s)  # A foreign layout is a mismatch, not damage.
        except CheckpointMismatchError:
          raise
        except Exception:  # pylint: disable=broad-except
          pass
        unreadable(s, e)
        continue
      wanted = target(meta) if callable(target) else target
      try:
        checked = self._checked_target(s, wanted, partial)
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=self._restore_args(checked, partial), meta=ocp.args.JsonRestore()))
        return restored['state'], meta, s
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        unreadable(s, e)
    raise UnreadableCheckpointError(
        f'no readable step in {self.directory}: ' + '; '.join(errors) +
        '. Move the unreadable step folders aside (or use a new workdir).')

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON meta of `step` (default: latest). Raises ValueError if it is not an object."""
    step = self._resolve(step)
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if not isinstance(meta, dict):
      raise ValueError(f'the meta of {self.directory / str(step)} is {type(meta).__name__}, '
                       'not a JSON object')
    return meta

  def set_aside(self, step: int) -> epath.Path:
    """Renames the folder of `step` to `<step>.unreadable` (kept, no longer a step)."""
    source = self.directory / str(step)
    target = self.directory / f'{step}.unreadable'
    n = 1
    while target.exists():
      target, n = self.directory / f'{step}.unreadable{n}', n + 1
    source.rename(target)
    self._manager.reload()
    return target

  def close(self):
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc):
    self.close()

  def _resolve(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    if step is None:
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; '
                              f'steps: {steps}')
    return step

  def _checked_target(self, step: int, target: PyTree, partial: bool) -> PyTree:
    """`target` as an abstract tree, after checking it against the stored tree.

    A partial target must match the stored tree exactly inside each of its top-level items.
    """
    items = self._check_layout(step)
    if items['state'] is None:
      raise FileNotFoundError(f'{self.directory / str(step)}/state has no readable metadata')
    target = abstract_like(target)
    wanted = ocp.tree.to_flat_dict(target, sep='/')
    stored = ocp.tree.to_flat_dict(items['state'].tree, sep='/')
    if partial:
      top = {key.split('/')[0] for key in wanted}
      stored = {k: v for k, v in stored.items() if k.split('/')[0] in top}
    problems = []
    for key in sorted(wanted.keys() | stored.keys()):
      if key not in stored:
        problems.append(f'{key}: expected {_describe(wanted[key])}, missing from the checkpoint')
      elif key not in wanted:
        problems.append(f'{key}: found {_describe(stored[key])}, not in the model')
      elif _describe(wanted[key]) != _describe(stored[key]):
        problems.append(f'{key}: expected {_describe(wanted[key])}, '
                        f'found {_describe(stored[key])}')
    if problems:
      raise CheckpointMismatchError(
          f'checkpoint {self.directory / str(step)} does not match the model '
          f'({len(problems)} differences):\n  ' + '\n  '.join(problems))
    return target

  def _check_layout(self, step: int):
    """The step's item metadata; CheckpointMismatchError if it has no `state` item at all."""
    items = self._manager.item_metadata(step)
    if 'state' not in items:
      raise CheckpointMismatchError(
          f'checkpoint {self.directory / str(step)} has no `state` item (it holds '
          f'{sorted(items.keys())}); it was not written by Checkpointer.save')
    return items

  @staticmethod
  def _restore_args(target: PyTree, partial: bool) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> list[jax.Array]:
  """Whether each leaf is all finite: one program per tree, not two eager ops per leaf."""
  return [jnp.isfinite(x).all() for x in leaves]


def non_finite_leaves(tree: PyTree) -> list[str]:
  """Paths ('a/b/c') of the floating leaves of `tree` that hold a NaN or Inf (one host sync)."""
  flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(getattr(x, 'dtype', np.float32), jnp.inexact)]
  if not flat:
    return []
  finite = jax.device_get(_all_finite([x for _, x in flat]))
  return ['/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
          for (path, _), ok in zip(flat, finite) if not ok]


def _check_writable(directory: epath.Path) -> None:
  """Raises the OS error now (in this thread) if `directory` cannot take a new step."""
  directory.mkdir(parents=True, exist_ok=True)
  probe = directory / f'.write-probe-{os.getpid()}'
  probe.write_text('')
  probe.unlink()


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]
