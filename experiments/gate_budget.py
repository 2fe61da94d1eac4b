"""Stage II at several budgets and seeds from one finished supernet: does the gate land on its
budget, and does it beat the static routes' curve at the same cost?

For each (budget, seed) a workdir `--out/budget{B}_seed{S}` gets copies of the supernet's
finished Stage I and recalibration checkpoints and trains the gate stage alone with
`gate.budget = B` and `seed = S` (the seed of the gate stage: its routing head, batches and
Gumbel noise); everything else is the config's. Prints one row per run and one summary row
per budget (mean and spread over seeds), and writes them to `--out/results.json`.

    python experiments/gate_budget.py --config=configs/ds_mbnet_fmnist.py \
        --supernet_workdir=workdir/ds_mbnet_fmnist --out=workdir/gate_budget \
        --budgets=0.3,0.4,0.55 --seeds=0,1
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsnet_jax import huge_pages, rundir, train_lib  # noqa: E402

UPSTREAM_STAGES = ('supernet', 'recalibrate')


def run_one(config, supernet_workdir: str, workdir: str, budget: float, seed: int
            ) -> dict[str, Any]:
  """The gate stage at `budget` and `seed` in `workdir`; its gated result and the budget."""
  source = rundir.RunDir(supernet_workdir)
  for stage in UPSTREAM_STAGES:
    if not source.status(stage).meta.get('complete'):
      raise FileNotFoundError(f'{source.stage_dir(stage)} holds no finished {stage} stage')
    target = rundir.RunDir(workdir).stage_dir(stage)
    if not os.path.exists(target):
      shutil.copytree(source.stage_dir(stage), target)
  config = copy.deepcopy(config)
  config.stages, config.seed = ('gate',), seed
  config.gate.budget, config.gate.madds_target = budget, 0.0
  gated = train_lib.train_and_evaluate(config, workdir)['gated']
  return {'budget': budget, 'seed': seed, 'budget_madds': gated['budget_madds'],
          'madds': gated['madds'], 'cost_error': gated['madds'] / gated['budget_madds'] - 1,
          'accuracy': gated['accuracy'], 'static_accuracy': gated['static_accuracy'],
          'gain': gated['gain'], 'best_static_mix': gated['best_static_mix'],
          'gain_over_mix': gated['gain_over_mix'], 'route_histogram': gated['route_histogram']}


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per budget: mean and spread (max - min) over seeds of the gains over the interpolated
  static curve and over the best static mix, and the worst cost error."""
  out = []
  for budget in sorted({r['budget'] for r in rows}):
    runs = [r for r in rows if r['budget'] == budget]
    gains = np.array([r['gain'] for r in runs])
    over_mix = np.array([r['gain_over_mix'] for r in runs])
    out.append({'budget': budget, 'seeds': len(runs), 'gain_mean': float(gains.mean()),
                'gain_spread': float(gains.max() - gains.min()),
                'gain_over_mix_mean': float(over_mix.mean()),
                'gain_over_mix_spread': float(over_mix.max() - over_mix.min()),
                'worst_cost_error': max((r['cost_error'] for r in runs), key=abs)})
  return out


def format_table(rows, summary) -> str:
  lines = ['| budget | seed | budget MAdds (M) | achieved (M) | error | gated acc | static acc '
           '(interpolated) | gated - static | best static mix | gated - mix | routes |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  lines += [f'| {r["budget"]:g} | {r["seed"]} | {r["budget_madds"] / 1e6:.3f} | '
            f'{r["madds"] / 1e6:.3f} | {100 * r["cost_error"]:+.2f} % | {r["accuracy"]:.4f} | '
            f'{r["static_accuracy"]:.4f} | {100 * r["gain"]:+.2f} % | '
            f'{r["best_static_mix"]:.4f} | {100 * r["gain_over_mix"]:+.2f} % | '
            f'{r["route_histogram"]} |' for r in rows]
  lines += ['', '| budget | seeds | gated - static: mean | spread | gated - mix: mean | spread '
            '| worst cost error |', '|---|---|---|---|---|---|---|']
  lines += [f'| {s["budget"]:g} | {s["seeds"]} | {100 * s["gain_mean"]:+.2f} % | '
            f'{100 * s["gain_spread"]:.2f} % | {100 * s["gain_over_mix_mean"]:+.2f} % | '
            f'{100 * s["gain_over_mix_spread"]:.2f} % | {100 * s["worst_cost_error"]:+.2f} % |'
            for s in summary]
  return '\n'.join(lines)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  rows = [run_one(f.config, f.supernet_workdir, os.path.join(f.out, f'budget{b}_seed{s}'),
                  float(b), int(s))
          for b in f.budgets for s in f.seeds]
  summary = summarise(rows)
  print(format_table(rows, summary), flush=True)
  with open(os.path.join(f.out, 'results.json'), 'w') as out:
    json.dump({'runs': rows, 'summary': summary}, out, indent=1)


if __name__ == '__main__':
  huge_pages.relaunch()
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'The supernet\'s training config.')
  flags.DEFINE_string('supernet_workdir', None, 'A workdir with finished Stage I and '
                      'recalibration checkpoints.')
  flags.DEFINE_string('out', None, 'Where the per-run workdirs and results.json go.')
  flags.DEFINE_list('budgets', ['0.3', '0.4', '0.55'], 'gate.budget values (config units).')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of the gate stage.')
  flags.mark_flags_as_required(['config', 'supernet_workdir', 'out'])
  from dsnet_jax.tools import cli
  app.run(cli.main_errors(main))
