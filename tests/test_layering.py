"""The package's layers: every import (function-level ones included) goes to the same floor or
a lower one, there is no import cycle, `ml_collections` stays in the config layer and above,
and command lines (absl `main`, `app.run`) live in `dsnet_jax/tools/` only."""
import ast
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = 'dsnet_jax'
# A module's floor is that of its longest listed prefix (the package itself is the top: its
# `load` is the public face of the run directory).
FLOORS = {
    'errors': 0, 'paths': 0, 'routes': 0, 'sharding': 0, 'timing': 0, 'huge_pages': 0,
    'progress': 0, 'stand_in': 0,
    'layers': 1, 'models': 1, 'losses': 1, 'complexity': 1, 'specialize': 1,
    'bn_calibration': 1,
    'data': 2, 'optim': 2, 'budget': 2, 'checkpointing': 2, 'inference': 2, 'latency': 2,
    'export': 2, 'convert': 2, 'train_steps': 2, 'escalation': 2, 'routers': 2,
    'config_lib': 3,
    'rundir': 4,
    'train_lib': 5, 'eval_lib': 5,
    'tools': 6, '': 6,
}
CONFIG_FLOOR = FLOORS['config_lib']


def modules(root: pathlib.Path, package: str = PACKAGE) -> dict[str, pathlib.Path]:
  """{'dsnet_jax.data.loader': path} of every module of the package under `root`."""
  out = {}
  for path in sorted((root / package).rglob('*.py')):
    parts = path.relative_to(root).with_suffix('').parts
    out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> list[tuple[str, int]]:
  """(imported module, line) for every import statement of the module, at any depth; names
  resolved to the deepest known module (`from a import b` is a.b when a.b is a module)."""
  tree = ast.parse(path.read_text())
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join([*package.split('.')[:len(package.split('.')) - node.level + 1],
                         *([base] if base else [])])
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target not in known and '.' in target:
        target = target.rpartition('.')[0]
      out.append((target, node.lineno))
  return out


def floor(name: str, package: str = PACKAGE) -> int:
  rest = name[len(package) + 1:] if name != package else ''
  parts = rest.split('.') if rest else []
  for n in range(len(parts), -1, -1):
    if '.'.join(parts[:n]) in FLOORS:
      return FLOORS['.'.join(parts[:n])]
  raise AssertionError(f'{name} has no floor in FLOORS: give it one')


def violations(root: pathlib.Path, package: str = PACKAGE) -> list[str]:
  """What breaks the layering, one line each (empty when nothing does)."""
  found = modules(root, package)
  known = set(found)
  graph, problems = {}, []
  for name, path in found.items():
    edges = imports(name, path, known)
    graph[name] = {t for t, _ in edges if t in known and t != name}
    source = path.read_text()
    for target, line in edges:
      if target in known and target != name and floor(target, package) > floor(name, package):
        problems.append(f'{path.relative_to(root)}:{line}: {name} (floor '
                        f'{floor(name, package)}) imports {target} (floor '
                        f'{floor(target, package)}), a higher one')
      if target.split('.')[0] == 'ml_collections' and floor(name, package) < CONFIG_FLOOR:
        problems.append(f'{path.relative_to(root)}:{line}: {name} imports ml_collections '
                        'below the config layer')
    if floor(name, package) < FLOORS['tools'] and is_command_line(source):
      problems.append(f'{path.relative_to(root)}: a command line (main / app.run) outside '
                      f'{package}/tools/')
  problems += [f'import cycle among {", ".join(component)}' for component in cycles(graph)]
  return problems


def is_command_line(source: str) -> bool:
  """Whether a module defines a `main` or calls absl's `app.run`."""
  tree = ast.parse(source)
  defines_main = any(isinstance(node, ast.FunctionDef) and node.name == 'main'
                     for node in tree.body)
  return defines_main or any(
      isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
      and node.func.attr == 'run' and getattr(node.func.value, 'id', '') == 'app'
      for node in ast.walk(tree))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The modules of each strongly connected component of more than one module (each imports
  the others, directly or not), sorted."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in sorted(graph.get(node, ())):
      if other not in index:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      component = []
      while True:
        other = stack.pop()
        on_stack.discard(other)
        component.append(other)
        if other == node:
          break
      if len(component) > 1:
        components.append(sorted(component))
  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def test_the_package_is_layered():
  # In a fresh interpreter: in a long-lived pytest worker CPython 3.11's ast.parse can fail
  # with "AST constructor recursion depth mismatch" (python/cpython#106905).
  code = (f'import json, sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); '
          'import test_layering as t; print(json.dumps(t.violations(t.ROOT)))')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert json.loads(done.stdout) == []


def write(root: pathlib.Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_an_upward_import_a_cycle_and_a_misplaced_main_are_found(tmp_path):
  write(tmp_path, {
      'dsnet_jax/__init__.py': '',
      'dsnet_jax/errors.py': 'def f():\n  from dsnet_jax import rundir  # hidden in a function\n',
      'dsnet_jax/rundir.py': 'from dsnet_jax import errors\n',
      'dsnet_jax/models/__init__.py': 'import ml_collections\n',
      'dsnet_jax/models/a.py': 'from . import b\n',
      'dsnet_jax/models/b.py': 'from dsnet_jax.models import a\n',
      'dsnet_jax/latency.py': 'def main(argv):\n  pass\n',
      'dsnet_jax/tools/__init__.py': '',
      'dsnet_jax/tools/latency.py': 'from dsnet_jax import latency\ndef main(argv):\n  pass\n',
  })
  assert sorted(violations(tmp_path)) == sorted([
      'dsnet_jax/errors.py:2: dsnet_jax.errors (floor 0) imports dsnet_jax.rundir (floor 4), a '
      'higher one',
      'dsnet_jax/models/__init__.py:1: dsnet_jax.models imports ml_collections below the '
      'config layer',
      'dsnet_jax/latency.py: a command line (main / app.run) outside dsnet_jax/tools/',
      'import cycle among dsnet_jax.errors, dsnet_jax.rundir',
      'import cycle among dsnet_jax.models.a, dsnet_jax.models.b',
  ])
