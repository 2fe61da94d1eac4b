"""What the reproduction study's scripts share (experiments/RESULTS.md).

A run trains a config into `<workdir_root>/<name>` and leaves a small JSON record in
`experiments/runs/<name>.json`: the command line, commit, seed, wall time and the final
evaluation (every route's accuracy and MAdds; the gated result). A record that exists is not
run again, so a study resumes and its tables regenerate from the records alone.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnet_jax import budget as budget_lib, config_lib, errors, rundir, train_lib  # noqa: E402
from dsnet_jax.data import input_pipeline  # noqa: E402
from dsnet_jax.models import get_model  # noqa: E402

RUNS_DIR = ROOT / 'experiments' / 'runs'
RESULTS = ROOT / 'experiments' / 'RESULTS.md'
# The study's models: Fashion-MNIST configs ('tiny': synthetic data, for the tests).
CONFIGS = {'ds_mbnet': 'configs/ds_mbnet_fmnist.py', 'ds_vit': 'configs/ds_vit_fmnist.py',
           'ds_resnet': 'configs/ds_resnet_fmnist.py', 'tiny': 'configs/tiny.py'}


def compared_routes(model_name: str) -> list[str]:
  """The routes the tables compare: the smallest, the middle numbered one and 'largest'."""
  config = configured(CONFIGS[model_name])
  names = [r.name for r in get_model(config.model_name, **config.model).routes]
  return [names[0], names[(len(names) - 1) // 2], names[-1]]


def supernet_name(model_name: str, steps: int, seed: int, variant: str = '') -> str:
  """The run name of `model_name`'s supernet (Stage I `variant`, '' for IB) for `steps`."""
  tag = f'_{variant}' if variant else ''
  return f'{model_name}_supernet{tag}_s{steps}_seed{seed}'


def supernet_run(model_name: str, steps: int, seed: int, workdir_root: str, runs_dir: str,
                 variant: str = '', **overrides) -> dict[str, Any]:
  """Stage I (+ BN recalibration) of `model_name`'s config for `steps`; `variant` names a
  run with `overrides` (an ablation)."""
  return run(supernet_name(model_name, steps, seed, variant), CONFIGS[model_name],
             {'seed': seed, 'supernet.steps': steps, 'supernet.epochs': 0.0,
              'stages': ('supernet', 'recalibrate'), **overrides}, workdir_root, runs_dir)


def gate_run(model_name: str, steps: int, budget: float, seed: int, workdir_root: str,
             runs_dir: str, variant: str = '', supernet_variant: str = '',
             **overrides) -> dict[str, Any]:
  """The gate stage at `budget` and `seed` from the seed-0 supernet_run of `steps` (of
  `supernet_variant`: then from that variant's run of the same seed)."""
  tag = f'_{variant}' if variant else ''
  supernet = supernet_name(model_name, steps, seed if supernet_variant else 0, supernet_variant)
  return run(f'{model_name}_gate{tag}_s{steps}_b{budget:g}_seed{seed}', CONFIGS[model_name],
             {'stages': ('gate',), 'seed': seed, 'gate.budget': budget,
              'gate.madds_target': 0.0, **overrides},
             workdir_root, runs_dir, upstream=os.path.join(workdir_root, supernet),
             upstream_stages=('supernet', 'recalibrate'))


def git_commit() -> str:
  """HEAD's short hash, '+uncommitted' when tracked files differ from it (but for what the
  study itself writes: RESULTS.md and its plots)."""
  done = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True)
  dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.',
                          ':!experiments/RESULTS.md', ':!experiments/*.png'], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
  return done.stdout.strip() + ('+uncommitted' if dirty else '')


def configured(config_file: str, **overrides) -> ml_collections.ConfigDict:
  """The config file's config with dotted-key `overrides` ('supernet.steps': 300)."""
  config = config_lib.load_config_file(config_file)
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    section = config
    for part in parents:
      section = section[part]
    section[leaf] = value
  return config


def command(config_file: str, workdir: str, overrides: dict[str, Any], upstream: str = '',
            upstream_stages: Sequence[str] = ()) -> str:
  """The shell command that trains this run (from the repository root), copying the
  `upstream_stages` checkpoints of `upstream` in first as `run` does."""
  flags = ' '.join(f'--config.{k}={_flag(v)}' for k, v in overrides.items())
  train = f'python train.py --config={config_file} --workdir={workdir} {flags}'.strip()
  if not upstream_stages:
    return train
  sources = ' '.join(os.path.join(upstream, 'checkpoints', stage) for stage in upstream_stages)
  return (f'mkdir -p {workdir}/checkpoints && cp -r {sources} {workdir}/checkpoints/ && '
          f'{train}')


def _flag(value) -> str:
  """A config flag's value as the shell and `config_flags` parse it."""
  if isinstance(value, (tuple, list)):
    return f'"{tuple(value)!r}"'
  return str(value)


class StudyError(ValueError):
  """A study input (flag, run record, results path) that cannot be used as given."""


def run(name: str, config_file: str, overrides: dict[str, Any], workdir_root: str,
        runs_dir: pathlib.Path = RUNS_DIR, upstream: str = '',
        upstream_stages: Sequence[str] = ()) -> dict[str, Any]:
  """Trains (unless `runs_dir/<name>.json` exists) and returns the run's record.

  `upstream`: a workdir whose finished `upstream_stages` checkpoints are copied in first
  (e.g. a supernet for gate-stage runs).

  Raises:
    StudyError: the existing record is unreadable or describes another run (name, config
      file, overrides or upstream run differ).
  """
  path = pathlib.Path(runs_dir) / f'{name}.json'
  settings = {'name': name, 'config': config_file, 'overrides': _jsonable(overrides),
              'upstream_run': os.path.basename(upstream)}
  if path.exists():
    return _read_record(path, settings)
  config = configured(config_file, **overrides)  # A bad override fails before any work.
  workdir = os.path.join(workdir_root, name)
  for stage in upstream_stages:
    source, target = rundir.RunDir(upstream), rundir.RunDir(workdir).stage_dir(stage)
    if not source.status(stage).meta.get('complete'):
      raise FileNotFoundError(f'{source.stage_dir(stage)} holds no finished {stage} stage')
    if not os.path.exists(target):  # Copied whole or not at all: a killed copy is redone.
      partial = f'{target}.partial'
      shutil.rmtree(partial, ignore_errors=True)
      shutil.copytree(source.stage_dir(stage), partial)
      os.replace(partial, target)
  shell = command(config_file, workdir, overrides, upstream, upstream_stages)
  print(f'=== {name}: {shell}', flush=True)
  start = time.perf_counter()
  report = train_lib.train_and_evaluate(config, workdir)
  record = {**settings, 'command': shell, 'upstream': upstream, 'commit': git_commit(),
            'seed': config.seed, 'date': datetime.date.today().isoformat(),
            'wall_seconds': round(time.perf_counter() - start, 1),
            'routes': report['routes'], 'gated': report['gated']}
  write_atomically(path, json.dumps(record, indent=1))
  return record


def _jsonable(overrides: dict[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(overrides))  # Tuples as lists, as a record holds them.


def _read_record(path: pathlib.Path, settings: dict[str, Any]) -> dict[str, Any]:
  try:
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or 'routes' not in record:
      raise ValueError('no routes')
  except ValueError as e:
    raise StudyError(f'{path} is not a run record ({e}); delete it to train the run again')
  differ = [f'{k} {record.get(k)!r}, expected {v!r}' for k, v in settings.items()
            if record.get(k) != v]
  if differ:
    raise StudyError(f'{path} records another run ({"; ".join(differ)}); delete it to train '
                     'the run again')
  return record


def write_atomically(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: never half-written."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  temporary.write_text(text)
  os.replace(temporary, path)


def check_flags(models: Sequence[str] = (), results: str = '',
                seeds: dict[str, Sequence[str]] | None = None,
                budgets: dict[str, Sequence[str]] | None = None, **counts: int) -> None:
  """Raises StudyError naming the first bad flag, before any run starts.

  models: known study models; seeds ({flag: values}): non-empty, distinct integers; budgets
  ({flag: values}): non-empty, distinct fractions of 'largest' in (0, 1]; results: in an
  existing folder; `counts` (steps=.., long_factor=..): positive integers.
  """
  for model in models:
    if model not in CONFIGS:
      raise StudyError(f'unknown model {model!r}; known: {", ".join(CONFIGS)}')
  for lists, kind in ((seeds or {}, int), (budgets or {}, float)):
    for flag, values in lists.items():
      given = f'--{flag}={",".join(map(str, values))}'
      try:
        parsed = [kind(v) for v in values]
      except ValueError:
        raise StudyError(f'{given}: not {kind.__name__}s') from None
      if not parsed or len(set(parsed)) != len(parsed):
        raise StudyError(f'{given}: give one or more distinct values')
      if kind is float and not all(0 < b <= 1 for b in parsed):
        raise StudyError(f"{given}: each a fraction of 'largest''s MAdds in (0, 1]")
  for flag, value in counts.items():
    if value < 1:
      raise StudyError(f'--{flag}={value}: must be a positive integer')
  if results and not pathlib.Path(results).parent.is_dir():
    raise StudyError(f'--results={results}: its folder does not exist')


def check_budgets(model_name: str, budgets: Sequence[float]) -> None:
  """Raises StudyError for a gate budget `model_name`'s routing space cannot spend, before any
  run (train.py would refuse it only after the runs before it)."""
  for budget in budgets:
    config = configured(CONFIGS[model_name], **{'gate.budget': budget, 'gate.madds_target': 0.0})
    model = get_model(config.model_name, **config.model)
    # As train.py's.
    image_shape = input_pipeline.preprocessing(config_lib.data_spec(config.data)).image_shape
    try:
      budget_lib.make_budget(config.gate, model, image_shape)
    except errors.BudgetError as e:
      raise StudyError(f'{model_name}: {e}') from None


def route_row(record: dict[str, Any], route: str) -> dict[str, Any]:
  return next(r for r in record['routes'] if r['route'] == route)


def mean_spread(values: Iterable[float]) -> tuple[float, float]:
  """Mean and spread (max - min)."""
  values = np.asarray(list(values), float)
  return float(values.mean()), float(values.max() - values.min())


def percent(mean: float, spread: float, count: int) -> str:
  """'84.12' for one seed, '84.12 ± 0.15 (2)' (half the spread) for more."""
  if count == 1:
    return f'{100 * mean:.2f}'
  return f'{100 * mean:.2f} ± {50 * spread:.2f} ({count})'


def signed(mean: float, spread: float, count: int) -> str:
  """A difference in points: '+2.07' for one seed, '+2.07 ± 0.10' (half the spread) for more."""
  return f'{100 * mean:+.2f}' + (f' ± {50 * spread:.2f}' if count > 1 else '')


def regenerated_by(script: str, **flags) -> str:
  """A section's line saying which script call (from the repository root) writes it."""
  args = ' '.join(f'--{k}={",".join(map(str, v)) if isinstance(v, (list, tuple)) else v}'
                  for k, v in flags.items())
  return (f'Written by `python experiments/{script} {args}` (from the repository root; it '
          'trains only the runs without a record in `experiments/runs/`).')


def write_section(name: str, markdown: str, results: pathlib.Path = RESULTS) -> None:
  """Replaces (or appends) the section between `<!-- name -->` and `<!-- /name -->`."""
  results = pathlib.Path(results)
  text = results.read_text() if results.exists() else '# Reproduction study\n'
  begin, end = f'<!-- {name} -->', f'<!-- /{name} -->'
  block = f'{begin}\n{markdown.strip()}\n{end}'
  if begin in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip() + '\n\n' + block + '\n'
  write_atomically(results, text)


def define_path_flags() -> None:
  """The flags every study script takes: --workdir_root, --runs_dir, --results."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('workdir_root', str(ROOT / 'workdir' / 'study'),
                      'Where the runs\' workdirs go.')
  flags.DEFINE_string('runs_dir', str(RUNS_DIR), 'Run records (JSON).')
  flags.DEFINE_string('results', str(RESULTS), 'The markdown file the tables go into.')


def quiet() -> None:
  """Library INFO logs (orbax's) off in a script's absl main."""
  from dsnet_jax.tools import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_library_logs()


def save_plot(fig, path: pathlib.Path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
