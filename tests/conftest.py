"""Test setup, before JAX initialises its backends: 8 fake CPU devices for mesh tests, and a
persistent compilation cache shared by the suite and the subprocesses it starts (the same
programs compile in many tests; a cache hit changes no computed value)."""
import contextlib
import io
import os
import pathlib
from typing import Any, NamedTuple

import jax
import pytest

from checks import XLA_TEST_FLAGS

CACHE = pathlib.Path(__file__).parents[1] / '.pytest_cache' / 'd' / 'jax_compilation_cache'
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(CACHE))
jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
# Tests check values, not speed: most XLA optimisations cost compile time and buy nothing here
# (as in the flax examples' tests); the subprocesses the tests start inherit this too.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')
jax.config.update('jax_disable_most_optimizations', True)
# XLA:CPU's older (non-fusion) emitters compile these small programs about 2x faster (a tiny
# route_grad: 3.2 s against 6.3 s); read when the backend starts, and by every subprocess.
if XLA_TEST_FLAGS not in os.environ.get('XLA_FLAGS', ''):  # pytest-xdist workers inherit it.
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()


class Trained(NamedTuple):
  workdir: pathlib.Path
  report: dict[str, Any]  # train_and_evaluate's.
  init: Any  # The variables Stage I started from.
  output: str  # What the run printed.


@pytest.fixture(scope='session')
def trained(tmp_path_factory) -> Trained:
  """A finished tiny run (every stage, one device), trained once for the whole suite."""
  from checks import tiny_config
  from dsnet_jax import train_lib
  workdir = tmp_path_factory.mktemp('trained')
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    report = train_lib.train_and_evaluate(tiny_config(num_devices=1), str(workdir))
  init, _ = train_lib.init_variables(train_lib.make_run(tiny_config(num_devices=1), str(workdir)))
  return Trained(workdir, report, jax.device_get(init), printed.getvalue())
