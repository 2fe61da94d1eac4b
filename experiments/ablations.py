"""Table 3: does each training ingredient help? Stage I variants against the supernet of
table 1 (in-place bootstrapping, IB), same steps and seeds:
- labels: every route learns the labels (`supernet.inplace_bootstrapping=False`);
- IEB: the smallest route learns the ensemble of the teachers (`supernet.ensemble_ib`);
- MvCo (DS-ViT): two augmented views, the teacher averaged over them (`supernet.mvco`);
and the gate stage without SGS (only the task CE and the budget: `gate.gate_ce_weight=0`)
against table 2's gate at the same budget. Each model and step count has its own section.

    python experiments/ablations.py --steps=1000 --seeds=0,1 --workdir_root=workdir/study
"""
from __future__ import annotations

import study

from dsnet_jax import huge_pages

SECTION = 'ablations'
VARIANTS = {  # name: (models it applies to, Stage I overrides); 'IB' is table 1's supernet.
    'IB': (('ds_mbnet', 'ds_vit', 'tiny'), {}),
    'labels': (('ds_mbnet', 'tiny'), {'supernet.inplace_bootstrapping': False}),
    'IEB': (('ds_mbnet', 'tiny'), {'supernet.ensemble_ib': True}),
    'MvCo': (('ds_vit', 'tiny'), {'supernet.mvco': True, 'data.views': 2}),
}
NO_SGS = {'gate.gate_ce_weight': 0.0}  # The gate learns from the task CE and the budget only.


def stage_one_table(model_name: str, records_by_variant) -> str:
  routes = study.compared_routes(model_name)
  lines = [f'**{model_name}** ({study.CONFIGS[model_name]})', '',
           '| variant | seeds | ' + ' | '.join(f'route {r}' for r in routes) +
           ' | mean over all routes | vs IB |', '|---|---|' + '---|' * (len(routes) + 2)]
  base = None
  for variant, records in records_by_variant.items():
    n = len(records)
    cells = [study.percent(*study.mean_spread(study.route_row(r, route)['accuracy']
                                              for r in records), n) for route in routes]
    mean = study.mean_spread(sum(x['accuracy'] for x in r['routes']) / len(r['routes'])
                             for r in records)
    base = mean[0] if base is None else base
    lines.append(f'| {variant} | {n} | ' + ' | '.join(cells) +
                 f' | {study.percent(*mean, n)} | {100 * (mean[0] - base):+.2f} |')
  return '\n'.join(lines)


def sgs_table(with_sgs, without) -> str:
  lines = ['| gate | seeds | achieved MAdds (M) | gated | gated - static | gated - mix |',
           '|---|---|---|---|---|---|']
  for label, records in (("SGS (the authors')", with_sgs), ('no SGS: task CE + budget', without)):
    gated = [r['gated'] for r in records]
    n = len(gated)
    gain, mix = (study.mean_spread(g[k] for g in gated) for k in ('gain', 'gain_over_mix'))
    lines.append(f'| {label} | {n} | {study.mean_spread(g["madds"] for g in gated)[0] / 1e6:.3f}'
                 f' | {study.percent(*study.mean_spread(g["accuracy"] for g in gated), n)} | '
                 f'{study.signed(*gain, n)} | {study.signed(*mix, n)} |')
  return '\n'.join(lines)


def study_table(models, steps: int, seeds, gate_model: str, gate_budget: float, gate_seeds,
                workdir_root: str, runs_dir: str, results: str) -> str:
  """Runs what is missing, writes each model's section and the SGS section into `results`;
  their markdown."""
  sections = []
  for model_name in models:
    variants = {v: [study.supernet_run(model_name, steps, s, workdir_root, runs_dir,
                                       '' if v == 'IB' else v, **overrides) for s in seeds]
                for v, (applies, overrides) in VARIANTS.items() if model_name in applies}
    sections.append((f'{SECTION}-{model_name}-s{steps}', (
        f'## 3. Ablations: {model_name}, {steps} steps\n\nAccuracy on the test split, mean ± '
        f'half the spread over seeds; Stage I {steps} steps. IB: in-place bootstrapping (the '
        'default); labels: every route learns the labels; IEB: the smallest route learns the '
        "ensemble of the teachers; MvCo: two views, the teacher averaged over them; vs IB: the "
        "variant's mean over all routes minus IB's, in points.\n\n"
        + stage_one_table(model_name, variants) + '\n\n' + study.regenerated_by(
            'ablations.py', models=model_name, steps=steps, seeds=seeds, gate_model="''"))))
  if gate_model:
    runs = {tag: [study.gate_run(gate_model, steps, gate_budget, s, workdir_root, runs_dir,
                                 tag, **overrides) for s in gate_seeds]
            for tag, overrides in (('', {}), ('nosgs', NO_SGS))}
    sections.append((f'{SECTION}-sgs-{gate_model}-s{steps}', (
        f'## 3. Ablation of SGS: {gate_model}, {steps}-step supernet\n\nThe gate at budget '
        f'{gate_budget:g} from the table-1 supernet ({steps} steps, seed 0), with and without '
        'sandwich gate sparsification; accuracy on the test split, mean ± half the spread over '
        'the gate seeds.\n\n' + sgs_table(runs[''], runs['nosgs']) + '\n\n' + study.regenerated_by(
            'ablations.py', models="''", steps=steps, gate_model=gate_model,
            gate_budget=f'{gate_budget:g}', gate_seeds=gate_seeds))))
  for name, text in sections:
    study.write_section(name, text, results)
  return '\n\n'.join(text for _, text in sections)


if __name__ == '__main__':
  huge_pages.relaunch()
  from absl import app, flags
  flags.DEFINE_list('models', ['ds_mbnet', 'ds_vit'], f'Any of {", ".join(study.CONFIGS)}.')
  flags.DEFINE_integer('steps', 1000, 'Stage I steps (as table 1).')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of each Stage I variant.')
  flags.DEFINE_string('gate_model', 'ds_mbnet', 'The model of the SGS ablation ("": none).')
  flags.DEFINE_float('gate_budget', 0.4, 'The budget of the SGS ablation.')
  flags.DEFINE_list('gate_seeds', ['0', '1'], 'Seeds of the SGS ablation.')
  study.define_path_flags()

  def main(argv):
    del argv
    study.quiet()
    f = flags.FLAGS
    gate = bool(f.gate_model)
    study.check_flags(models=f.models + [f.gate_model] * gate, results=f.results,
                      seeds={'seeds': f.seeds, **({'gate_seeds': f.gate_seeds} if gate else {})},
                      budgets={'gate_budget': [f.gate_budget]} if gate else None, steps=f.steps)
    if gate:
      study.check_budgets(f.gate_model, [f.gate_budget])
    print(study_table(f.models, f.steps, [int(s) for s in f.seeds], f.gate_model,
                      f.gate_budget, [int(s) for s in f.gate_seeds], f.workdir_root,
                      f.runs_dir, f.results))

  from dsnet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  app.run(cli.main_errors(main, study.StudyError))
