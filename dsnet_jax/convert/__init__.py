"""Importers of released weights (PyTorch state dicts) into our Flax variables."""
