"""Stand-in variables for speed runs and tests: random values at the model's full shapes."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, image_shape: Sequence[int], seed: int = 0):
  """Random variables of the model's full shapes, without compiling its init.

  Speed does not depend on the values. Kernels are He-normal on their fan-in (all axes but
  the last), scales U(0.5, 1.5), other 1-D parameters N(0, 0.1); BatchNorm running means
  N(0, 0.1) and variances U(0.5, 1.5). Such statistics do not match the activations, so deep
  nets give nearly input-independent outputs: use `bn_calibration.calibrate_to_batch` where
  values matter.
  """
  shapes = model.abstract_variables(image_shape)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'var':
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == 'scale':
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif leaf.ndim <= 1 or name == 'mean':
      value = rng.normal(0.0, 0.1, leaf.shape)
    else:
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
