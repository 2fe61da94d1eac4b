"""`train.py --distributed` for real: two processes on localhost CPU (one device each, JAX's
own coordinator and gloo collectives) end where one process with two devices ends."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from checks import ROOT, XLA_TEST_FLAGS
from dsnet_jax import rundir

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def train(workdir, devices: int, *flags):
  env = {**os.environ,
         'XLA_FLAGS': f'{XLA_TEST_FLAGS} --xla_force_host_platform_device_count={devices}'}
  return subprocess.Popen([sys.executable, 'train.py', '--config=configs/tiny.py',
                           f'--workdir={workdir}', *flags], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_end_with_the_parameters_of_one(trained, tmp_path: pathlib.Path):
  """Against the suite's tiny run: one process, one device, the same global batch of 8."""
  start = time.perf_counter()
  port = free_port()
  processes = [train(tmp_path, 1, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
                     '--num_processes=2', f'--process_id={i}') for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in processes]
  seconds = time.perf_counter() - start
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  print(f'2 processes: {seconds:.0f} s')

  (out0, _), (out1, _) = outputs
  assert '[gate] step 3/3' in out0 and 'gated' in out0
  assert [l for l in out1.splitlines() if not l.startswith('[Gloo]')] == []  # Logs once.
  metrics = [(d / 'metrics.jsonl').read_text().splitlines() for d in (tmp_path, trained.workdir)]
  assert [json.loads(l)['step'] for l in metrics[0]] == [json.loads(l)['step'] for l in metrics[1]]
  for stage in ('supernet', 'recalibrate', 'gate'):
    steps = [sorted(p.name for p in (d / 'checkpoints' / stage).iterdir() if p.name.isdigit())
             for d in (tmp_path, trained.workdir)]
    assert steps[0] == steps[1]
  two, one = (rundir.load(d, log=lambda _: None) for d in (tmp_path, trained.workdir))
  assert two.restored.step == one.restored.step
  differences = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                             two.variables, one.variables)
  worst = max(jax.tree.leaves(differences))
  print(f'largest parameter difference, 2 processes vs 1: {worst:.2e}')
  assert worst <= 1e-5
  report = json.loads((tmp_path / 'eval.json').read_text())
  assert report['gated']['route_histogram'] == trained.report['gated']['route_histogram']
