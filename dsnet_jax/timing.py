"""Wall-clock timing of compiled calls: the one timing implementation of the project.

Calls are timed warm (after `warmup` untimed calls each) and interleaved round-robin (one call
of each in turn, `rounds` times), so the slow phases of a shared machine hit every call alike.
Each call is waited for (`jax.block_until_ready`), so a time is a call's latency.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

import jax
import numpy as np


def time_calls(calls: Mapping[str, Callable[[], object]], rounds: int = 5,
               warmup: int = 1) -> dict[str, np.ndarray]:
  """Seconds of each call in each round: {name: (rounds,) float64}.

  Raises:
    ValueError: rounds < 1 or warmup < 0.
  """
  if rounds < 1 or warmup < 0:
    raise ValueError(f'need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}')
  for call in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(call())
  seconds = {name: np.zeros(rounds) for name in calls}
  for i in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      seconds[name][i] = time.perf_counter() - start
  return seconds


def summary_ms(seconds: np.ndarray, images: int = 1) -> dict[str, float]:
  """{'median', 'p90'} of per-image milliseconds, from per-call seconds of `images` images."""
  per_image = np.asarray(seconds) * 1e3 / images
  return {'median': float(np.median(per_image)), 'p90': float(np.percentile(per_image, 90))}
