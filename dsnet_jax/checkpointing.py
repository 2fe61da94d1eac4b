"""Checkpoints: the one place that knows orbax.

Each step holds two items: `state`, a pytree of arrays (params, batch_stats, opt_state, ema,
step), and `meta`, a JSON dict (config, stage, seed). Restores go into a target tree whose
`jax.ShapeDtypeStruct` leaves carry shardings, so arrays land where the jitted step expects
them; the target is checked against the stored tree first, so a wrong model config fails
with one readable error instead of deep inside orbax.

Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/`
when complete, and step listing ignores tmp directories, so a save killed midway leaves the
previous step as the latest (tests/test_checkpointing.py kills one to check).

`state` uses orbax's PyTree handler rather than the Standard one: same files on disk, but
orbax 0.12 restores a subset (eval's params and batch_stats) only through
`PyTreeRestore(partial_restore=True)`, and a manager binds one handler type per item.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any


class CheckpointMismatchError(ValueError):
  """The stored state does not match the restore target (keys, shapes or dtypes)."""


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

  Step lists are read when the Checkpointer opens and updated by its own saves.
  """

  def __init__(self, directory: str | os.PathLike, keep: int | None = 3):
    path = epath.Path(directory)
    self.directory = path if path.is_absolute() else path.absolute()  # tensorstore needs it.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves `state` and JSON-able `meta` at `step`; returns once both are on disk.

    As in orbax, a step at or below the latest is skipped (returns False) unless `force`;
    an existing step is never overwritten (`force` then raises StepAlreadyExistsError).
    """
    saved = self._manager.save(int(step), force=force, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(dict(meta or {}))))
    self._manager.wait_until_finished()
    return saved

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, target: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Restores (state, meta) at `step` (default: latest) into `target`'s structure.

    `target` holds ShapeDtypeStructs (their shardings are used) or concrete arrays.
    """
    step = self._resolve(step)
    target = self._checked_target(step, target, partial=False)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=self._restore_args(target, partial=False), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def restore_items(self, target: PyTree, step: int | None = None) -> PyTree:
    """Restores only the subtree in `target`, e.g. {'params': ..., 'batch_stats': ...}."""
    step = self._resolve(step)
    target = self._checked_target(step, target, partial=True)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=self._restore_args(target, partial=True)))
    return restored['state']

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._resolve(step)
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

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
    """`target` as an abstract tree, after checking it against the stored tree."""
    items = self._manager.item_metadata(step)
    if items.get('state') is None:
      raise CheckpointMismatchError(
          f'checkpoint {self.directory / str(step)} has no `state` item (it holds '
          f'{sorted(items.keys())}); it was not written by Checkpointer.save')
    target = abstract_like(target)
    wanted = ocp.tree.to_flat_dict(target, sep='/')
    stored = ocp.tree.to_flat_dict(items['state'].tree, sep='/')
    problems = []
    for key in sorted(wanted.keys() | (set() if partial else stored.keys())):
      if key not in stored:
        problems.append(f'{key}: expected {_describe(wanted[key])}, missing from the checkpoint')
      elif key not in wanted:
        problems.append(f'{key}: found {_describe(stored[key])}, not in the model')
      elif _describe(wanted[key]) != _describe(stored[key]):
        problems.append(f'{key}: expected {_describe(wanted[key])}, '
                        f'found {_describe(stored[key])}')
    if problems:
      raise CheckpointMismatchError(
          f'checkpoint {self.directory / str(step)} does not match the model:\n  '
          + '\n  '.join(problems))
    return target

  @staticmethod
  def _restore_args(target: PyTree, partial: bool) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial)
