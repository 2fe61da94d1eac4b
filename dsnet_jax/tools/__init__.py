"""The command lines: `python -m dsnet_jax.tools.<name> --help` (train, eval, latency, export,
complexity, convert_ds_mbnet). Each parses flags, calls the library, and prints."""
