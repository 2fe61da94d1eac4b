"""What every importer of a PyTorch state dict shares: reading the file, checking every key,
shape and value against the model before anything is built, and writing the checkpoint.

An importer describes, for each of the model's arrays, the state-dict tensors it is built from
and how (a `Source`); `assemble` checks the whole state dict against those sources at once
(every missing, unexpected and mis-shaped key, every tensor that is not floating point, not
finite, or a running variance that is not positive: one `StateDictMismatchError` naming them
all) and only then builds the arrays. `save_checkpoint` writes step 0 of a new or empty
directory, which `config.init_checkpoint`, eval.py, `dsnet_jax.load`, export and the latency
tool read.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsnet_jax import checkpointing, errors
from dsnet_jax.layers.norm import statistics_widths

Shape = tuple[int, ...]
# The PyTorch tensors one of our arrays is built from ({key: shape}), and how it is built.
Source = tuple[dict[str, Shape], Callable[[list[np.ndarray]], np.ndarray]]
# The variable collections a checkpoint holds (not e.g. BN recalibration's `bn_moments`).
COLLECTIONS = ('params', 'batch_stats')


class StateDictMismatchError(errors.UserError, ValueError):
  """Keys, shapes or values of a state dict do not fit the model; names every offending key."""

  def __init__(self, missing: Mapping[str, Shape], unexpected: Sequence[str],
               wrong_shape: Mapping[str, tuple[Shape, Shape]],
               bad_values: Mapping[str, str] | None = None):
    self.missing = dict(missing)
    self.unexpected = list(unexpected)
    self.wrong_shape = dict(wrong_shape)
    self.bad_values = dict(bad_values or {})
    lines = ['the state dict does not match the model:']
    if len(self.missing) >= MAX_LISTED and len(self.unexpected) >= MAX_LISTED:
      lines[0] = (f'the state dict is not one of this model: {len(self.missing)} of its keys '
                  f'are missing and {len(self.unexpected)} unknown ones are there (another '
                  'network?):')
    lines += _listed('missing', [f'{k} {s}' for k, s in self.missing.items()])
    lines += _listed('unexpected', self.unexpected)
    lines += _listed('wrong shape', [f'{k}: expected {e}, got {g}'
                                     for k, (e, g) in self.wrong_shape.items()])
    lines += _listed('bad values', [f'{k}: {p}' for k, p in self.bad_values.items()])
    super().__init__('\n'.join(lines))


# Entries of each kind a StateDictMismatchError lists before '... and N more'.
MAX_LISTED = 20


def _listed(kind: str, entries: list[str]) -> list[str]:
  lines = [f'  {kind}: {e}' for e in entries[:MAX_LISTED]]
  if len(entries) > MAX_LISTED:
    lines.append(f'  {kind}: ... and {len(entries) - MAX_LISTED} more')
  return lines


def value_problems(key: str, value: np.ndarray) -> str | None:
  """What is wrong with the values of the tensor `key`, or None: not floating point (float16 and
  bfloat16 are fine: the model's variables are float32), not finite in float32, or (a running
  variance) not positive."""
  if not jnp.issubdtype(value.dtype, jnp.floating):
    return f'dtype {value.dtype}, not floating point'
  with np.errstate(over='ignore'):
    value = value.astype(np.float32)
  problems = []
  if nonfinite := np.count_nonzero(~np.isfinite(value)):
    problems.append(f'{nonfinite} values not finite in float32')
  if key.endswith('.running_var') and (nonpositive := np.count_nonzero(value <= 0)):
    problems.append(f'{nonpositive} values <= 0')
  return ', '.join(problems) or None


def assemble(state_dict: Mapping[str, Any], sources: Mapping[tuple[str, ...], Source],
             leaves: Mapping[tuple[str, ...], jax.ShapeDtypeStruct],
             dropped: Iterable[str] = ()) -> dict[str, Any]:
  """The model's variables built from `state_dict`, after checking all of it.

  Args:
    state_dict: name -> array (NumPy or anything `np.asarray` reads).
    sources: for each flattened variable path, its `Source`.
    leaves: each path's shape and dtype (the built arrays get them).
    dropped: keys the model has no use for (e.g. `num_batches_tracked`), accepted and ignored.
  Returns:
    The unflattened variables, NumPy arrays in the leaves' dtypes.
  Raises:
    StateDictMismatchError: naming every missing, unexpected and mis-shaped key and every bad
      tensor, before anything is built.
  """
  expected = {k: s for keys, _ in sources.values() for k, s in keys.items()}
  dropped = set(dropped)
  missing = {k: s for k, s in expected.items() if k not in state_dict}
  unexpected = [k for k in state_dict if k not in expected and k not in dropped]
  arrays = {k: np.asarray(state_dict[k]) for k in expected if k in state_dict}
  wrong_shape = {k: (expected[k], a.shape) for k, a in arrays.items() if a.shape != expected[k]}
  bad_values = {k: p for k, a in arrays.items() if (p := value_problems(k, a))}
  if missing or unexpected or wrong_shape or bad_values:
    raise StateDictMismatchError(missing, unexpected, wrong_shape, bad_values)
  variables = {path: np.asarray(build([arrays[k] for k in keys]), leaves[path].dtype)
               for path, (keys, build) in sources.items()}
  return traverse_util.unflatten_dict(variables)


def assemble_over(state_dict: Mapping[str, Any], fresh: Mapping[str, Any],
                  source_of: Callable[[tuple[str, ...], jax.ShapeDtypeStruct], Source | None],
                  dropped: Iterable[str] = ()) -> dict[str, Any]:
  """`fresh` (a model's initial variables) with every array that `source_of(path, leaf)` gives
  a Source for built from `state_dict`, checked as `assemble` checks; the arrays it gives None
  for (what the source network lacks, e.g. the gate) keep their fresh values."""
  flat = traverse_util.flatten_dict(jax.device_get(fresh), keep_empty_nodes=True)
  leaves = {path: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for path, v in flat.items() if hasattr(v, 'shape')}
  sources = {path: source for path, leaf in leaves.items()
             if (source := source_of(path, leaf)) is not None}
  built = traverse_util.flatten_dict(assemble(state_dict, sources, leaves, dropped))
  return traverse_util.unflatten_dict({**flat, **built})


def statistics_rows(stats: Sequence[np.ndarray], shape: Shape, pad: float) -> np.ndarray:
  """Per-width statistics rows (our BatchNorm's `mean`/`var`): row i holds stats[i] in its first
  len(stats[i]) entries, `pad` past them."""
  out = np.full(shape, pad, np.float64)
  for i, s in enumerate(stats):
    out[i, :len(s)] = s
  return out


def to_numpy(value: Any) -> np.ndarray:
  """A tensor or array as a NumPy array: floating-point tensors as float32 (NumPy has no
  bfloat16), other dtypes as they are, so that `assemble` sees e.g. integer weights."""
  if not hasattr(value, 'detach'):
    return np.asarray(value)
  value = value.detach().cpu()
  return (value.float() if value.is_floating_point() else value).numpy()


# File name endings `read_file` reads: PyTorch's pickles, safetensors, NumPy's archives.
TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.bin', '.tar')
SUFFIXES = (*TORCH_SUFFIXES, '.safetensors', '.npz')


class StateDictFileError(errors.UserError, ValueError):
  """A state dict file that cannot be read: unknown kind, damaged, or not holding a mapping."""


def read_file(path: str | os.PathLike) -> dict[str, Any]:
  """The mapping stored in a PyTorch checkpoint (.pth, .pth.tar, .pt, .bin; needs torch), a
  .safetensors file (needs safetensors) or an .npz; tensors as they are stored (`to_numpy`
  converts them).

  Raises:
    FileNotFoundError: no such file.
    StateDictFileError: another kind of file, a damaged one, or one that holds no mapping.
    ImportError: the library that reads it is missing.
  """
  name = os.fspath(path)
  if not os.path.isfile(name):
    raise FileNotFoundError(f'no state dict file {name}')
  if not name.endswith(SUFFIXES):
    raise StateDictFileError(f'{name}: not a state dict file this reads (by its name: '
                             f'{", ".join(SUFFIXES)})')
  if name.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'reading {name} needs safetensors: pip install safetensors') from None
  elif not name.endswith('.npz'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'reading {name} needs PyTorch: pip install ".[torch]" (or pass an .npz '
                        'of the state dict)') from None
  try:
    if name.endswith('.npz'):
      with np.load(name) as npz:
        stored = dict(npz)
    elif name.endswith('.safetensors'):
      stored = load_file(name)
    else:
      # Training checkpoints also pickle the run's argparse.Namespace; allow only that class.
      with torch.serialization.safe_globals([argparse.Namespace]):
        stored = torch.load(name, map_location='cpu', weights_only=True)
  except Exception as e:  # Each reader fails its own way on a damaged file; one message.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise StateDictFileError(f'{name} cannot be read as a {name.rsplit(".", 1)[-1]} state dict '
                             f'(damaged or another kind of file): {first[:200]}') from None
  if not isinstance(stored, Mapping):
    raise StateDictFileError(f'{name} holds a {type(stored).__name__}, not a mapping of names to '
                             'tensors')
  return dict(stored)


def check_new_directory(directory: str | os.PathLike) -> str:
  """`directory` made absolute; raises FileExistsError unless it is new or an empty folder (an
  importer checks it before reading anything, and again when it writes), ValueError when it is
  empty (not the current folder)."""
  if not os.fspath(directory).strip():
    raise errors.ConfigError('the output directory is empty: name a new or empty directory')
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise FileExistsError(f'{directory} is not a directory')
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f'{directory} is not empty; refusing to overwrite it')
  return directory


def save_checkpoint(variables: Mapping[str, Any], directory: str | os.PathLike, model,
                    image_shape: Sequence[int], model_name: str, source: str) -> str:
  """Writes `variables` of `model` as step 0 of a new or empty checkpoint directory (train.py's
  `config.init_checkpoint` and eval.py's `--checkpoint` read it); the meta says where they
  came from (`source`), for which model, and which widths its BatchNorm rows hold."""
  directory = check_new_directory(directory)
  with checkpointing.Checkpointer(directory, keep=None) as ckpt:
    ckpt.save(0, dict(variables), {
        'source': source, 'model_name': model_name, 'variables_key': '',
        'statistics_widths': statistics_widths(model, tuple(image_shape))})
  return directory
