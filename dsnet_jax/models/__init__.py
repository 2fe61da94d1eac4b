"""Model registry: each module under models/ exports a `Model` factory (a Flax module class)."""
import importlib

import jax.numpy as jnp

# Compute dtypes a config may name (`config.model.dtype`); parameters, optimizer state and
# BatchNorm statistics stay float32 whichever is chosen. float16 is not offered: training
# would need loss scaling.
COMPUTE_DTYPES = ('float32', 'bfloat16')


def compute_dtype(name: str):
  """'float32' | 'bfloat16' -> the dtype (scalar type) a model's `dtype` field takes."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'compute dtype {name!r}; valid: {", ".join(COMPUTE_DTYPES)}')
  return jnp.dtype(name).type


def get_model(name: str, **kwargs):
  """Builds `dsnet_jax.models.<name>.Model(**kwargs)`; a `dtype` given by name (as configs
  give it: 'float32', 'bfloat16') becomes that dtype."""
  try:
    module = importlib.import_module(f'dsnet_jax.models.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'dsnet_jax.models.{name}':
      raise
    raise ValueError(
        f'unknown model {name!r}; available: {", ".join(available_models())}') from None
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = compute_dtype(kwargs['dtype'])
  return module.Model(**kwargs)


def available_models() -> list[str]:
  """Names `get_model` can build: the modules under models/ that export a `Model`."""
  import pkgutil
  names = [m.name for m in pkgutil.iter_modules(__path__)]
  return sorted(n for n in names
                if hasattr(importlib.import_module(f'dsnet_jax.models.{n}'), 'Model'))
