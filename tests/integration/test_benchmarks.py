"""The benchmark scripts run on the tiny config (so they cannot rot unnoticed)."""
import importlib.util
import os
import re
import subprocess
import sys

from checks import ROOT


def load_benchmark(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # Its dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


def test_train_step_benchmark_on_the_tiny_config(capsys):
  train_step = load_benchmark('train_step')
  result = train_step.main(['--config=configs/tiny.py', '--num_devices=1', '--rounds=2',
                            '--draws=1', '--profile'])
  printed = capsys.readouterr().out

  # The tiny config's sandwich: largest, 2 random routes, smallest; + teacher, zeros, update.
  (routes,) = result['draws'].values()
  assert len(routes) == 4 and routes[0].name == 'largest' and routes[-1].name == '0'
  assert result['num_parts'] == len(routes) + 3
  assert set(result['part_times']) == {
      'teacher (largest)', 'zeros', 'route_grad #0 (largest)', 'route_grad #1 (random)',
      'route_grad #2 (random)', 'route_grad #3 (smallest)', 'update'}
  assert 6 <= result['programs_per_step'] <= result['num_parts']  # A route may come twice.
  assert result['first_step_lowerings'] >= result['programs_per_step']
  assert result['timed_lowerings'] == 0  # Warm: nothing compiles while timing.
  for times in (result['step_times'], result['part_sums'], result['plain_times'],
                *result['part_times'].values()):
    assert len(times) == 2 and all(t > 0 for t in times)
  # A sandwich is the teacher's forward + 3x the forward of each route (largest among them).
  assert result['step_flops'] > result['plain_flops'] > 0
  assert result['mfu_peak'] is None  # CPU without --peak_tflops.

  assert '| what | calls | median ms | p90 ms | img/s | GFLOP | TFLOP/s | MFU |' in printed
  assert '| sandwich step | 1 |' in printed and '| sum of parts | 7 |' in printed
  assert '| jax |' in printed and '| backend | cpu' in printed
  assert 'overhead (sandwich step - sum of parts' in printed
  # --profile: the XLA ops of one step by kind, most time first, from the profiler's trace.
  kinds = [kind for kind, _, _ in result['top_ops']]
  assert kinds and all(ms > 0 and n > 0 for _, ms, n in result['top_ops'])
  assert [ms for _, ms, _ in result['top_ops']] == sorted(
      (ms for _, ms, _ in result['top_ops']), reverse=True)
  assert not any(k.startswith(('$', 'Pjit')) or k[-1].isdigit() for k in kinds)
  assert '| op kind | ms | % of these | calls |' in printed


def test_export_table_on_the_tiny_config(capsys):
  """Route 0, the middle route, 'largest' and the bundle of the tiny model as jax.export (ONNX
  conversion is slow and tested in test_export), and, with the export extra, the ONNX-vs-JAX
  timing at batch 1."""
  export_table = load_benchmark('export_table')
  has_onnx = importlib.util.find_spec('jax2onnx') is not None
  formats = 'jax'
  export_table.main(['--config=configs/tiny.py', '--images=4', f'--formats={formats}',
                     '--rounds=1', '--timing_batches=1'] + ([] if has_onnx else
                                                               ['--timed_model=']))
  printed = capsys.readouterr().out
  rows = [line for line in printed.splitlines() if line.startswith('| ds_mbnet |')]
  names = [r.split(' | ')[1] for r in rows]
  assert names[:3] == ['route 0', 'route 1', 'route largest'], names
  assert len(names) == 4 and names[3].startswith('routed bundle (mix ['), names
  for row in rows:  # Every artifact within float32 rounding of the supernet.
    errors = [float(c) for c in row.split(' | ')[4::2]]
    assert len(errors) == len(formats.split(',')) and max(errors) <= 1e-4, row
  if has_onnx:
    assert '| 1 |' in printed and 'ONNX / jax.export' in printed


def test_huge_pages_benchmark_on_the_tiny_config(capsys):
  """One child per glibc.malloc.hugetlb setting, each timing the tiny config's step."""
  results = load_benchmark('huge_pages').main(['--config=configs/tiny.py', '--rounds=1',
                                               '--draws=1', '--num_devices=1'])
  printed = capsys.readouterr().out
  assert list(results) == ['4 KiB pages', 'huge pages']
  for (row,), hugetlb in zip(results.values(), '01'):
    assert row['tunables'].endswith(f'glibc.malloc.hugetlb={hugetlb}')  # What the child saw.
    assert row['sandwich_s'] > 0 and row['plain_s'] > 0 and row['minor_faults'] > 0
    assert row['user_s'] > 0 and row['batch_size'] > 0
  for label, (row,) in results.items():
    assert f'| {label} | {row["tunables"]} |' in printed
  assert 'huge pages vs 4 KiB pages (means over children): sandwich step' in printed


def test_gpu_tables_script_on_a_tiny_size(tmp_path):
  """benchmarks/gpu_tables.sh, the GPU machine's one prepared run, on the CPU at 32 px: the
  speed table (DS-MBNet, batch 1 and 4) in both dtypes and DS-ViT-S's Stage I step (batch 16),
  appended to $RESULTS under a heading naming the device and the commit."""
  results = tmp_path / 'RESULTS.md'
  results.write_text('# before\n')
  env = {**os.environ, 'PYTHON': sys.executable, 'IMAGE_SIZE': '32', 'BATCH': '4',
         'STEP_BATCH': '16', 'ROUNDS': '1', 'MODELS': 'ds_mbnet', 'RESULTS': str(results)}
  run = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_tables.sh')], env=env,
                       capture_output=True, text=True, timeout=900, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  text = results.read_text()
  assert re.match(r'# before\n\n## cpu, cpu, \d{4}-\d\d-\d\d \(benchmarks/gpu_tables.sh at \w+\)',
                  text)
  assert text.count('## ds_mbnet: image (32, 32, 3), float32') == 1
  assert text.count('## ds_mbnet: image (32, 32, 3), bfloat16') == 1
  assert '## ds_vit: image' not in text  # MODELS chose the families.
  assert '# Stage I step: sandwich vs its parts vs a plain step' in text
  assert 'configs/vit_s.py: ds_vit, batch 16 x 2 view(s) of (32, 32, 3), dtype bfloat16' in text
  assert f'appended to {results}' in run.stdout
