"""Huge pages for XLA:CPU: when the entry points relaunch, with which environment, and that
the relaunched process runs the same command (options and arguments) once more."""
import os
import subprocess
import sys

import pytest

from checks import ROOT
from dsnet_jax import huge_pages

GLIBC = ('glibc', '2.36')
MARK = {huge_pages.RELAUNCHED: '1'}


@pytest.mark.parametrize('environ, libc, mode, tunables', [
    ({}, GLIBC, 'madvise', 'glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, GLIBC, 'madvise',
     'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': ''}, ('glibc', '2.35'), 'madvise', 'glibc.malloc.hugetlb=1'),
    ({}, ('glibc', '2.39.9000'), 'madvise', 'glibc.malloc.hugetlb=1'),
    # Already named, whatever its value: the user's choice.
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, GLIBC, 'madvise', None),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}, GLIBC, 'madvise',
     None),
    (MARK, GLIBC, 'madvise', None),  # Relaunched already (its tunable may have been dropped).
    ({}, GLIBC, 'always', None),  # Huge pages already.
    ({}, GLIBC, 'never', None),  # None to be had.
    ({}, GLIBC, None, None),  # Not Linux, or no THP.
    ({}, ('glibc', '2.34'), 'madvise', None),  # No such tunable yet.
    ({}, ('glibc', '2.9'), 'madvise', None),
    ({}, ('', ''), 'madvise', None),  # musl, macOS: platform.libc_ver() knows no glibc.
    ({}, ('glibc', ''), 'madvise', None),
    ({}, ('glibc', '2.x'), 'madvise', None),
    ({}, ('libc', '2.36'), 'madvise', None),
])
def test_relaunch_env(environ, libc, mode, tunables):
  env = huge_pages.relaunch_env({'PATH': '/bin', **environ}, libc, mode)
  if tunables is None:
    assert env is None
  else:
    assert env == {'PATH': '/bin', **environ, 'GLIBC_TUNABLES': tunables, **MARK}


@pytest.mark.parametrize('orig_argv, argv, main_file, expected', [
    (['python', 'train.py', '--config=x'], ['train.py', '--config=x'], 'train.py', True),
    (['python', '-X', 'dev', '-O', 'train.py'], ['train.py'], 'train.py', True),
    (['python', '-m', 'train', '-a'], [f'{ROOT}/train.py', '-a'], f'{ROOT}/train.py', True),
    (['python', '-c', 'code', '-a'], ['-c', '-a'], None, True),
    # IPython's %run in a kernel: the command line is the kernel's.
    (['python', '-m', 'ipykernel_launcher', '-f', 'k.json'], ['train.py'], 'train.py', False),
    (['python', '-m', 'ipykernel_launcher', '-f', 'k.json'], ['train.py', '-a'], 'train.py',
     False),
    # runpy.run_path('train.py', run_name='__main__') inside host.py.
    (['python', 'host.py'], ['host.py'], 'train.py', False),
    (['python', '-', '-a'], ['-', '-a'], None, False),  # Read from stdin: gone.
    (['python'], [''], None, False),  # Interactive.
    (['python', 'train.py', '-a'], ['train.py', '-b'], 'train.py', False),
    (['python', '-mtrain'], [f'{ROOT}/train.py'], f'{ROOT}/train.py', False),  # Unsure: no.
])
def test_reruns_this_program(orig_argv, argv, main_file, expected):
  assert huge_pages.reruns_this_program(orig_argv, argv, main_file) is expected


@pytest.mark.parametrize('text, mode', [('always [madvise] never\n', 'madvise'),
                                        ('[always] madvise never\n', 'always'),
                                        ('always madvise [never]\n', 'never'),
                                        ('garbage\n', None)])
def test_thp_mode_reads_the_bracketed_mode(tmp_path, text, mode):
  path = tmp_path / 'enabled'
  path.write_text(text)
  assert huge_pages.thp_mode(str(path)) == mode
  assert huge_pages.thp_mode(str(tmp_path / 'missing')) is None


# Run by the child: the host looks like glibc 2.36 with THP in 'madvise' mode on any machine
# (an unknown tunable is ignored), so the exec path always runs.
CHILD = '''
import os, platform, sys
from dsnet_jax import huge_pages
huge_pages.thp_mode = lambda *_: 'madvise'
platform.libc_ver = lambda *_, **__: ('glibc', '2.36')
print('start', os.getpid(), flush=True)
huge_pages.relaunch()
print('argv', sys.argv[1:], 'optimize', sys.flags.optimize)
print('tunables', os.environ.get('GLIBC_TUNABLES'))
'''


def _child(cmd, tunables=None, stdin=None):
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', huge_pages.RELAUNCHED)}
  if tunables is not None:
    env['GLIBC_TUNABLES'] = tunables
  done = subprocess.run(cmd, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                        check=True)
  return done.stdout.splitlines()


@pytest.mark.parametrize('tunables, expected', [
    (None, 'glibc.malloc.hugetlb=1'),
    ('glibc.malloc.arena_max=4', 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1')])
def test_relaunch_runs_the_same_command_again_with_the_tunable(tunables, expected):
  lines = _child([sys.executable, '-O', '-c', CHILD, 'an-argument', '-x'], tunables)
  starts = [line for line in lines if line.startswith('start')]
  assert len(starts) == 2 and starts[0] == starts[1]  # The same process, started twice.
  assert lines[2:] == ["argv ['an-argument', '-x'] optimize 1", f'tunables {expected}']


def test_relaunch_leaves_a_set_tunable_and_a_script_from_stdin_alone():
  lines = _child([sys.executable, '-c', CHILD], 'glibc.malloc.hugetlb=0')
  assert len(lines) == 3 and lines[-1] == 'tunables glibc.malloc.hugetlb=0'
  lines = _child([sys.executable, '-', 'an-argument'], stdin=CHILD)
  assert len(lines) == 3 and lines[-1] == 'tunables None'
