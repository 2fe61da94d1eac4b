"""dsnet_jax: DS-Net / DS-Net++ dynamic weight slicing in JAX/Flax.

    import dsnet_jax
    loaded = dsnet_jax.load('workdir/ds_mbnet_fmnist')  # model, variables, routes, config
"""


def __getattr__(name):
  if name == 'load':  # Imported on first use: `import dsnet_jax` stays light.
    from dsnet_jax.rundir import load  # pylint: disable=import-outside-toplevel
    return load
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
