"""Huge pages for XLA:CPU: when the entry points relaunch, with which environment, and that
the relaunched process runs the same command once more."""
import os
import platform
import subprocess
import sys

import pytest

from checks import ROOT
from dsnet_jax import huge_pages

GLIBC = ('glibc', '2.36')


@pytest.mark.parametrize('tunables, libc, mode, expected', [
    (None, GLIBC, 'madvise', 'glibc.malloc.hugetlb=1'),
    ('glibc.malloc.arena_max=2', GLIBC, 'madvise',
     'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ('', ('glibc', '2.35'), 'madvise', 'glibc.malloc.hugetlb=1'),
    # Already named, whatever its value: the user's choice, or this is the relaunched process.
    ('glibc.malloc.hugetlb=0', GLIBC, 'madvise', None),
    ('glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', GLIBC, 'madvise', None),
    (None, GLIBC, 'always', None),  # Huge pages already.
    (None, GLIBC, 'never', None),  # None to be had.
    (None, GLIBC, None, None),  # Not Linux, or no THP.
    (None, ('glibc', '2.34'), 'madvise', None),  # No such tunable yet.
    (None, ('glibc', '2.9'), 'madvise', None),
    (None, ('', ''), 'madvise', None),  # musl, macOS: platform.libc_ver() knows no glibc.
    (None, ('libc', '2.36'), 'madvise', None),
])
def test_relaunch_env(tunables, libc, mode, expected):
  environ = {'PATH': '/bin'} if tunables is None else {'PATH': '/bin', 'GLIBC_TUNABLES': tunables}
  env = huge_pages.relaunch_env(environ, libc, mode)
  if expected is None:
    assert env is None
  else:
    assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': expected}


@pytest.mark.parametrize('text, mode', [('always [madvise] never\n', 'madvise'),
                                        ('[always] madvise never\n', 'always'),
                                        ('always madvise [never]\n', 'never'),
                                        ('garbage\n', None)])
def test_thp_mode_reads_the_bracketed_mode(tmp_path, text, mode):
  path = tmp_path / 'enabled'
  path.write_text(text)
  assert huge_pages.thp_mode(str(path)) == mode
  assert huge_pages.thp_mode(str(tmp_path / 'missing')) is None


@pytest.mark.parametrize('tunables', [None, 'glibc.malloc.arena_max=4', 'glibc.malloc.hugetlb=0'])
def test_relaunch_runs_the_same_command_again_with_the_tunable(tunables):
  """On this machine: relaunched (the code before `relaunch` runs twice, the second time with
  the tunable) exactly where relaunch_env says so, else run once, environment untouched."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  if tunables is not None:
    env['GLIBC_TUNABLES'] = tunables
  code = ('import os; print("start", os.getpid(), flush=True)\n'
          'from dsnet_jax import huge_pages; huge_pages.relaunch()\n'
          'print("tunables", os.environ.get("GLIBC_TUNABLES"))')
  done = subprocess.run([sys.executable, '-c', code, 'an-argument'], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=True)
  lines = done.stdout.splitlines()
  expected = huge_pages.relaunch_env(env, platform.libc_ver(), huge_pages.thp_mode())
  starts = [line for line in lines if line.startswith('start')]
  if expected is None:
    assert len(starts) == 1 and lines[-1] == f'tunables {tunables}'
  else:
    # The same process (execve keeps the pid), started twice.
    assert len(starts) == 2 and starts[0] == starts[1]
    assert lines[-1] == f'tunables {expected["GLIBC_TUNABLES"]}'
