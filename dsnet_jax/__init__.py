"""dsnet_jax: DS-Net / DS-Net++ dynamic weight slicing in JAX/Flax."""
