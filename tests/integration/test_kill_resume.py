"""kill -9 the tiny training run at seeded random points, resume it, compare bit for bit.

Only the command line is used (`train.py --config=configs/tiny.py --workdir=...`): a reference
run goes straight through; a second workdir is SIGKILLed several times in a row (a random
fraction of a second after a save finished, and the moment an orbax
`<step>.orbax-checkpoint-tmp` directory shows a save in flight), each time rerun with the same
command, and finally left to finish. It must end with
the same latest checkpoint of every stage (read raw with orbax, every array compared with
np.array_equal) and the same eval.json. All runs share a JAX compilation cache (under
.pytest_cache) to keep the test to a few minutes; it changes no computed value.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from checks import ROOT, XLA_TEST_FLAGS

STAGES = ('supernet', 'recalibrate', 'gate')
SUPERNET_STEPS, RECALIBRATE_BATCHES, GATE_STEPS = 8, 2, 6
FLAGS = (f'--config.supernet.steps={SUPERNET_STEPS}', f'--config.gate.steps={GATE_STEPS}',
         f'--config.recalibrate.num_batches={RECALIBRATE_BATCHES}',
         '--config.checkpoint_every_steps=1', '--config.log_every_steps=1',
         '--config.num_devices=1')
# Every save of a run, in order.
SAVES = ([('supernet', s) for s in range(1, SUPERNET_STEPS + 1)]
         + [('recalibrate', RECALIBRATE_BATCHES)]
         + [('gate', s) for s in range(1, GATE_STEPS + 1)])
# The kills, in order, on one workdir: during the save of a random later step of a stage, or
# a random fraction of a second after a random later save finished (mid-step). Then one last
# run finishes it. Both are triggered by what appears on disk, so they land at any speed.
PLAN = ('supernet', 'after', 'recalibrate', 'gate')  # Each stage's save, and mid-step once.
SEED = 20240607
TMP = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')
TIMEOUT_S = 900


def _env(cache_dir: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', str(cache_dir))
  env['XLA_FLAGS'] = XLA_TEST_FLAGS  # One CPU device, as a user's plain run.
  return env


def _stat(path: pathlib.Path):
  try:
    st = path.stat()
  except FileNotFoundError:
    return None
  return st.st_ino, st.st_mtime_ns


def _tmp_dirs(workdir: pathlib.Path, stage: str) -> dict[str, tuple]:
  """{name: (inode, mtime)} of the orbax temporary step directories of `stage`."""
  directory = workdir / 'checkpoints' / stage
  try:
    names = [n for n in os.listdir(directory) if TMP.match(n)]
  except FileNotFoundError:
    return {}
  return {n: s for n in names if (s := _stat(directory / n)) is not None}


def _progress(workdir: pathlib.Path) -> tuple[int, str]:
  """(number of SAVES finished on disk, a short description incl. leftover tmp dirs)."""
  done, parts = 0, []
  for stage in STAGES:
    directory = workdir / 'checkpoints' / stage
    names = os.listdir(directory) if directory.exists() else []
    steps = [int(n) for n in names if n.isdigit()]
    tmps = sorted(n.split('.')[0] for n in names if TMP.match(n))
    if steps:
      done = max(done, SAVES.index((stage, max(steps))) + 1)
    if steps or tmps:
      parts.append(f'{stage}@{max(steps, default="-")}'
                   + ''.join(f' +tmp{t}' for t in tmps))
  return done, ', '.join(parts) or 'nothing'


def _train(workdir: pathlib.Path, log: pathlib.Path, env, kill=None) -> dict:
  """Runs train.py once; `kill` is ('save', (stage, step)), ('after', (stage, step, delay))
  or None.

  A save kill fires when a temporary directory for `stage` at `step` or later appears that
  was not there (same inode and mtime) at launch, i.e. a save this process has started. An
  after kill fires `delay` seconds after the finished step folder `stage/step` appears.
  """
  stale = {s: _tmp_dirs(workdir, s) for s in STAGES}
  seen = None
  cmd = [sys.executable, 'train.py', '--config=configs/tiny.py', f'--workdir={workdir}', *FLAGS]
  out_path, err_path = log.parent / f'{log.name}.out', log.parent / f'{log.name}.err'
  with open(out_path, 'w') as out, open(err_path, 'w') as err:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err,
                            start_new_session=True)
    pgid = os.getpgid(proc.pid)
    hit, note = None, ''
    try:
      while proc.poll() is None:
        elapsed = time.monotonic() - start
        if elapsed > TIMEOUT_S:
          note = f'[test] killed after a {TIMEOUT_S} s timeout\n'
          break
        if kill and kill[0] == 'after':
          stage, step, delay = kill[1]
          if seen is None and (workdir / 'checkpoints' / stage / str(step)).is_dir():
            seen = elapsed
          if seen is not None and elapsed - seen >= delay:
            hit = f'{stage} step {step} + {delay:.2f} s @ {elapsed:.1f} s'
        elif kill and kill[0] == 'save':
          stage, step = kill[1]
          for name, st in _tmp_dirs(workdir, stage).items():
            if int(TMP.match(name)[1]) >= step and stale[stage].get(name) != st:
              hit = f'{stage} save {name.split(".")[0]} @ {elapsed:.1f} s'
        if hit:
          os.killpg(pgid, signal.SIGKILL)
          break
        time.sleep(0.002)
    finally:
      if proc.poll() is None and not hit:
        os.killpg(pgid, signal.SIGKILL)
      rc = proc.wait()
  return dict(rc=rc, hit=hit, seconds=time.monotonic() - start,
              err=err_path.read_text()[-3000:] + note)


def _final_states(workdir: pathlib.Path) -> dict[str, tuple[int, dict]]:
  """{stage: (latest step, {key: np.ndarray})}, read straight from disk with orbax."""
  result = {}
  for stage in STAGES:
    directory = workdir / 'checkpoints' / stage
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if directory.exists() else []
    if steps:
      step = max(steps)
      result[stage] = step, _read_state(directory / str(step) / 'state')
  return result


def _read_state(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The raw saved tree as {'a/b/c': np.ndarray}, no target or shardings needed."""
  handler = ocp.PyTreeCheckpointHandler()
  path = epath.Path(path)
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          handler.metadata(path).tree)
  tree = handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  handler.close()
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(tree, sep='/').items()}


def _differences(ref: dict, got: dict) -> list[str]:
  problems = []
  if ref.keys() != got.keys():
    return [f'stages {sorted(got)} != {sorted(ref)}']
  for stage, (step, arrays) in ref.items():
    got_step, got_arrays = got[stage]
    if got_step != step:
      problems.append(f'{stage}: latest step {got_step} != {step}')
    if got_arrays.keys() != arrays.keys():
      problems.append(f'{stage}: keys {sorted(got_arrays.keys() ^ arrays.keys())} differ')
    problems += [f'{stage}/{k} differs' for k in sorted(arrays.keys() & got_arrays.keys())
                 if not (arrays[k].dtype == got_arrays[k].dtype
                         and np.array_equal(arrays[k], got_arrays[k]))]
  return problems


def _eval_json(workdir: pathlib.Path):
  path = workdir / 'eval.json'
  return json.loads(path.read_text()) if path.exists() else None


def _table(rows) -> str:
  head = ('#', 'kill point', 'killed at', 'on disk after kill', 'resumed ok', 'identical')
  cells = [head] + [tuple(str(c) for c in r) for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_matches_an_unbroken_run(tmp_path, request):
  cache = getattr(request.config, 'cache', None)  # None under -p no:cacheprovider.
  env = _env(cache.mkdir('jax_compilation_cache') if cache else tmp_path / 'jax_cache')
  rng = random.Random(SEED)
  logs = tmp_path / 'logs'
  logs.mkdir()
  began = time.monotonic()

  ref_dir = tmp_path / 'reference'
  ref = _train(ref_dir, logs / 'reference', env)
  assert ref['rc'] == 0, f'reference run failed (rc {ref["rc"]}):\n{ref["err"]}'

  workdir = tmp_path / 'killed'
  rows, failure = [], None  # One row per kill; `failure`: a run that crashed while resuming.
  for i, kind in enumerate(PLAN):
    done, _ = _progress(workdir)
    # Each kill lands within the next few saves, so that every planned kill finds work left.
    if kind == 'after':
      if not SAVES[done:-1]:
        break
      stage, step = rng.choice(SAVES[done:-1][:3])
      kill = ('after', (stage, step, rng.uniform(0.0, 0.5)))
      what = f'after {stage} step >= {step}'
    else:
      later = [s for s in SAVES[done:] if s[0] == kind]
      if not later:
        continue
      kill = ('save', rng.choice(later[:3]))
      what = f'{kind} save >= {kill[1][1]}'
    result = _train(workdir, logs / f'killed.{i}', env, kill)
    if rows:  # This run resumed the previous row's kill.
      rows[-1][4] = 'yes' if result['hit'] or result['rc'] == 0 else f'NO (rc {result["rc"]})'
    if not result['hit'] and result['rc'] != 0:
      failure = f'run {i} ({kill}) exited with rc {result["rc"]} before its kill'
      failure += f' (it resumed from: {rows[-1][3]})' if rows else ''
      failure += f':\n{result["err"]}'
      break
    if not result['hit']:
      break  # Finished before the kill point; nothing left to interrupt.
    rows.append([len(rows) + 1, what, result['hit'], _progress(workdir)[1], '?', '?'])

  final = None
  if failure is None:
    final = _train(workdir, logs / 'final', env)
    if rows:
      rows[-1][4] = 'yes' if final['rc'] == 0 else f'NO (rc {final["rc"]})'
    if final['rc'] != 0:
      failure = f'resume after the last kill ({rows and rows[-1][3]}) failed (rc {final["rc"]})'
      failure += f':\n{final["err"]}'

  problems = []
  if failure is None:
    problems = _differences(_final_states(ref_dir), _final_states(workdir))
    ref_eval, got_eval = _eval_json(ref_dir), _eval_json(workdir)
    if ref_eval != got_eval:
      problems.append(f'eval.json differs:\n{ref_eval}\n{got_eval}')
    for row in rows:
      row[5] = 'yes' if not problems else 'NO'

  print(f'\nreference run {ref["seconds"]:.0f} s, last resume '
        f'{final and round(final["seconds"])} s, whole test {time.monotonic() - began:.0f} s; '
        f'logs in {logs}')
  print(_table(rows))

  assert failure is None, failure
  assert not problems, '\n'.join(problems[:20])
  assert len(rows) >= 3, 'too few kills landed'
  assert any('save' in r[1] and '+tmp' in r[3] for r in rows), 'no kill landed during a save'
