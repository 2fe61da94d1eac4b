"""Progress lines on stdout and metrics appended to a JSON-lines file (the workdir's
metrics.jsonl)."""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np


class ProgressLogger:
  """Logs `step, loss, images/s, ETA` for one stage; every record also goes to metrics.jsonl."""

  def __init__(self, path: str, stage: str, total_steps: int, batch_size: int):
    self.path = path
    self.stage, self.total_steps, self.batch_size = stage, total_steps, batch_size
    self._last_time, self._last_step = None, None

  def start(self, step: int):
    self._last_time, self._last_step = time.perf_counter(), step

  def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Fetches `metrics` (one host sync), prints the progress line and appends the record."""
    metrics = {k: _to_python(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    steps = step - self._last_step
    rate = steps * self.batch_size / max(now - self._last_time, 1e-9) if steps else 0.0
    eta = (self.total_steps - step) * self.batch_size / rate if rate else float('nan')
    self._last_time, self._last_step = now, step
    loss = metrics.get('loss', float('nan'))
    if not np.isfinite(loss):
      raise FloatingPointError(f'{self.stage}: loss is {loss} at step {step}; stopping')
    print(f'[{self.stage}] step {step}/{self.total_steps}  loss {loss:.4f}  '
          f'{rate:.0f} img/s  ETA {_duration(eta)}  ' +
          '  '.join(f'{k} {_fmt(v)}' for k, v in metrics.items() if k != 'loss'), flush=True)
    return self.write(step, metrics)

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    record = {'stage': self.stage, 'step': step, **metrics}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    return record


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
