"""Huge pages for XLA:CPU: when the entry points relaunch, and with which environment (the
relaunch itself, as a process: tests/integration/test_cli.py)."""
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
