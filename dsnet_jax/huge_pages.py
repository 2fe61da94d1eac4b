"""Transparent huge pages for XLA:CPU's buffers: the entry points relaunch themselves with
glibc's `glibc.malloc.hugetlb=1` tunable (why, and what it buys: docs/design.md).

    if __name__ == '__main__':
      huge_pages.relaunch()  # First: whatever ran before it runs again.

Opt out with `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`; a notebook sets
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` before Python starts.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Sequence

TUNABLE = 'glibc.malloc.hugetlb'
RELAUNCHED = 'DSNET_JAX_HUGE_PAGES_RELAUNCHED'  # Set in the relaunched process.
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
MIN_GLIBC = (2, 35)  # The first glibc with glibc.malloc.hugetlb.


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'); None if unknown
  (not Linux, or the file is unreadable)."""
  try:
    with open(path) as f:
      modes = f.read().split()
  except OSError:
    return None
  return next((m[1:-1] for m in modes if m.startswith('[')), None)


def relaunch_env(environ: Mapping[str, str], libc: tuple[str, str], mode: str | None
                 ) -> dict[str, str] | None:
  """The environment to relaunch with, or None where a relaunch changes nothing.

  Args:
    environ: the current environment.
    libc: `platform.libc_ver()`, e.g. ('glibc', '2.36').
    mode: `thp_mode()`.

  None when the C library is not glibc >= 2.35, the kernel's mode is not 'madvise' ('always'
  gives huge pages already, 'never' gives none), GLIBC_TUNABLES already names the tunable (the
  user's choice) or this is the relaunched process (glibc drops tunables from setuid or
  capability-holding processes: the variable alone could relaunch forever).
  """
  name, version = libc
  try:
    glibc = tuple(int(part) for part in version.split('.')[:2])
  except ValueError:
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if (name != 'glibc' or glibc < MIN_GLIBC or mode != 'madvise' or RELAUNCHED in environ
      or any(t.split('=')[0] == TUNABLE for t in tunables.split(':'))):
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(filter(None, (tunables, f'{TUNABLE}=1'))),
          RELAUNCHED: '1'}


def reruns_this_program(orig_argv: Sequence[str], argv: Sequence[str],
                        main_file: str | None) -> bool:
  """Whether executing `orig_argv` (the interpreter's command line) again runs this program:
  a script file, `-m module` or `-c code`, with `argv` (sys.argv) its arguments.

  False where the process's command is another program's: a script run by IPython's `%run`
  or `runpy.run_path` inside another script, a script read from stdin (`python - < x.py`),
  an interactive session. `main_file`: `__main__.__file__` (None for `-c`).
  """
  k = len(orig_argv) - len(argv)  # orig_argv[k]: the script, the module's name or the code.
  if k < 1 or not argv or argv[0] in ('', '-') or list(orig_argv[k + 1:]) != list(argv[1:]):
    return False
  if orig_argv[k - 1] == '-c':
    return argv[0] == '-c'
  same_file = main_file is not None and os.path.realpath(main_file) == os.path.realpath(argv[0])
  if orig_argv[k - 1] == '-m':
    return same_file
  return orig_argv[k] == argv[0] and same_file


def relaunch() -> None:
  """Replaces this process by the same command (interpreter, its options, arguments) with the
  tunable set, where `relaunch_env` says it helps and `reruns_this_program`; otherwise
  returns. Call it first in a `__main__` block: whatever ran before it runs again."""
  env = relaunch_env(os.environ, platform.libc_ver(), thp_mode())
  main_file = getattr(sys.modules.get('__main__'), '__file__', None)
  if (env is None or not sys.executable
      or not reruns_this_program(sys.orig_argv, sys.argv, main_file)):
    return
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:
      stream.flush()
  os.execve(sys.executable, sys.orig_argv, env)
