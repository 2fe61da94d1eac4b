"""Evaluation: every route's accuracy/MAdds/params, the gated model, JSON and a plot."""
from __future__ import annotations

import functools
import itertools
import json
import os
from typing import Any, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax import config_lib, errors, routers, sharding
from dsnet_jax import escalation as escalation_lib
from dsnet_jax import latency as latency_lib
from dsnet_jax import rundir as rundir_lib
from dsnet_jax.complexity import route_complexity
from dsnet_jax.data import input_pipeline
from dsnet_jax.progress import say


ROUTES_FILE = 'routes.npy'  # Each evaluation example's routing index (gated models).


@functools.partial(jax.jit, static_argnames=('model', 'route'))
def _route_counts(model, variables, batch, route):
  """(correct, real examples) of one padded batch."""
  logits = model.apply(variables, batch['image'], route=route)
  return ((jnp.argmax(logits, -1) == batch['label']) & batch['mask']).sum(), batch['mask'].sum()


@functools.partial(jax.jit, static_argnames='model')
def _gated_counts(model, variables, batch):
  """Argmax routing (deterministic) through the masked path: (correct, examples per route,
  each example's routing index)."""
  logits, _, weights = model.apply_gated(variables, batch['image'])
  correct = ((jnp.argmax(logits, -1) == batch['label']) & batch['mask']).sum()
  return (correct, (weights * batch['mask'][:, None]).sum(0).astype(jnp.int32),
          jnp.argmax(weights, -1).astype(jnp.int32))


def _eval_batches(pipeline, mesh):
  for batch in pipeline.batches():
    yield sharding.global_batch(batch, mesh)


def route_accuracy(model, variables, pipeline, route, mesh) -> float:
  counts = [_route_counts(model, variables, b, route=route) for b in _eval_batches(pipeline, mesh)]
  correct, total = np.asarray(jax.device_get(counts)).sum(0)
  return float(correct) / float(total)


def gated_result(model, variables, pipeline, mesh) -> dict[str, Any]:
  """Accuracy, average MAdds (gate included), route histogram of the gated model, and
  `routing_indices`: each evaluation example's routing index, in the split's order (int32)."""
  space = model.routes.routing_space
  madds = model.routing_madds(pipeline.image_shape)
  correct, counts, indices = 0, np.zeros(len(space), np.int64), []
  for batch in _eval_batches(pipeline, mesh):
    c, h, i = _gated_counts(model, variables, batch)
    correct, counts = correct + int(c), counts + np.asarray(h)
    i, mask = sharding.gather(i, batch['mask'])
    indices.append(i[mask.astype(bool)])
  total = int(counts.sum())
  return {'accuracy': correct / total, 'madds': float(counts @ madds / total),
          'route_histogram': {r.name: int(c) for r, c in zip(space, counts)},
          'routing_indices': np.concatenate(indices)}


def route_results(model, variables, pipeline, mesh) -> list[dict[str, Any]]:
  """Accuracy, MAdds and parameters of every route; a progress line per route."""
  rows = []
  for i, route in enumerate(model.routes):
    c = route_complexity(model, route, pipeline.image_shape)
    rows.append({'route': route.name, 'accuracy': route_accuracy(model, variables, pipeline,
                                                                 route, mesh),
                 'madds': c.madds, 'params': c.params})
    say(f'[eval] route {route.name} ({i + 1}/{len(model.routes)}): accuracy '
        f'{rows[-1]["accuracy"]:.4f}')
  return rows


def compare_with_static(rows, gated: dict[str, Any], budget_meta: dict[str, float] | None = None
                        ) -> dict[str, Any]:
  """`gated` plus 'static_accuracy' (the static curve at the gated model's cost), 'gain' (the
  gated accuracy minus it), 'best_static_mix' and 'gain_over_mix' (the same against the
  best random mix of two static routes) and the budget ({'budget_madds' or 'budget_ms': value}
  as the gate checkpoint's meta holds it)."""
  return {**gated, **routers.against_static(rows, gated['accuracy'], gated['madds']),
          **(budget_meta or {})}


def calibrated_budget(meta: dict[str, Any]) -> dict[str, float]:
  """The budget a gate checkpoint's offsets were calibrated for: {} or {'budget_<unit>': v}."""
  return {k: meta[k] for k in ('budget_madds', 'budget_ms') if meta.get(k)}


def add_latency(rows, gated, latency: dict[str, Any]) -> None:
  """Adds measured ms/image ({batch size: median}) to the rows of routes the latency table
  timed, and to the gated result the mix-weighted times of its routes (its own route mix)."""
  timed = latency['routes']
  for row in rows:
    if row['route'] in timed:
      row['ms_per_image'] = {b: t['median'] for b, t in timed[row['route']]['ms_per_image'].items()}
  if gated and all(name in timed for name in gated['route_histogram']):
    total = sum(gated['route_histogram'].values())
    gated['ms_per_image'] = {
        b: sum(count / total * timed[name]['ms_per_image'][b]['median']
               for name, count in gated['route_histogram'].items())
        for b in map(str, latency['batch_sizes'])}


def format_report(rows, gated, latency: dict[str, Any] | None = None) -> str:
  sizes = [str(b) for b in latency['batch_sizes']] if latency else []
  ms = lambda row: ''.join(f'  {row["ms_per_image"][b]:>9.3g}' if 'ms_per_image' in row
                           else f'  {"-":>9}' for b in sizes)
  lines = [f'{"route":>8}  {"accuracy":>8}  {"MAdds (M)":>9}  {"params (M)":>10}'
           + ''.join(f'  {"ms/img @" + b:>9}' for b in sizes)]
  lines += [f'{r["route"]:>8}  {r["accuracy"]:>8.4f}  {r["madds"] / 1e6:>9.3f}  '
            f'{r["params"] / 1e6:>10.4f}' + ms(r) for r in rows]
  if gated:
    lines.append(f'{"gated":>8}  {gated["accuracy"]:>8.4f}  {gated["madds"] / 1e6:>9.3f}  '
                 f'{"":>10}' + ms(gated) + f'  routes {gated["route_histogram"]}')
    lines.append(f'static routes at {gated["madds"] / 1e6:.3f} M MAdds (interpolated): '
                 f'{gated["static_accuracy"]:.4f}; gated - static: {100 * gated["gain"]:+.2f} %; '
                 f'best random mix of two routes: {gated["best_static_mix"]:.4f} (gated - mix: '
                 f'{100 * gated["gain_over_mix"]:+.2f} %)')
    if gated.get('budget_madds'):
      budget = gated['budget_madds']
      lines.append(f'budget {budget / 1e6:.3f} M MAdds, achieved {gated["madds"] / 1e6:.3f} M '
                   f'({100 * (gated["madds"] / budget - 1):+.2f} %)')
    if gated.get('budget_ms'):
      budget, batch = gated['budget_ms'], str(latency['batch_sizes'][-1]) if latency else ''
      achieved = gated.get('ms_per_image', {}).get(batch)
      lines.append(f'budget {budget:.4g} ms/img, achieved ' + (
          f'{achieved:.4g} ms/img at batch {batch} ({100 * (achieved / budget - 1):+.2f} %; '
          'its route mix x each route\'s time)' if achieved else
          'unknown (the workdir\'s latency table does not time all of its routes)' if latency
          else 'unknown (no usable latency table in the workdir)'))
  if latency:
    device = latency['device']
    routed = latency['routed']['ms_per_image']
    lines.append(f'ms/img: measured on {device["backend"]} ({device["device_kind"]}, '
                 f'{device["host_cores"]} host cores) on {latency["date"]}, median, batch 1 = '
                 'each image alone; gated = its route mix x each route\'s time; the routed '
                 'model measured there: ' + ', '.join(f'{routed[b]["median"]:.3g} @{b}'
                                                      for b in sizes))
  return '\n'.join(lines)


def plot(rows, gated, path: str, title: str = '', routing: dict[str, Any] | None = None):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  curve = sorted(rows, key=lambda r: r['madds'])
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r['madds'] / 1e6 for r in curve], [100 * r['accuracy'] for r in curve], 'o-',
          label='static routes')
  for r in rows:
    ax.annotate(r['route'], (r['madds'] / 1e6, 100 * r['accuracy']), fontsize=7,
                textcoords='offset points', xytext=(3, -9))
  if gated:
    ax.plot(gated['madds'] / 1e6, 100 * gated['accuracy'], '*', markersize=14,
            label=f'gated ({100 * gated["gain"]:+.2f} % vs static)')
    ax.plot(gated['madds'] / 1e6, 100 * gated['static_accuracy'], 'x', color='gray',
            label='static curve at the gated cost')
    if gated.get('budget_madds'):
      ax.axvline(gated['budget_madds'] / 1e6, color='gray', ls=':', label='budget')
  if routing:
    curve = routing['escalation_curve']
    ax.plot([p['madds'] / 1e6 for p in curve['points']],
            [100 * p['accuracy'] for p in curve['points']], '-', alpha=0.6,
            label=f'escalation {" -> ".join(curve["chain"])} (fitted here)')
    if 'escalation' in routing:
      e = routing['escalation']
      ax.plot(e['madds'] / 1e6, 100 * e['accuracy'], 'P', markersize=11,
              label=f'escalation ({100 * e["gain"]:+.2f} % vs static)')
  ax.set_xlabel('MAdds (M)')
  ax.set_ylabel('accuracy (%)')
  if title:
    ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=120)
  plt.close(fig)


def evaluate_and_report(model, variables, pipeline, mesh, output_dir: str, gated: bool = True,
                        budget_meta: dict[str, float] | None = None,
                        latency: dict[str, Any] | None = None, title: str = '',
                        escalation: escalation_lib.Escalation | None = None) -> dict[str, Any]:
  """Prints the route table, the gated result (when `gated`) and the escalation router's
  (when given) against the static routes' curve and their budgets, what escalation offers as
  a curve over budgets and as an oracle, and how well each signal ranks the cheapest route's
  errors (ms/image from a latency table when given); writes eval.json, eval.png (titled
  `title`) and, for a gated model, routes.npy (each evaluation example's routing index, in
  the split's order) into `output_dir` (local or gs://; process 0 writes)."""
  rows = route_results(model, variables, pipeline, mesh)
  result, routing_indices = None, None
  if gated:
    result = gated_result(model, variables, pipeline, mesh)
    routing_indices = result.pop('routing_indices')
    result = compare_with_static(rows, result, budget_meta)
  if latency:
    add_latency(rows, result, latency)
  routing = router_results(model, variables, pipeline, mesh, rows, gated, escalation)
  say(format_report(rows, result, latency) + '\n' + format_routers(routing))
  report = {'routes': rows, 'gated': result, 'routers': routing}
  if jax.process_index() != 0:
    return report
  output_dir = epath.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / 'eval.json').write_text(json.dumps(report, indent=1))
  if routing_indices is not None:
    with (output_dir / ROUTES_FILE).open('wb') as f:
      np.save(f, routing_indices)
  plot(rows, result, os.fspath(output_dir / 'eval.png'), title, routing)
  return report


def router_results(model, variables, pipeline, mesh, rows, gated: bool,
                   escalation: escalation_lib.Escalation | None) -> dict[str, Any]:
  """Escalation (at its thresholds when given; as a curve over budgets and as an oracle,
  from the cheapest routing-space route to the widest, or along its chain) and the AUROC of
  'the cheapest route is wrong' for the cheapest route's confidences and the gate's logits."""
  signals = routers.route_signals(model, variables, pipeline, mesh)
  space = [r.name for r in model.routes.routing_space]
  chain = escalation.chain if escalation else (space[0], space[-1])
  kind = escalation.confidence if escalation else 'max_softmax'
  ends = escalation_lib.level_costs(model, (chain[0], chain[-1]), pipeline.image_shape)
  out = {'auroc_cheapest_wrong': routers.error_auroc(signals, gated),
         'oracle': {'chain': [chain[0], chain[-1]], **routers.oracle(signals, space, chain, ends)},
         'escalation_curve': {'chain': [chain[0], chain[-1]], 'confidence': kind,
                              'points': routers.escalation_curve(signals, space, chain, kind,
                                                                 ends)}}
  if escalation:
    costs = escalation_lib.level_costs(model, escalation.chain, pipeline.image_shape)
    out['escalation'] = routers.escalation_result(signals, space, escalation, costs, rows)
  return out


def format_routers(routing: dict[str, Any]) -> str:
  lines = []
  if 'escalation' in routing:
    e = routing['escalation']
    lines.append(f'escalation {" -> ".join(e["chain"])} ({e["confidence"]} under '
                 f'{", ".join(f"{t:.4g}" for t in e["thresholds"])}): accuracy '
                 f'{e["accuracy"]:.4f} at {e["madds"] / 1e6:.3f} M MAdds, stops {e["stops"]}; '
                 f'- static: {100 * e["gain"]:+.2f} %, - best mix: {100 * e["gain_over_mix"]:+.2f} %'
                 + (f'; budget {e["budget_madds"] / 1e6:.3f} M ('
                    f'{100 * (e["madds"] / e["budget_madds"] - 1):+.2f} %)'
                    if e.get('budget_madds') else ''))
  o, curve = routing['oracle'], routing['escalation_curve']
  lines.append(f'oracle escalation {" -> ".join(o["chain"])} (exactly the images the first '
               f'gets wrong and the last right): {o["accuracy"]:.4f} at {o["madds"] / 1e6:.3f} M')
  lines.append(f'escalation {" -> ".join(curve["chain"])} on these images: ' + '  '.join(
      f'{p["accuracy"]:.4f}@{p["madds"] / 1e6:.3g}M' for p in curve['points'][::5]))
  lines.append("AUROC of 'the cheapest route is wrong': " + ', '.join(
      f'{name} {value:.3f}' for name, value in routing['auroc_cheapest_wrong'].items()))
  return '\n'.join(lines)


def report_title(model, config, restored) -> str:
  """'<model> on <data set>, <stage> step <n>': what a plot shows."""
  stage = restored.meta.get('stage') or restored.meta.get('source') or 'imported'
  return f'{type(model).__name__} on {config.data.name}, {stage} step {restored.step}'


def eval_pipeline(data: input_pipeline.DataSpec, batch_size: int) -> input_pipeline.Pipeline:
  """The evaluation split's batches of `data` (no training pipeline is built)."""
  return input_pipeline.make(data, input_pipeline.EVAL_SPLITS[data.name], batch_size=batch_size,
                             train=False)


def restore_workdir(config, workdir: str, checkpoint: str = '',
                    allow_config_changes: Sequence[str] = (), with_escalation: bool = True):
  """The latest stage of `workdir` (or the stage folder `checkpoint`), restored for `config`.

  What the checkpoint holds (EMA or raw weights, gated or not, finished or not) is read from
  its meta, never from folder names. Nothing is created.
  Returns:
    (rundir.Loaded, the evaluation pipeline, the mesh).
  Raises:
    FileNotFoundError: no such workdir or checkpoint.
    errors.ConfigMismatchError: `config` differs from the checkpoint's in what defines the
      model (rundir.MODEL_KEYS), except `allow_config_changes`.
    errors.CheckpointMismatchError: the stored arrays do not match the model.
  """
  config_lib.validate(config)
  config_lib.check_key_paths(config, allow_config_changes, '--allow_config_change key')
  config_lib.validate_devices(config, len(jax.devices()), jax.process_count())
  # The stage folder first: a missing workdir fails before the data is read.
  directory = checkpoint or rundir_lib.RunDir(workdir).latest_stage_dir()
  input_pipeline.check_available(config_lib.data_spec(config.data))
  mesh = sharding.make_mesh(config.num_devices or None)
  pipeline = eval_pipeline(config_lib.data_spec(config.data), config.eval_batch_size)
  loaded = rundir_lib.load(checkpoint=directory, config=config,
                           allow_changes=allow_config_changes, mesh=mesh,
                           with_escalation=with_escalation)
  restored = loaded.restored
  say(f'restored {restored.describe()}')
  if not restored.complete:
    say(f'warning: {restored.directory} is unfinished: using step {restored.step} of '
        f'{restored.meta.get("total_steps")} as it is')
  return loaded, pipeline, mesh


def evaluate_workdir(config, workdir: str, checkpoint: str = '',
                     allow_config_changes: Sequence[str] = (),
                     output_dir: str | None = None) -> dict[str, Any]:
  """Restores the latest stage of `workdir` (or the stage folder `checkpoint`) and reports.

  The report (eval.json, eval.png, routes.npy) goes to `output_dir`, by default the evaluated
  checkpoint's own folder (e.g. <workdir>/checkpoints/gate), so evaluating another checkpoint
  never overwrites what training wrote in the workdir. With a latency table (`latency.json`)
  in the workdir, the report gives ms/image beside MAdds.
  Raises: as `restore_workdir`; nothing is created before the restore succeeds.
  """
  loaded, pipeline, mesh = restore_workdir(config, workdir, checkpoint, allow_config_changes)
  restored = loaded.restored
  output_dir = output_dir or restored.directory
  say(f'report -> {output_dir}')
  return evaluate_and_report(loaded.model, loaded.variables, pipeline, mesh, output_dir,
                             gated=restored.gated, budget_meta=calibrated_budget(restored.meta),
                             latency=workdir_latency(workdir, pipeline.image_shape,
                                                     loaded.model) if workdir else None,
                             title=report_title(loaded.model, config, restored),
                             escalation=loaded.escalation)


def escalation_budget(model, image_shape, chain: Sequence[str], budget: float,
                      budget_unit: str = 'largest', confidence: str = 'max_softmax'
                      ) -> tuple[tuple[str, ...], np.ndarray, float]:
  """(chain as route names, MAdds per image of each level, the budget in MAdds) of an
  escalation for `model`, checked before any image is read.

  Raises:
    errors.ConfigError: a route outside the routing space, an unknown unit or confidence;
    errors.BudgetError: a budget the chain cannot spend.
  """
  chain = escalation_lib.checked_chain(model, chain, image_shape)
  escalation_lib.check_confidence(confidence)
  if budget_unit not in ('largest', 'madds'):
    raise errors.ConfigError(f"budget unit {budget_unit!r}: use 'largest' or 'madds'")
  costs = escalation_lib.level_costs(model, chain, image_shape)
  largest = route_complexity(model, model.routes.largest, tuple(image_shape)).madds
  madds = budget * largest if budget_unit == 'largest' else budget
  if not costs[0] <= madds <= costs[-1]:
    raise errors.BudgetError(
        f'budget {budget:g} ({budget_unit}) is {madds / 1e6:.4g} M MAdds per image; escalation '
        f'{" -> ".join(chain)} spends {costs[0] / 1e6:.4g}-{costs[-1] / 1e6:.4g} M (every image '
        'at the first route to every image through every route): choose a budget in that '
        'range or another chain')
  return chain, costs, float(madds)


def escalation_candidates(model, image_shape, chain: Sequence[str], budget: float,
                          budget_unit: str = 'largest', confidence: str = 'max_softmax'
                          ) -> list[tuple[tuple[str, ...], np.ndarray, float]]:
  """`escalation_budget` of the chain, or, for `escalation.AUTO` ('auto'), of every chain of
  two or more routing-space routes (cheapest first) that can spend the budget.

  Raises: as `escalation_budget`; for 'auto', errors.BudgetError when no chain can spend it.
  """
  if tuple(chain) != escalation_lib.AUTO:
    return [escalation_budget(model, image_shape, chain, budget, budget_unit, confidence)]
  space = [r.name for r in model.routes.routing_space]
  found = []
  for levels in range(2, len(space) + 1):
    for candidate in itertools.combinations(space, levels):
      try:
        found.append(escalation_budget(model, image_shape, candidate, budget, budget_unit,
                                       confidence))
      except errors.BudgetError:
        continue
  if not found:  # The widest range any chain spends: the cheapest route to all of them.
    escalation_budget(model, image_shape, space, budget, budget_unit, confidence)
  return found


def check_calibration_images(data: input_pipeline.DataSpec, split: str, examples: int) -> None:
  """Raises errors.ConfigError unless `split` of `data` has more than `examples` images (its
  last `examples` calibrate escalation)."""
  try:
    available = input_pipeline.num_examples(data, split)
  except ValueError as e:  # No such split.
    raise errors.ConfigError(f'escalation calibration split {split!r}: {e}') from None
  if not 1 <= examples < available:
    raise errors.ConfigError(f'{examples} calibration examples: use 1 to {available - 1} of the '
                             f'{available} images of {split} (the last ones)')


def calibrate_escalation(model, variables, data: input_pipeline.DataSpec, batch_size: int,
                         chain: Sequence[str], budget: float, budget_unit: str = 'largest',
                         confidence: str = 'max_softmax', calibration_examples: int = 5000,
                         mesh=None, calibration_split: str = 'train'
                         ) -> tuple[escalation_lib.Escalation, dict[str, Any]]:
  """An escalation router for a trained supernet (a gate is not needed), with thresholds
  calibrated to `budget` on the last `calibration_examples` images of `calibration_split` of
  `data` (evaluation preprocessing), and what it achieved there.

  `chain` 'auto' (escalation.AUTO): of every chain that can spend the budget, the one with the
  best accuracy on those images (the fewest levels on a tie).

  Raises: as `escalation_candidates`, and errors.ConfigError for a split the data set lacks or
  too few or too many images, before any image is read.
  """
  candidates = escalation_candidates(model, input_pipeline.preprocessing(data).image_shape,
                                     chain, budget, budget_unit, confidence)
  split = calibration_split
  check_calibration_images(data, split, calibration_examples)
  if split == input_pipeline.EVAL_SPLITS[data.name]:
    say(f'warning: the last {calibration_examples} images of {split}, the evaluation split, '
        'calibrate the thresholds: its results there are not on unseen images')
  pipeline = input_pipeline.make(data, split, batch_size=batch_size, train=False,
                                 examples=(-calibration_examples, None))
  signals = routers.route_signals(model, variables, pipeline, mesh or sharding.make_mesh(1))
  space = [r.name for r in model.routes.routing_space]
  rule, fitted = routers.fit_escalation(signals, space, candidates, confidence)
  accuracy, cost = fitted[rule.chain]
  say(f'escalation {" -> ".join(rule.chain)}: thresholds {list(rule.thresholds)} ({confidence});'
      f' on the last {calibration_examples} images of {split} {accuracy:.4f} at '
      f'{cost / 1e6:.4g} M MAdds (budget {rule.budget / 1e6:.4g} M)')
  found = {'split': split, 'examples': [-calibration_examples, None],
           'images': calibration_examples, 'accuracy': accuracy, 'madds': cost}
  if len(fitted) > 1:  # 'auto': what each chain reached there.
    say(f"chain 'auto': {' -> '.join(rule.chain)}, the most accurate of {len(fitted)} chains "
        f'that can spend the budget on those images (all in escalation.json)')
    found['chains'] = [{'chain': list(c), 'accuracy': a, 'madds': m}
                       for c, (a, m) in fitted.items()]
  return rule, {'calibration': found}


def workdir_latency(workdir: str, image_shape, model) -> dict[str, Any] | None:
  """The workdir's latency table, if there is a valid one for this model and these images
  (else a warning says why none is used)."""
  try:
    return latency_lib.load(os.fspath(epath.Path(workdir) / latency_lib.LATENCY_FILE), model,
                            image_shape)
  except errors.LatencyTableError as e:
    say(f'warning: {e}: ms/img not shown')
    return None
