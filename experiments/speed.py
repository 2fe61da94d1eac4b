"""Table 4: is the saving real time? The latency tool (`python -m dsnet_jax.tools.latency`) on a
gated model of table 2: every route's and the routed model's ms/image on this device at
batch 1 and a throughput batch, next to their MAdds. Each model and supernet step count has its
own section.

    python experiments/speed.py --model=ds_mbnet --steps=1000 --budget=0.4 \
        --workdir_root=workdir/study
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import study

SECTION = 'speed'


def measure(model_name: str, workdir: str, output: str, batch: int, rounds: int) -> dict:
  """The latency tool's table of `workdir` (measured unless `output` exists)."""
  if not os.path.exists(output):
    subprocess.run([sys.executable, '-m', 'dsnet_jax.tools.latency',
                    f'--config={study.CONFIGS[model_name]}', f'--workdir={workdir}',
                    f'--output={output}', f'--batch={batch}', f'--rounds={rounds}'],
                   cwd=study.ROOT, check=True)
  with open(output) as f:
    return json.load(f)


def table(latency: dict) -> str:
  sizes = [str(b) for b in latency['batch_sizes']]
  rows = {**latency['routes'], 'routed (gate)': latency['routed']}
  largest = latency['routes']['largest']
  lines = ['| route | MAdds (M) | MAdds / largest | ' + ' | '.join(
      f'ms/img @ {b} | time / largest @ {b}' for b in sizes) + ' |',
      '|---|---|---|' + '---|---|' * len(sizes)]
  for name, row in rows.items():
    cells = [f'{row["ms_per_image"][b]["median"]:.3f} | '
             f'{row["ms_per_image"][b]["median"] / largest["ms_per_image"][b]["median"]:.2f}'
             for b in sizes]
    lines.append(f'| {name} | {row["madds"] / 1e6:.3f} | {row["madds"] / largest["madds"]:.2f} | '
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def study_table(model_name: str, steps: int, budget: float, batch: int, rounds: int,
                workdir_root: str, runs_dir: str, results: str) -> str:
  """Times the seed-0 gate run of table 2 at `budget` (unless timed), writes the section."""
  name = f'{model_name}_gate_s{steps}_b{budget:g}_seed0'
  output = os.path.join(runs_dir, f'speed_{name}_batch{batch}_rounds{rounds}.json')
  latency = measure(model_name, os.path.join(workdir_root, name), output, batch, rounds)
  if latency['batch_sizes'] != sorted({1, batch}) or latency['rounds'] != rounds:
    raise study.StudyError(f'{output} holds batch sizes {latency["batch_sizes"]} and '
                           f'{latency["rounds"]} rounds; delete it to time again')
  mix = ', '.join(f'{k}: {v:.0%}' for k, v in latency['routed']['mix'].items())
  device = ', '.join(f'{k} {v}' for k, v in latency['device'].items())
  text = (f'## 4. Real speed: {model_name}, {steps}-step supernet, gate budget {budget:g}\n\n'
          f'`python -m dsnet_jax.tools.latency --batch={batch} --rounds={rounds}` on {device}; '
          'median ms per image; the routed model on the first '
          f'{max(latency["batch_sizes"][-1], latency["singles"])} test images, each on the '
          f'route its gate chose (mix {mix}; table 2 counts all 10,000).\n\n'
          + table(latency) + '\n\n' + study.regenerated_by(
              'speed.py', model=model_name, steps=steps, budget=f'{budget:g}', batch=batch,
              rounds=rounds))
  study.write_section(f'{SECTION}-{model_name}-s{steps}', text, results)
  return text


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('model', 'ds_mbnet', f'One of {", ".join(study.CONFIGS)}.')
  flags.DEFINE_integer('steps', 1000, 'Stage I steps of the table-1 supernet.')
  flags.DEFINE_float('budget', 0.4, 'The budget of the table-2 gate run (seed 0) to time.')
  flags.DEFINE_integer('batch', 64, 'Throughput batch.')
  flags.DEFINE_integer('rounds', 5, 'Timed rounds (median).')
  study.define_path_flags()

  def main(argv):
    del argv
    study.quiet()
    f = flags.FLAGS
    study.check_flags(models=[f.model], budgets={'budget': [f.budget]}, results=f.results,
                      steps=f.steps, batch=f.batch, rounds=f.rounds)
    print(study_table(f.model, f.steps, f.budget, f.batch, f.rounds, f.workdir_root,
                      f.runs_dir, f.results))

  from dsnet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  app.run(cli.main_errors(main, study.StudyError))
