"""Table 5: which router pays? On one supernet per model, at the same budgets: the static
routes' curve, the best random mix of two routes, the learned gate (the gate stage, as table 2)
and escalation on the cheapest route's own confidence (two and three levels, and the chain
'auto' picks; calibrated on the last training images), with the oracle's headroom and the
lowest budget at which each router reaches 'largest''s accuracy.

    python experiments/which_router.py --model=ds_mbnet --steps=1000 \
        --budgets=0.3,0.4,0.55 --seeds=0 --workdir_root=workdir/study

The supernets are table 1's recipe trained again (variant 'routers': their workdirs are kept,
escalation reads them). Escalation has no randomness of its own: its seeds are the supernet's.
A record per supernet (`<model>_routers_s<steps>_seed<seed>.json`) holds every escalation
number, so the section regenerates from the records alone.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import study

from dsnet_jax import config_lib, errors, escalation, eval_lib, huge_pages, routers, rundir
from dsnet_jax.data import input_pipeline
from dsnet_jax.models import get_model

SECTION = 'routers'
VARIANT = 'routers'
# Budgets (fractions of 'largest') tried for "the lowest budget that reaches 'largest'".
GRID = np.round(np.arange(0.05, 1.0001, 0.01), 2)


def chains(space) -> dict[str, tuple[str, ...]]:
  """The two- and three-level chains of a routing space: its ends, and its ends with the
  route in the middle."""
  out = {'2 levels': (space[0], space[-1])}
  if len(space) > 2:
    out['3 levels'] = (space[0], space[len(space) // 2], space[-1])
  return out


def measure(model_name: str, steps: int, seed: int, budgets, calibration_examples: int,
            workdir_root: str, runs_dir: str) -> dict:
  """Escalation on the 'routers' supernet of `model_name` (trained if missing): per chain and
  budget, thresholds fitted on the last `calibration_examples` training images, measured on
  the test split; and fitted on the test split's first half, measured on its second half
  (images Stage I never saw). Read from its record when there is one."""
  name = f'{model_name}_routers_s{steps}_seed{seed}'
  path = pathlib.Path(runs_dir) / f'{name}.json'
  settings = {'name': name, 'budgets': [float(b) for b in budgets],
              'calibration_examples': calibration_examples}
  if path.exists():
    record = json.loads(path.read_text())
    differ = [k for k, v in settings.items() if record.get(k) != v]
    if differ:
      raise study.StudyError(f'{path} records another measurement ({", ".join(differ)} '
                             'differ); delete it to measure again')
    return record
  supernet = study.supernet_run(model_name, steps, seed, workdir_root, runs_dir, VARIANT)
  start = time.perf_counter()
  workdir = os.path.join(workdir_root, study.supernet_name(model_name, steps, seed, VARIANT))
  config = rundir.saved_config(rundir.RunDir(workdir).latest_stage_dir())
  config.num_devices = study.configured(study.CONFIGS[model_name]).num_devices
  loaded, pipeline, mesh = eval_lib.restore_workdir(config, workdir, with_escalation=False)
  model, variables = loaded.model, loaded.variables
  data = config_lib.data_spec(config.data)
  held_out = input_pipeline.make(data, 'train', batch_size=config.eval_batch_size, train=False,
                                 examples=(-calibration_examples, None))
  seen = routers.route_signals(model, variables, held_out, mesh)
  test = routers.route_signals(model, variables, pipeline, mesh)
  rows = supernet['routes']
  space = [r.name for r in model.routes.routing_space]
  half = len(test['correct']) // 2
  first, second = ({k: v[:half] for k, v in test.items()}, {k: v[half:] for k, v in test.items()})
  largest = study.route_row(supernet, 'largest')['madds']
  results = {}
  for label, chain in {**chains(space), 'auto': escalation.AUTO}.items():
    per_budget = {}
    # 'auto' tries every chain at each budget: the table's budgets only (the grid would
    # calibrate every chain a hundred times).
    for budget in [*budgets, *(GRID if chain != escalation.AUTO else ())]:
      key = f'{budget:g}'
      try:
        candidates = eval_lib.escalation_candidates(model, pipeline.image_shape, chain,
                                                    budget * largest, 'madds')
      except errors.BudgetError:
        continue
      if key in per_budget:
        continue
      fitted = {where: routers.fit_escalation(signals, space, candidates)[0]
                for where, signals in (('seen', seen), ('unseen', first))}
      costs = escalation.level_costs(model, fitted['seen'].chain, pipeline.image_shape)
      on_test = routers.escalation_result(test, space, fitted['seen'], costs, rows)
      unseen_costs = escalation.level_costs(model, fitted['unseen'].chain, pipeline.image_shape)
      per_budget[key] = {
          'chain': list(fitted['seen'].chain),
          'accuracy': on_test['accuracy'], 'madds': on_test['madds'],
          'static_accuracy': on_test['static_accuracy'],
          'best_static_mix': on_test['best_static_mix'], 'stops': on_test['stops'],
          'miss_seen_second_half': _cost(second, space, fitted['seen'], costs) / (
              budget * largest) - 1,
          'miss_unseen_second_half': _cost(second, space, fitted['unseen'], unseen_costs) / (
              budget * largest) - 1}
    results[label] = {'chain': list(chain), 'budgets': per_budget}
    if chain != escalation.AUTO:
      ends = escalation.level_costs(model, chain, pipeline.image_shape)[[0, -1]]
      results[label]['oracle'] = routers.oracle(test, space, chain, ends)
  record = {**settings, 'supernet_run': supernet['name'], 'commit': study.git_commit(),
            'wall_seconds': round(time.perf_counter() - start, 1),
            'largest_accuracy': study.route_row(supernet, 'largest')['accuracy'],
            'largest_madds': study.route_row(supernet, 'largest')['madds'],
            'auroc_cheapest_wrong': routers.error_auroc(test, gated=False),
            'escalation': results}
  study.write_atomically(path, json.dumps(record, indent=1))
  return record


def _cost(signals, space, rule, costs) -> float:
  correct, confidence = routers.levels(signals, space, rule.chain, rule.confidence)
  return escalation.simulate(correct, confidence, rule.thresholds, costs)[1]


def lowest_reaching(points: dict[str, dict], target: float) -> str:
  """The lowest budget (key) whose accuracy reaches `target`, or 'none'."""
  reached = [float(b) for b, p in points.items() if p['accuracy'] >= target]
  return f'{min(reached):g}' if reached else 'none'


def table(model_name: str, measured: list[dict], gates: dict[float, list[dict]],
          budgets, targets: dict[str, float], space_rows: list[list[dict]]) -> str:
  """The markdown table of one model: a row per budget, then a row per target accuracy
  ({route: accuracy}, seed 0): the lowest budget at which each router reaches it.
  `space_rows`: per seed, the routing space's routes (what a router can mix)."""
  n = len(measured)
  labels = list(measured[0]['escalation'])
  lines = ['| budget | achieved MAdds (M), gate / ' + ' / '.join(labels) + ' | static curve | '
           'best mix | best mix, routing space | learned gate | ' +
           ' | '.join(f'escalation, {l}' for l in labels) +
           ' | escalation (2 levels) - mix | escalation (auto) - mix | 2 levels\' test cost vs '
           'budget (seen / unseen calibration) |',
           '|---|---|---|---|---|---|' + '---|' * len(labels) + '---|---|---|']
  for budget in budgets:
    key = f'{budget:g}'
    esc = {l: [m['escalation'][l]['budgets'].get(key) for m in measured] for l in labels}
    two = esc[labels[0]]
    gated = [r['gated'] for r in gates[budget]]
    cost = [f'{np.mean([g["madds"] for g in gated]) / 1e6:.3f}'] + [
        f'{np.mean([p["madds"] for p in esc[l]]) / 1e6:.3f}' if all(esc[l]) else '-'
        for l in labels]
    cells = [f'{budget:g}', ' / '.join(cost)]
    if all(two):
      cells += [study.percent(*study.mean_spread(p['static_accuracy'] for p in two), n),
                study.percent(*study.mean_spread(p['best_static_mix'] for p in two), n),
                study.percent(*study.mean_spread(
                    routers.best_static_mix_at(rows, p['madds'])
                    for rows, p in zip(space_rows, two)), n)]
    else:
      cells += ['-', '-', '-']
    cells.append(study.percent(*study.mean_spread(g['accuracy'] for g in gated), len(gated)))
    cells += [study.percent(*study.mean_spread(p['accuracy'] for p in esc[l]), n)
              if all(esc[l]) else 'cannot spend it' for l in labels]
    for label in (labels[0], 'auto'):
      cells.append(study.signed(*study.mean_spread(p['accuracy'] - p['best_static_mix']
                                                   for p in esc[label]), n)
                   if all(esc[label]) else '-')
    cells.append(' / '.join(f'{100 * np.mean([p[k] for p in two]):+.1f} %' for k in
                            ('miss_seen_second_half', 'miss_unseen_second_half'))
                 if all(two) else '-')
    lines.append('| ' + ' | '.join(cells) + ' |')
  for route, target in targets.items():
    gate_reach = [f'{b:g}' for b in budgets if gates[b][0]['gated']['accuracy'] >= target]
    reach = [f"lowest budget reaching route {route}'s {100 * target:.2f} % (seed 0)", '', '', '',
             '',
             gate_reach[0] if gate_reach else f'none of {", ".join(f"{b:g}" for b in budgets)}',
             *(lowest_reaching(measured[0]['escalation'][l]['budgets'], target) for l in labels),
             '', '', '']
    lines.append('| ' + ' | '.join(reach) + ' |')
  return '\n'.join(lines)


def study_table(model_name: str, steps: int, budgets, seeds, calibration_examples: int,
                workdir_root: str, runs_dir: str, results: str) -> str:
  """Trains and measures what is missing, writes the model's section into `results`; its
  markdown."""
  measured = [measure(model_name, steps, s, budgets, calibration_examples, workdir_root,
                      runs_dir) for s in seeds]
  gates = {b: [study.gate_run(model_name, steps, b, s, workdir_root, runs_dir, VARIANT,
                              supernet_variant=VARIANT) for s in seeds] for b in budgets}
  first = measured[0]
  auroc = ', '.join(f'{k} {v:.3f}' for k, v in first['auroc_cheapest_wrong'].items())
  oracle = '; '.join(
      f'{l} ({" -> ".join(e["chain"])}): {100 * e["oracle"]["accuracy"]:.2f} % at '
      f'{e["oracle"]["madds"] / 1e6:.3f} M' for l, e in first['escalation'].items()
      if 'oracle' in e)
  chosen = ', '.join(f'{b}: {" -> ".join(p["chain"])}'
                     for b, p in first['escalation']['auto']['budgets'].items())
  supernet = study._read_record(  # pylint: disable=protected-access
      pathlib.Path(runs_dir) / f'{first["supernet_run"]}.json', {})
  widest = first['escalation']['2 levels']['chain'][-1]
  targets = {'largest': first['largest_accuracy'],
             widest: study.route_row(supernet, widest)['accuracy']}
  config = study.configured(study.CONFIGS[model_name])
  space = [r.name for r in get_model(config.model_name, **config.model).routes.routing_space]
  space_rows = [[r for r in study._read_record(  # pylint: disable=protected-access
      pathlib.Path(runs_dir) / f'{m["supernet_run"]}.json', {})['routes'] if r['route'] in space]
                for m in measured]
  text = (f'## 5. Which router pays: {model_name}, {steps}-step supernet\n\n'
          f'One supernet per seed ({study.CONFIGS[model_name]}, {steps} Stage I steps: table '
          "1's recipe, trained again with its workdir kept); the gate stage at each budget "
          'from it (as table 2); escalation on the cheapest route\'s max softmax, thresholds '
          f'fitted on the last {calibration_examples} training images (which Stage I trained '
          "on) to spend the budget (a fraction of 'largest''s MAdds) on average. Accuracy on "
          'the test split, mean ± half the spread over the seeds; "static": the static '
          'routes\' curve at escalation\'s cost; "mix": the best random mix of two routes at '
          "that cost ('largest' included, which no router can run: it is wider before the gate), "
          'and of two routes of the routing space. The last column: how far the test split\'s '
          'second half lands from the budget when the thresholds are fitted on the training '
          'images (seen) or on the test split\'s first half (unseen). The last rows: the lowest '
          "budget (on a grid of 0.01) at which each router reaches 'largest''s accuracy and that "
          "of the routing space's widest route (the most a chain can run).\n\n" +
          table(model_name, measured, gates, budgets, targets, space_rows) +
          f"\n\n'largest': {100 * first['largest_accuracy']:.2f} % at "
          f"{first['largest_madds'] / 1e6:.3f} M. Oracle escalation (exactly the images the "
          f'cheapest route gets wrong and the last right): {oracle}. AUROC of "the cheapest '
          f'route is wrong" on the test split: {auroc}. The chains \'auto\' chose on the '
          f'held-out training images (seed 0): {chosen}. Wall time: supernet '
          f'{supernet["wall_seconds"]:.0f} s, one gate run '
          f'{gates[budgets[0]][0]["wall_seconds"]:.0f} s, escalation (every budget, both '
          f'chains) {first["wall_seconds"]:.0f} s. Supernet command (seed {seeds[0]}):\n\n```\n'
          f'{supernet["command"]}\n```\n\n' +
          study.regenerated_by('which_router.py', model=model_name, steps=steps,
                               budgets=[f'{b:g}' for b in budgets], seeds=seeds))
  study.write_section(f'{SECTION}-{model_name}-s{steps}', text, results)
  return text


if __name__ == '__main__':
  huge_pages.relaunch()
  from absl import app, flags
  flags.DEFINE_string('model', 'ds_mbnet', f'One of {", ".join(study.CONFIGS)}.')
  flags.DEFINE_integer('steps', 1000, 'Stage I steps of each supernet.')
  flags.DEFINE_list('budgets', ['0.3', '0.4', '0.55'], "Fractions of 'largest''s MAdds.")
  flags.DEFINE_list('seeds', ['0'], 'Seeds of the supernet (and its gate stages).')
  flags.DEFINE_integer('calibration_examples', 5000, 'The last training images escalation '
                       'is calibrated on.')
  study.define_path_flags()

  def main(argv):
    del argv
    study.quiet()
    f = flags.FLAGS
    study.check_flags(models=[f.model], seeds={'seeds': f.seeds},
                      budgets={'budgets': f.budgets}, results=f.results, steps=f.steps,
                      calibration_examples=f.calibration_examples)
    study.check_budgets(f.model, [float(b) for b in f.budgets])
    print(study_table(f.model, f.steps, [float(b) for b in f.budgets],
                      [int(s) for s in f.seeds], f.calibration_examples, f.workdir_root,
                      f.runs_dir, f.results))

  from dsnet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  app.run(cli.main_errors(main, study.StudyError))
