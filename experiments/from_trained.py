"""Table 6: Stage I from a trained network. Does a supernet started from a trained 'largest'
meet the study's criterion (every route within 1 point of the same network trained alone), and
at what total cost?

For each model and seed: 'largest' trained alone for `--base_steps` (its workdir kept: the
base), then Stage I (+ BN recalibration) from it (`init_checkpoint`) for `--steps`, at
`--lr_factor` x the recipe's peak learning rate (the fine-tuning schedule: same warm-up, cosine).
Every compared route is set beside the supernet trained from scratch and the route trained alone,
read from table 1's records at each of `--compare_steps` (and at the total, base + steps); a
comparison without a record is shown as 'not run'.

    python experiments/from_trained.py --models=ds_mbnet,ds_vit --base_steps=2000 --steps=1000 \
        --compare_steps=1000,3000 --seeds=0 --workdir_root=workdir/study
"""
from __future__ import annotations

import json
import os
import pathlib

import study
from supernet_vs_independent import alone_name

from dsnet_jax import huge_pages

SECTION = 'from-trained'


def base_name(model_name: str, steps: int, seed: int) -> str:
  """The base run: 'largest' alone, its workdir kept (table 1's alone runs keep only records)."""
  return f'{model_name}_base_largest_s{steps}_seed{seed}'


def from_trained_name(model_name: str, base_steps: int, steps: int, lr_factor: float,
                      seed: int) -> str:
  return f'{model_name}_fromtrained_b{base_steps}_s{steps}_lr{lr_factor:g}_seed{seed}'


def runs_of(model_name: str, base_steps: int, steps: int, lr_factor: float, seed: int,
            workdir_root: str, runs_dir: str) -> dict[str, dict]:
  """{'base', 'from_trained'}: trained unless their records exist."""
  config_file = study.CONFIGS[model_name]
  base = study.run(base_name(model_name, base_steps, seed), config_file,
                   {'seed': seed, 'supernet.steps': base_steps, 'supernet.epochs': 0.0,
                    'stages': ('supernet',), 'supernet.train_route': 'largest'},
                   workdir_root, runs_dir)
  base_checkpoint = os.path.join(workdir_root, base['name'], 'checkpoints', 'supernet')
  lr = study.configured(config_file).supernet.optimizer.lr * lr_factor
  tuned = study.run(from_trained_name(model_name, base_steps, steps, lr_factor, seed), config_file,
                    {'seed': seed, 'supernet.steps': steps, 'supernet.epochs': 0.0,
                     'stages': ('supernet', 'recalibrate'), 'init_checkpoint': base_checkpoint,
                     'supernet.optimizer.lr': lr}, workdir_root, runs_dir)
  return {'base': base, 'from_trained': tuned}


def _record(runs_dir: str, name: str) -> dict | None:
  path = pathlib.Path(runs_dir) / f'{name}.json'
  return json.loads(path.read_text()) if path.exists() else None


def _accuracy(record: dict | None, route: str) -> float | None:
  return None if record is None else study.route_row(record, route)['accuracy']


def _cell(values: list[float | None]) -> str:
  if not values or any(v is None for v in values):
    return 'not run'
  return study.percent(*study.mean_spread(values), len(values))


def table(runs: list[dict[str, dict]], model_name: str, base_steps: int, steps: int,
          lr_factor: float, compare_steps: list[int], seeds: list[int], runs_dir: str) -> str:
  """Markdown: per compared route, the supernet from the trained 'largest' against the
  supernet from scratch and the route alone at each compared step count."""
  total = base_steps + steps
  counts = sorted({*compare_steps, total})
  n = len(seeds)
  header = ['route', 'MAdds (M)', f'from trained ({base_steps} + {steps})']
  header += [f'scratch {c}' for c in counts] + [f'alone {c}' for c in counts]
  header += [f'from trained - alone {total}']
  lines = [f'**{model_name}** ({study.CONFIGS[model_name]}; \'largest\' alone for {base_steps} '
           f'steps, then Stage I for {steps} at {lr_factor:g} x the peak learning rate; '
           f'{n} seed(s): {", ".join(map(str, seeds))}; test accuracy, mean ± half the spread)',
           '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for route in study.compared_routes(model_name):
    ours = [_accuracy(r['from_trained'], route) for r in runs]
    scratch = {c: [_accuracy(_record(runs_dir, study.supernet_name(model_name, c, s)), route)
                   for s in seeds] for c in counts}
    alone = {c: [_accuracy(_record(runs_dir, alone_name(model_name, route, c, s)), route)
                 for s in seeds] for c in counts}
    madds = study.route_row(runs[0]['from_trained'], route)['madds']
    gap = ('not run' if any(a is None for a in alone[total]) else
           study.signed(*study.mean_spread([o - a for o, a in zip(ours, alone[total])]), n))
    lines.append(f'| {route} | {madds / 1e6:.3f} | {_cell(ours)} | '
                 + ' | '.join(_cell(scratch[c]) for c in counts) + ' | '
                 + ' | '.join(_cell(alone[c]) for c in counts) + f' | {gap} |')
  lines += ['', 'Wall time (s), seed ' + ', '.join(
      f'{s}: base {r["base"]["wall_seconds"]:.0f} + Stage I {r["from_trained"]["wall_seconds"]:.0f}'
      for s, r in zip(seeds, runs)), '', 'Commands (seed 0):', '', '```',
      runs[0]['base']['command'], runs[0]['from_trained']['command'], '```']
  return '\n'.join(lines)


def study_table(models, base_steps: int, steps: int, lr_factor: float, compare_steps, seeds,
                workdir_root: str, runs_dir: str, results: str) -> str:
  """Runs what is missing, writes each model's section into `results`; their markdown."""
  sections = []
  for model_name in models:
    runs = [runs_of(model_name, base_steps, steps, lr_factor, seed, workdir_root, runs_dir)
            for seed in seeds]
    text = table(runs, model_name, base_steps, steps, lr_factor, compare_steps, seeds, runs_dir)
    written_by = study.regenerated_by(
        'from_trained.py', models=model_name, base_steps=base_steps, steps=steps,
        lr_factor=lr_factor, compare_steps=compare_steps, seeds=seeds)
    text = (f'## 6. Stage I from a trained network: {model_name}, {base_steps} + {steps} '
            f'steps\n\n{text}\n\n{written_by}')
    study.write_section(f'{SECTION}-{model_name}-b{base_steps}-s{steps}', text, results)
    sections.append(text)
  return '\n\n'.join(sections)


if __name__ == '__main__':
  huge_pages.relaunch()
  from absl import app, flags
  flags.DEFINE_list('models', ['ds_mbnet', 'ds_vit'], f'Any of {", ".join(study.CONFIGS)}.')
  flags.DEFINE_integer('base_steps', 2000, "Steps of 'largest' trained alone (the base).")
  flags.DEFINE_integer('steps', 1000, 'Stage I steps from the base.')
  flags.DEFINE_float('lr_factor', 0.3, "Stage I's peak learning rate, as a fraction of the "
                     "recipe's (fine-tuning).")
  flags.DEFINE_list('compare_steps', ['1000', '3000'],
                    'Step counts of table 1\'s scratch and alone runs to compare with.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds: every run once per seed.')
  study.define_path_flags()

  def main(argv):
    del argv
    study.quiet()
    f = flags.FLAGS
    study.check_flags(models=f.models, seeds={'seeds': f.seeds}, results=f.results,
                      base_steps=f.base_steps, steps=f.steps)
    try:
      compare = [int(c) for c in f.compare_steps]
    except ValueError:
      raise study.StudyError(f'--compare_steps={",".join(f.compare_steps)}: not integers') from None
    if not 0 < f.lr_factor <= 1:
      raise study.StudyError(f'--lr_factor={f.lr_factor}: must be in (0, 1]')
    print(study_table(f.models, f.base_steps, f.steps, f.lr_factor, compare,
                      [int(s) for s in f.seeds], f.workdir_root, f.runs_dir, f.results))

  from dsnet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  app.run(cli.main_errors(main, study.StudyError))
