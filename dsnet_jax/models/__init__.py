"""Model registry: each module under models/ exports a `Model` factory (a Flax module class)."""
import importlib


def get_model(name: str, **kwargs):
  """Builds `dsnet_jax.models.<name>.Model(**kwargs)`."""
  try:
    module = importlib.import_module(f'dsnet_jax.models.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'dsnet_jax.models.{name}':
      raise
    raise ValueError(
        f'unknown model {name!r}; available: {", ".join(available_models())}') from None
  return module.Model(**kwargs)


def available_models() -> list[str]:
  """Names `get_model` can build: the modules under models/ that export a `Model`."""
  import pkgutil
  names = [m.name for m in pkgutil.iter_modules(__path__)]
  return sorted(n for n in names
                if hasattr(importlib.import_module(f'dsnet_jax.models.{n}'), 'Model'))
