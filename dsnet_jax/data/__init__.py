"""Input data: tfds sources read without TensorFlow, NumPy preprocessing, grain loaders.

Start at `input_pipeline.make(spec, split, batch_size=..., train=...)` with a `DataSpec`.
"""
