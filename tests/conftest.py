"""Test setup: 8 fake CPU devices for mesh tests, set before JAX initialises its backends."""
import jax

jax.config.update('jax_num_cpu_devices', 8)
