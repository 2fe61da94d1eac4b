"""Huge pages for XLA:CPU training: a Stage I step on glibc's 4 KiB pages against 2 MiB ones.

Runs `benchmarks/train_step.py` (its warm-up and timed rounds) in one child process per setting
of glibc's `glibc.malloc.hugetlb` tunable: 0, glibc's default (4 KiB pages), and 1, transparent
huge pages, what train.py relaunches itself with (`dsnet_jax/huge_pages.py`); --repeats times,
which setting goes first alternating. Per child: the sandwich step's and the plain step's
median time, and over the child's whole run (imports and compiles included, the persistent
compilation cache off so both compile alike) its minor page faults and the kernel's share of
its CPU time.

    python benchmarks/huge_pages.py                                     # the demo config
    python benchmarks/huge_pages.py --config=configs/ds_vit_fmnist.py --rounds=5

Where the kernel's THP mode is not 'madvise' or the C library is not glibc >= 2.35 the two
settings run alike (the header says which applies).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsnet_jax import huge_pages  # noqa: E402

SETTINGS = {'4 KiB pages': '0', 'huge pages': '1'}  # Label: glibc.malloc.hugetlb.


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/ds_mbnet_fmnist.py')
  p.add_argument('--rounds', type=int, default=10, help='timed rounds per child (median)')
  p.add_argument('--draws', type=int, default=2, help='sandwich draws cycled over the rounds')
  p.add_argument('--num_devices', type=int, default=-1, help="(-1: the config's)")
  p.add_argument('--repeats', type=int, default=1, help='children per setting, alternating')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)  # JSON a child writes.
  return p.parse_args(argv)


def train_step_args(args) -> list[str]:
  return [f'--config={args.config}', f'--rounds={args.rounds}', f'--draws={args.draws}',
          f'--num_devices={args.num_devices}']


def child(args) -> None:
  """Times train_step.py in this process; writes its medians and resource use to args.child."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import train_step  # pylint: disable=import-outside-toplevel
  with contextlib.redirect_stdout(io.StringIO()):
    result = train_step.main(train_step_args(args))
  usage = resource.getrusage(resource.RUSAGE_SELF)
  with open(args.child, 'w') as f:
    json.dump({'tunables': os.environ.get('GLIBC_TUNABLES', ''),
               'sandwich_s': statistics.median(result['step_times']),
               'plain_s': statistics.median(result['plain_times']),
               'batch_size': result['batch_size'],
               'minor_faults': usage.ru_minflt, 'user_s': usage.ru_utime,
               'system_s': usage.ru_stime}, f)


def run_child(args, hugetlb: str, out: str) -> dict:
  tunables = ':'.join(filter(None, (os.environ.get('GLIBC_TUNABLES', ''),
                                    f'{huge_pages.TUNABLE}={hugetlb}')))
  # The tunable given last wins: a user's own setting of it is overridden here.
  env = {**os.environ, 'GLIBC_TUNABLES': tunables, 'JAX_ENABLE_COMPILATION_CACHE': 'false'}
  subprocess.run([sys.executable, os.path.abspath(__file__), *train_step_args(args),
                  f'--child={out}'], check=True, env=env)
  with open(out) as f:
    return json.load(f)


def main(argv=None) -> dict[str, list[dict]]:
  """Prints the table; returns {setting label: [one dict per child]}."""
  args = parse_args(argv)
  if args.child:
    child(args)
    return {}
  results = {label: [] for label in SETTINGS}
  with tempfile.TemporaryDirectory() as tmp:
    for repeat in range(args.repeats):
      for label in list(SETTINGS)[::1 if repeat % 2 == 0 else -1]:
        hugetlb = SETTINGS[label]
        results[label].append(run_child(args, hugetlb, os.path.join(tmp, f'{repeat}_{hugetlb}')))
  mode, libc = huge_pages.thp_mode(), platform.libc_ver()
  applies = huge_pages.relaunch_env({}, libc, mode) is not None
  command = ' '.join(sys.argv[1:] if argv is None else argv)
  print('# Huge pages for XLA:CPU: a Stage I step on 4 KiB pages vs 2 MiB pages\n')
  print('| | |\n|---|---|')
  for key, value in (
      ('command', f'`python benchmarks/huge_pages.py {command}`'),
      ('date', datetime.datetime.now().strftime('%Y-%m-%d %H:%M')),
      ('host', f'{os.cpu_count()} cores, {platform.machine()}, {libc[0]} {libc[1]}, THP mode '
               f'{mode}: huge pages {"apply" if applies else "do NOT apply (rows run alike)"}'),
      ('config', f'{args.config}, {args.rounds} rounds per child, {args.repeats} child(ren) per '
                 'setting, alternating')):
    print(f'| {key} | {value} |')
  print('\n| pages | GLIBC_TUNABLES | sandwich step ms | img/s | plain step (largest) ms | '
        'minor page faults (run) | kernel share of CPU (run) |')
  print('|---|---|---|---|---|---|---|')
  for label, rows in results.items():
    for r in rows:
      print(f'| {label} | {r["tunables"]} | {r["sandwich_s"] * 1e3:.1f} | '
            f'{r["batch_size"] / r["sandwich_s"]:.1f} | {r["plain_s"] * 1e3:.1f} | '
            f'{r["minor_faults"]:,} | {r["system_s"] / (r["user_s"] + r["system_s"]):.0%} |')
  mean = lambda label, key: sum(r[key] for r in results[label]) / len(results[label])
  small, huge = SETTINGS
  print(f'\nhuge pages vs 4 KiB pages (means over children): sandwich step '
        f'{mean(small, "sandwich_s") / mean(huge, "sandwich_s"):.2f}x faster, plain step '
        f'{mean(small, "plain_s") / mean(huge, "plain_s"):.2f}x faster, '
        f'{mean(small, "minor_faults") / mean(huge, "minor_faults"):.1f}x fewer page faults')
  return results


if __name__ == '__main__':
  main()
