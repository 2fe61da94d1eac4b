"""Input data: tfds sources read without TensorFlow, NumPy preprocessing, grain loaders.

Start at `input_pipeline.make(config.data, split, batch_size=..., train=...)`.
"""
