"""Errors a user can fix, each saying how. The command lines (`dsnet_jax/tools/`) print any
`UserError` as one `error:` line; every other exception is a bug and keeps its traceback.
Each class keeps its builtin base, so `except ValueError` still catches a `ConfigError`."""


class UserError(Exception):
  """A problem with the user's input (config, flags, files, checkpoints), not with the code."""


class ConfigError(UserError, ValueError):
  """A config key, flag or value that cannot work."""


class BudgetError(ConfigError):
  """A budget the routing space cannot meet."""


class DataError(UserError, ValueError):
  """Data files that are not the data set they should be (damaged, or another copy than the
  one prepared), or a data directory that cannot be written."""


class ConfigMismatchError(UserError, ValueError):
  """The current config differs from the one a checkpoint was written with."""


class StaleStageError(UserError, RuntimeError):
  """A later stage's checkpoint was computed from an earlier stage that is to change."""


class LockedError(UserError, RuntimeError):
  """Another process holds an exclusive lock (a workdir's, while it trains)."""


class CheckpointMismatchError(UserError, ValueError):
  """The stored state does not match the restore target (keys, shapes or dtypes)."""


class NonFiniteStateError(UserError, FloatingPointError):
  """A state to save holds NaN or Inf; nothing was written."""


class CheckpointSaveError(UserError, OSError):
  """Writing a step failed (e.g. a read-only or missing directory); the OS error ends the
  message. orbax may leave background threads waiting after such a failure, so command-line
  entry points exit with `os._exit` on it (`dsnet_jax.tools.cli`)."""


class UnreadableCheckpointError(UserError, OSError):
  """No step of a checkpoint directory could be read."""


class UnknownRouteError(UserError, KeyError):
  """A route name that is not in the model's route table."""

  def __str__(self):
    return self.args[0]


class NotGatedError(UserError, TypeError):
  """The model has no gate: no routing space, or no `prefix`/`suffix` methods."""


class LatencyTableError(UserError, ValueError):
  """A latency.json that is not a table this library wrote, or one for another model."""


class ExportError(UserError, ValueError):
  """What was asked of an export cannot be done (a format, the flags)."""


class ExportDependencyError(UserError, ImportError):
  """ONNX export asked for without the `export` extra installed."""
