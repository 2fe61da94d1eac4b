"""What the command lines share: a `UserError` ends in one `error:` line, not a traceback; a
failed checkpoint save ends the process at once; config printing and multi-host start."""
from __future__ import annotations

import functools
import os
import sys

from dsnet_jax import config_lib, errors

# Errors whose message says what to fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (errors.UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
               FloatingPointError)


def main_errors(main, *more_user_errors: type[Exception]):
  """Wraps an absl or argparse `main`: USER_ERRORS (and `more_user_errors`) print
  `error: ...` and exit 1.

  A CheckpointSaveError exits through `os._exit(1)`, its message the last line: orbax's
  background threads, left waiting by the failed save, would otherwise hold the exit for
  minutes.
  """
  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except errors.CheckpointSaveError as e:
      sys.stdout.flush()
      print(f'error: {e}', file=sys.stderr, flush=True)
      os._exit(1)
    except (*USER_ERRORS, *more_user_errors) as e:
      sys.stdout.flush()
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(1)
  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's `flags_parser`), with an override of a key the config
  lacks (`--config.model.bogus=1`) as one error line instead of ml_collections' traceback."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file's get_config raising one of our errors: ml_collections re-raises it with
    # the traceback in the message; its last line is the message meant for the user.
    last = str(e).strip().splitlines()[-1] if str(e).strip() else ''
    if 'Error whilst parsing config file' in str(e) and last.startswith('dsnet_jax.errors.'):
      print(f'error: {last.split(": ", 1)[-1]}', file=sys.stderr)
    else:
      print(f'FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on '
            'flags.', file=sys.stderr)
  except (AttributeError, KeyError) as e:
    key = next((a.split('=')[0] for a in argv if a.startswith('--config.')
                and str(e).strip('"\'').split("'")[0] in a), 'a --config. override')
    print(f'error: {key}: no such config key ({e}); --print_config lists them',
          file=sys.stderr)
  sys.exit(1)


def quiet_library_logs() -> None:
  """Libraries' INFO lines (orbax's on every restore) off unless `--verbosity` was given.
  Call in an absl `main`."""
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def start_distributed(flag_values) -> None:
  """With --distributed: `jax.distributed.initialize` (--coordinator_address, --num_processes,
  --process_id, checked first; None: found on TPU VMs and SLURM); then progress lines from
  process 0 only (the others' stdout goes nowhere; errors still show, on stderr).

  Raises:
    errors.ConfigError: those flags without --distributed, or a process id out of range.
  """
  given = [f'--{name}' for name in ('coordinator_address', 'num_processes', 'process_id')
           if flag_values[name].present]
  if given and not flag_values.distributed:
    raise errors.ConfigError(f'{", ".join(given)} need --distributed')
  n, i = flag_values.num_processes, flag_values.process_id
  if n is not None and (n < 1 or (i is not None and not 0 <= i < n)):
    raise errors.ConfigError(f'--process_id={i} --num_processes={n}: need 0 <= process_id '
                                 '< num_processes')
  if not flag_values.distributed:
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(flag_values.coordinator_address, n, i)
  if jax.process_index() != 0:
    sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with


def start(flag_values, resolve=None, needs=('workdir',)) -> bool:
  """What train.py and eval.py do first: library INFO logs off (see quiet_library_logs);
  with --print_config, print the config (overrides applied, then `resolve`d if given and the
  data is there) and return False (exit); else require one of the flags `needs` and return
  True."""
  quiet_library_logs()
  if flag_values.print_config:
    config = flag_values.config
    if resolve is not None:
      try:
        config = resolve(config)
      except FileNotFoundError as e:  # The learning rate still scales; epochs stay epochs.
        config = config_lib.resolve_durations(config, None)
        print(f'# epochs not resolved into steps (needs the data): {e}', file=sys.stderr)
    print(config)
    return False
  if not any(flag_values[name].value for name in needs):
    given = ' or '.join(f'--{name}' for name in needs)
    raise errors.ConfigError(f'{given} is required (only --print_config goes without)')
  return True
