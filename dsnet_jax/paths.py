"""Paths local or remote (gs://, read and written through etils.epath), and the one exclusive
file lock: the workdir's while a run trains, a data set's while it is prepared."""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Callable, Iterator

from dsnet_jax.errors import ConfigError, LockedError


def is_remote(path: str | os.PathLike) -> bool:
  """A URL such as gs://bucket/dir."""
  return '://' in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute; a remote one as given."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def check_output(path: str | os.PathLike, kind: str, flag: str) -> None:
  """Raises ConfigError, before any work, when `path` cannot become a `kind` ('dir' or
  'file') that this process writes: it exists as the other kind, or the nearest folder that
  exists above it is a file or not writable. `flag` names it in the message. Remote paths are
  not checked (their bucket says at the write)."""
  path = os.fspath(path)
  if not path or is_remote(path):
    return
  if kind == 'dir' and os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'{flag}={path} is a file: name a directory')
  if kind == 'file' and os.path.isdir(path):
    raise ConfigError(f'{flag}={path} is a directory: name a file')
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(f'{flag}={path} lies under {parent}, which is a file')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f'{flag}={path}: {parent} is not writable')


@contextlib.contextmanager
def exclusive_lock(path: str, busy: Callable[[str], str] | None = None,
                   wait: Callable[[str], None] | None = None) -> Iterator[None]:
  """Holds an flock on the local file `path` (created if missing; released when the process
  ends, kill -9 included) with this process's PID written in it.

  Args:
    path: the lock file.
    busy: the message of the LockedError raised when another process holds the lock, given
      that process's PID (as it wrote it; 'unknown' if it wrote none).
    wait: if given, called with the holder's PID and then the lock is waited for instead.
  Raises:
    LockedError: another process holds it and `wait` is None.
  """
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
      if wait is None:
        raise LockedError(busy(holder)) from None
      wait(holder)
      fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the flock.
