"""Device mesh and shardings: data parallel over the mesh axis `data`.

Parameters, optimizer state and batch statistics are replicated: their sliced dimensions
must never be sharded. Batches are split along `data`. The mesh is built with explicit Auto
axis types, so adding a model axis later is a config change, not a rewrite.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis `data`."""
  devices = jax.devices()
  num_devices = num_devices or len(devices)
  if num_devices > len(devices):
    raise ValueError(f'asked for {num_devices} devices, {len(devices)} available')
  return Mesh(np.asarray(devices[:num_devices]), (DATA,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of a batch into global arrays split along `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def gather(*arrays: jax.Array) -> list[np.ndarray]:
  """Host copies of global arrays, every process's shards included (each process gets all)."""
  return [np.asarray(a) for a in multihost_utils.process_allgather(arrays, tiled=True)]


def replicate(tree, mesh: Mesh):
  """A replicated copy of `tree` (never an alias: training steps donate their state)."""
  return jax.device_put(tree, replicated(mesh), may_alias=False)
