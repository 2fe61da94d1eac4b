"""Test setup, before JAX initialises its backends: 8 fake CPU devices for mesh tests, and a
persistent compilation cache shared by the suite and the subprocesses it starts (the same
programs compile in many tests; a cache hit changes no computed value)."""
import os
import pathlib

import jax

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
