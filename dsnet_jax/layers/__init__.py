"""Sliceable Flax layers: parameters at full size, sliced at call time with Python ints."""
from dsnet_jax.layers.attention_heads import DoubleHeadedGate, SqueezeExcite, global_avg_pool
from dsnet_jax.layers.linear import Conv, Dense, conv_kernel_init, linear_kernel_init
from dsnet_jax.layers.norm import SlicedBatchNorm
from dsnet_jax.layers.width import MaskedWidth, Width, channels
