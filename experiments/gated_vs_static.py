"""Table 2: does the gated model beat the static routes at the same average MAdds?

From the finished DS-MBNet supernet of table 1 (its seed-0 run), the gate stage (SGS, the
authors' recipe, held to `gate.budget` by dual ascent and calibrated offsets) at several
budgets and seeds; each against the static routes' accuracy-vs-MAdds curve at the cost it
reached (interpolated), and the best random mix of two static routes at that cost. Each model
and supernet step count has its own section and plot.

    python experiments/gated_vs_static.py --model=ds_mbnet --steps=1000 \
        --budgets=0.3,0.4,0.55 --seeds=0,1 --workdir_root=workdir/study
"""
from __future__ import annotations

import pathlib

import study

from dsnet_jax import huge_pages

SECTION = 'gated-vs-static'


def table(records_by_budget) -> str:
  lines = ['| budget | seeds | achieved MAdds (M) | gated | static at that cost | gated - static '
           '| best static mix | gated - mix | routes (seed 0) |',
           '|---|---|---|---|---|---|---|---|---|']
  for budget, records in records_by_budget.items():
    gated = [r['gated'] for r in records]
    n = len(gated)
    gain = study.mean_spread(g['gain'] for g in gated)
    over_mix = study.mean_spread(g['gain_over_mix'] for g in gated)
    lines.append(
        f'| {budget:g} | {n} | {study.mean_spread(g["madds"] for g in gated)[0] / 1e6:.3f} | '
        f'{study.percent(*study.mean_spread(g["accuracy"] for g in gated), n)} | '
        f'{study.percent(*study.mean_spread(g["static_accuracy"] for g in gated), n)} | '
        f'{study.signed(*gain, n)} | '
        f'{study.percent(*study.mean_spread(g["best_static_mix"] for g in gated), n)} | '
        f'{study.signed(*over_mix, n)} | {gated[0]["route_histogram"]} |')
  return '\n'.join(lines)


def plot(records_by_budget, path, title: str):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  first = next(iter(records_by_budget.values()))[0]
  curve = sorted(first['routes'], key=lambda r: r['madds'])
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  ax.plot([r['madds'] / 1e6 for r in curve], [100 * r['accuracy'] for r in curve], 'o-',
          color='gray', label='static routes')
  for budget, records in records_by_budget.items():
    ax.plot([r['gated']['madds'] / 1e6 for r in records],
            [100 * r['gated']['accuracy'] for r in records], '*', markersize=11,
            label=f'gated, budget {budget:g}')
  ax.set_xlabel('average MAdds per image (M, gate included)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  study.save_plot(fig, path)


def study_table(model_name: str, steps: int, budgets, seeds, workdir_root: str, runs_dir: str,
                results: str) -> str:
  """Runs what is missing, writes the section (and its plot) into `results`; its markdown."""
  records = {b: [study.gate_run(model_name, steps, b, s, workdir_root, runs_dir) for s in seeds]
             for b in budgets}
  plot_path = pathlib.Path(results).with_name(f'gated_vs_static_{model_name}_s{steps}.png')
  plot(records, plot_path, f'{model_name}: the gate at {len(budgets)} budgets, '
       f'{len(seeds)} seed(s) each')
  first = records[budgets[0]][0]
  text = (f'## 2. Gated vs static: {model_name}, {steps}-step supernet\n\nThe gate stage '
          f'({study.CONFIGS[model_name]}, its gate recipe) from the table-1 supernet '
          f'({steps} steps, seed 0), held to '
          "`gate.budget` (a fraction of 'largest''s MAdds); accuracy on the test split, mean ± "
          'half the spread over the gate seeds; "static": the static routes\' curve at the '
          'cost reached (interpolated); "mix": the best random mix of two static routes at '
          'that cost; routes: how many of the 10,000 test images each route served.\n\n' +
          table(records) +
          f'\n\nWall time of one gate run: {first["wall_seconds"]:.0f} s. Command (first run):'
          f'\n\n```\n{first["command"]}\n```\n\n![gated vs static]({plot_path.name})\n\n'
          + study.regenerated_by('gated_vs_static.py', model=model_name, steps=steps,
                                 budgets=[f'{b:g}' for b in budgets], seeds=seeds))
  study.write_section(f'{SECTION}-{model_name}-s{steps}', text, results)
  return text


if __name__ == '__main__':
  huge_pages.relaunch()
  from absl import app, flags
  flags.DEFINE_string('model', 'ds_mbnet', f'One of {", ".join(study.CONFIGS)}.')
  flags.DEFINE_integer('steps', 1000, 'Stage I steps of the table-1 supernet to start from.')
  flags.DEFINE_list('budgets', ['0.3', '0.4', '0.55'], "gate.budget (fractions of 'largest').")
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of the gate stage.')
  study.define_path_flags()

  def main(argv):
    del argv
    study.quiet()
    f = flags.FLAGS
    study.check_flags(models=[f.model], seeds={'seeds': f.seeds},
                      budgets={'budgets': f.budgets}, results=f.results,
                      steps=f.steps)
    study.check_budgets(f.model, [float(b) for b in f.budgets])
    print(study_table(f.model, f.steps, [float(b) for b in f.budgets],
                      [int(s) for s in f.seeds], f.workdir_root, f.runs_dir, f.results))

  from dsnet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  app.run(cli.main_errors(main, study.StudyError))
