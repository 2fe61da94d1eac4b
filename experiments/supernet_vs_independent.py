"""Table 1: is every route of a supernet about as good as the same network trained alone?

For each model: the supernet (sandwich rule, in-place bootstrapping, `--steps`, then BN
recalibration) against three networks trained alone (`supernet.train_route`: only that route,
on the labels, same steps and recipe): the smallest route, a middle one and 'largest'; and
'largest' alone for `--long_factor` x the steps (how far the short runs are from converged).

Each model and step count has its own section and plot; a model's convergence section lists
every saved supernet (step count and seed) against 'largest' alone for the same steps and for
`--long_factor` x the steps: how the supernet's 'largest' closes on the long run as training
gets longer.

    python experiments/supernet_vs_independent.py --models=ds_mbnet,ds_vit --steps=1000 \
        --seeds=0,1 --workdir_root=workdir/study
"""
from __future__ import annotations

import json
import pathlib
import re

import study

from dsnet_jax import huge_pages

SECTION = 'supernet-vs-independent'


def alone_name(model_name: str, route: str, steps: int, seed: int) -> str:
  """The run name of `route` of `model_name` trained alone for `steps` with `seed`."""
  return f'{model_name}_alone{route}_s{steps}_seed{seed}'


def records_of(model_name: str, steps: int, long_factor: int, seed: int, workdir_root: str,
               runs_dir: str) -> dict[str, dict]:
  """{'supernet', 'alone_<route>' per compared route, 'long'}: the runs of one seed."""
  records = {'supernet': study.supernet_run(model_name, steps, seed, workdir_root, runs_dir)}
  alone = lambda route, n: study.run(
      alone_name(model_name, route, n, seed), study.CONFIGS[model_name],
      {'seed': seed, 'supernet.steps': n, 'supernet.epochs': 0.0, 'stages': ('supernet',),
       'supernet.train_route': route}, workdir_root, runs_dir)
  for route in study.compared_routes(model_name):
    records[f'alone_{route}'] = alone(route, steps)
  records['long'] = alone('largest', long_factor * steps)
  return records


def table(records, model_name: str, steps: int, long_factor: int) -> tuple[str, list]:
  """Markdown: per compared route, the supernet's and the alone network's accuracy."""
  seeds = len(records)
  lines = [f'**{model_name}** ({study.CONFIGS[model_name]}, {steps} steps, {seeds} seed(s); '
           'accuracy on the test split, mean ± half the spread over seeds)', '',
           '| route | MAdds (M) | supernet | trained alone | supernet - alone |',
           '|---|---|---|---|---|']
  points = []
  for route in study.compared_routes(model_name):
    sup = [study.route_row(r['supernet'], route)['accuracy'] for r in records]
    alone = [study.route_row(r[f'alone_{route}'], route)['accuracy'] for r in records]
    madds = study.route_row(records[0]['supernet'], route)['madds']
    diff = [s - a for s, a in zip(sup, alone)]
    lines.append(f'| {route} | {madds / 1e6:.3f} | {study.percent(*study.mean_spread(sup), seeds)}'
                 f' | {study.percent(*study.mean_spread(alone), seeds)} | '
                 f'{100 * study.mean_spread(diff)[0]:+.2f} |')
    points.append((route, madds, study.mean_spread(alone)[0]))
  long = [study.route_row(r['long'], 'largest')['accuracy'] for r in records]
  sup_largest = [study.route_row(r['supernet'], 'largest')['accuracy'] for r in records]
  lines += ['', f"'largest' trained alone {long_factor}x longer ({long_factor * steps} steps): "
            f'{study.percent(*study.mean_spread(long), seeds)}; the supernet\'s largest is '
            f'{100 * (study.mean_spread(sup_largest)[0] - study.mean_spread(long)[0]):+.2f} '
            'points from it.', '',
            'Wall time (s) per run, seed 0: ' + ', '.join(
                f'{k} {records[0][k]["wall_seconds"]:.0f}' for k in records[0]), '',
            'Commands (seed 0):', '', '```'] + [records[0][k]['command'] for k in records[0]] + [
            '```']
  return '\n'.join(lines), points


def convergence(model_name: str, long_factor: int, runs_dir: str) -> str:
  """Markdown: every saved supernet run of `model_name` (step count and seed), its 'largest'
  against 'largest' alone for the same steps and for `long_factor` x the steps ('not run':
  no record of that run yet)."""
  runs = pathlib.Path(runs_dir)

  def largest(path: pathlib.Path):
    return (study.route_row(json.loads(path.read_text()), 'largest')['accuracy']
            if path.exists() else None)

  rows = []
  for path in runs.glob(f'{model_name}_supernet_s*_seed*.json'):
    match = re.fullmatch(rf'{re.escape(model_name)}_supernet_s(\d+)_seed(\d+)\.json', path.name)
    if not match:  # Another run's record (a variant tag starting with 's', a copy, ...).
      continue
    steps, seed = int(match[1]), int(match[2])
    alone = [largest(runs / f'{alone_name(model_name, "largest", n, seed)}.json')
             for n in (steps, long_factor * steps)]
    rows.append((steps, seed, largest(path), *alone))
  rows.sort(key=lambda row: row[:2])  # By step count, then seed.
  cell = lambda accuracy: 'not run' if accuracy is None else f'{100 * accuracy:.2f}'
  gap = lambda sup, alone: '' if alone is None else f'{100 * (sup - alone):+.2f}'
  lines = ["| Stage I steps | seed | supernet 'largest' | 'largest' alone, same steps | "
           f"supernet - alone | 'largest' alone, {long_factor}x the steps | supernet - long |",
           '|---|---|---|---|---|---|---|']
  lines += [f'| {steps} | {seed} | {cell(sup)} | {cell(same)} | {gap(sup, same)} | {cell(long)} | '
            f'{gap(sup, long)} |' for steps, seed, sup, same, long in rows]
  return '\n'.join(lines)


def plot(records, points, model_name: str, path):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  curve = sorted(records[0]['supernet']['routes'], key=lambda r: r['madds'])
  accs = [[study.route_row(r['supernet'], c['route'])['accuracy'] for r in records]
          for c in curve]
  ax.plot([c['madds'] / 1e6 for c in curve], [100 * sum(a) / len(a) for a in accs], 'o-',
          label='supernet routes')
  ax.plot([p[1] / 1e6 for p in points], [100 * p[2] for p in points], 's', color='C3',
          label='trained alone')
  ax.set_title(model_name, fontsize=9)
  ax.set_xlabel('MAdds (M)')
  ax.set_ylabel('test accuracy (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  study.save_plot(fig, path)


def study_table(models, steps: int, long_factor: int, seeds, workdir_root: str, runs_dir: str,
                results: str) -> str:
  """Runs what is missing, writes each model's section (and plot) into `results`; their
  markdown."""
  sections = []
  for model_name in models:
    records = [records_of(model_name, steps, long_factor, seed, workdir_root, runs_dir)
               for seed in seeds]
    text, points = table(records, model_name, steps, long_factor)
    plot_path = pathlib.Path(results).with_name(
        f'supernet_vs_independent_{model_name}_s{steps}.png')
    plot(records, points, model_name, plot_path)
    written_by = study.regenerated_by('supernet_vs_independent.py', models=model_name,
                                      steps=steps, long_factor=long_factor, seeds=seeds)
    text = (f'## 1. Supernet routes vs the same networks trained alone: {model_name}, {steps} '
            f'steps\n\n{text}\n\n![supernet vs alone]({plot_path.name})\n\n{written_by}')
    series = (f'## 1. How long the supernet takes: {model_name}\n\nHow long it takes for the '
              "supernet's 'largest' to come within 1 point of the same network trained alone "
              f'{long_factor}x longer. Every step count and seed with a saved supernet, against '
              f"'largest' alone for the same steps and for {long_factor}x the steps:\n\n"
              f'{convergence(model_name, long_factor, runs_dir)}\n\n{written_by}')
    study.write_section(f'{SECTION}-{model_name}-s{steps}', text, results)
    study.write_section(f'{SECTION}-{model_name}-convergence', series, results)
    sections += [text, series]
  return '\n\n'.join(sections)


if __name__ == '__main__':
  huge_pages.relaunch()
  from absl import app, flags
  flags.DEFINE_list('models', ['ds_mbnet', 'ds_vit'], f'Any of {", ".join(study.CONFIGS)}.')
  flags.DEFINE_integer('steps', 1000, 'Stage I steps of every run (the long run: x long_factor).')
  flags.DEFINE_integer('long_factor', 3, 'How much longer the long run of largest trains.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds: every run once per seed.')
  study.define_path_flags()

  def main(argv):
    del argv
    study.quiet()
    f = flags.FLAGS
    study.check_flags(models=f.models, seeds={'seeds': f.seeds}, results=f.results, steps=f.steps,
                      long_factor=f.long_factor)
    print(study_table(f.models, f.steps, f.long_factor, [int(s) for s in f.seeds],
                      f.workdir_root, f.runs_dir, f.results))

  from dsnet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  app.run(cli.main_errors(main, study.StudyError))
