"""What library code tells the user: lines on stdout (`say`), metrics appended to the
workdir's metrics.jsonl and written as TensorBoard scalars (tensorboardX event files under
<workdir>/tensorboard); process 0 only."""
from __future__ import annotations

import json
import os
import time
import weakref
from typing import Any

from etils import epath
import jax
import numpy as np

TENSORBOARD_DIR = 'tensorboard'


def say(line: str) -> None:
  """A line for the user on stdout, from process 0 only: the one way library code prints (the
  command lines in dsnet_jax/tools print their own results)."""
  if jax.process_index() == 0:
    print(line, flush=True)


class ProgressLogger:
  """Logs `step, loss, images/s, ETA` for one stage; every record also goes to metrics.jsonl
  and to TensorBoard (tag '<stage>/<metric>').

  Images/s and the ETA count only steps after the first: `compiled(step)` marks where the
  first step (which compiles) ended. Only process 0 prints and writes files.
  """

  def __init__(self, path: str, stage: str, total_steps: int, batch_size: int):
    self.path = path
    self.stage, self.total_steps, self.batch_size = stage, total_steps, batch_size
    self._last_time, self._last_step = None, None
    self._first_step_seconds = None
    self._writes = jax.process_index() == 0
    self._tensorboard = None
    self._start_step = 0

  def start(self, step: int):
    self._last_time, self._last_step = time.perf_counter(), step
    self._start_step = step

  def compiled(self, step: int):
    """The first step (compilation included) finished at `step`: rates start from here."""
    now = time.perf_counter()
    self._first_step_seconds = now - self._last_time
    self._last_time, self._last_step = now, step

  def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Fetches `metrics` (one host sync), prints the progress line and appends the record."""
    metrics = {k: _to_python(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    steps = step - self._last_step
    loss = metrics.get('loss', float('nan'))
    if not np.isfinite(loss):
      raise FloatingPointError(f'{self.stage}: loss is {loss} at step {step}; stopping')
    if steps:
      rate = steps * self.batch_size / max(now - self._last_time, 1e-9)
      speed = f'{rate:.0f} img/s  ETA {_duration((self.total_steps - step) * self.batch_size / rate)}'
      self._last_time, self._last_step = now, step
    else:
      speed = f'first step {self._first_step_seconds or 0:.1f}s (compiling)'
    say(f'[{self.stage}] step {step}/{self.total_steps}  loss {loss:.4f}  {speed}  ' +
        '  '.join(f'{k} {_fmt(v)}' for k, v in metrics.items() if k != 'loss'))
    return self.write(step, metrics)

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    record = {'stage': self.stage, 'step': step, **metrics}
    if self._writes:
      with epath.Path(self.path).open('a') as f:
        f.write(json.dumps(record) + '\n')
      self._write_tensorboard(step, metrics)
    return record

  def _write_tensorboard(self, step: int, metrics: dict[str, Any]):
    if self._tensorboard is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # What a resumed (or restarted) stage logs again replaces what an earlier run logged
      # after its start step, as metrics.jsonl is truncated there: TensorBoard drops events
      # from `purge_step` on. The file name's suffix keeps two writers started in the same
      # second (tensorboardX names files by the second) from overwriting each other's file.
      self._tensorboard = SummaryWriter(
          os.fspath(epath.Path(self.path).parent / TENSORBOARD_DIR / self.stage),
          purge_step=self._start_step + 1, filename_suffix=f'.{time.time_ns()}')
      weakref.finalize(self, self._tensorboard.close)
    for name, value in _scalars(metrics):
      self._tensorboard.add_scalar(f'{self.stage}/{name}', value, step)
    self._tensorboard.flush()


def _scalars(metrics: dict[str, Any], prefix: str = ''):
  """(name, float) of every number in `metrics`, nested dicts as 'a/b'."""
  for key, value in metrics.items():
    if isinstance(value, dict):
      yield from _scalars(value, f'{prefix}{key}/')
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f'{prefix}{key}', float(value)


def _to_python(value):
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def _fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes}m{seconds:02d}s'
