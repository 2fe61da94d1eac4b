"""Latency tables: every route's measured time per image on the present device [ours].

    python -m dsnet_jax.tools.latency --config=configs/ds_mbnet_fmnist.py \
        --workdir=workdir/ds_mbnet_fmnist             # writes workdir/.../latency.json
    python -m dsnet_jax.tools.latency --config=configs/ds_mbnet_fmnist.py \
        --output=workdir/ds_mbnet_fmnist/latency.json   # before training: random weights
    python -m dsnet_jax.tools.latency --model=ds_mbnet --image_size=224 --output=latency.json

MAdds are a proxy; a latency table says what a route costs here. For every route of the table
(or `--routes`) and the routed model, milliseconds per image, warm, median and p90 over
`--rounds` rounds (calls interleaved round-robin, `timing.time_calls`):
- at batch 1: each image alone, waited for (a request's latency), averaged over a round of
  `--singles` images;
- at each throughput batch: one call of that many images, cut into chunks by
  `RoutedPredictor`'s measured plan (the way this library runs a batch).
The routed model runs on evaluation images (random ones with `--model`) with the routes the
gate chooses on them; the mix is recorded. With an escalation router (calibrated for the
workdir's checkpoint), it is timed too ('escalated': its MAdds and where images stop). The table also keeps each compiled program's time
per call at each ladder size (`chunk_costs`), from which `RoutedPredictor(chunk_costs=...)`
plans without measuring again. eval.py prints ms/image next to MAdds when the evaluated
workdir has a `latency.json`.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax import complexity, inference, timing
from dsnet_jax import escalation as escalation_lib
from dsnet_jax.errors import LatencyTableError
from dsnet_jax.models import get_model

LATENCY_FILE = 'latency.json'
ROUTED = 'routed'
ESCALATED = 'escalated'


def device_description() -> dict[str, Any]:
  """Backend, device kind, device count, jax version, host cores and machine."""
  device = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'devices': jax.device_count(), 'jax': jax.__version__, 'host_cores': os.cpu_count(),
          'machine': platform.machine()}


def default_throughput_batch() -> int:
  return 64 if jax.default_backend() == 'cpu' else 256


def measure(predictor: inference.RoutedPredictor, images, *,
            routes: Sequence[Any] | None = None, batch_sizes: Sequence[int] = (1, 64),
            singles: int = 8, rounds: int = 5,
            routing_indices: Sequence[int] | None = None) -> dict[str, Any]:
  """Times every route and the routed model on this device; returns the table (JSON-able).

  Args:
    predictor: a RoutedPredictor; its programs are compiled and timed here as needed.
    images: (N, H, W, C) images, N >= max(batch_sizes) and >= singles.
    routes: routes to time (names, indices or Route); default every route of the table.
    batch_sizes: batch sizes; 1 means `singles` images one at a time.
    singles: images per batch-1 round.
    rounds: timed rounds (median and p90 over them).
    routing_indices: a forced route mix for the routed model (N,), else the gate's choices.
  Returns:
    {'device', 'date', 'image_shape', 'dtype', 'batch_sizes', 'rounds', 'singles',
     'routes': {name: {'madds', 'ms_per_image': {batch: {'median', 'p90'}}}},
     'routed': {..., 'mix': {route name: fraction}, 'forced': bool}, 'chunk_costs'}.
    Times are milliseconds per image.
  Raises:
    ValueError: too few images for the batch sizes or the batch-1 round.
  """
  table = predictor.table
  routes = [table[r] for r in (table if routes is None else routes)]
  batch_sizes = sorted({int(b) for b in batch_sizes})
  images = jnp.asarray(images, predictor.dtype)
  if batch_sizes[0] < 1 or images.shape[0] < max(batch_sizes[-1], singles):
    raise ValueError(f'need positive batch sizes and at least max({batch_sizes[-1]}, {singles}) '
                     f'images, got batch sizes {batch_sizes} and {images.shape[0]} images')
  predictor.warmup(routes=routes)
  if routing_indices is None:
    chosen = predictor.predict(images, escalate=False)[1]
  else:
    chosen = np.asarray(routing_indices, np.int32)
    predictor.predict(images[:1], routing_indices=chosen[:1])  # Checks the values.

  batches = {size: (images[:size], chosen[:size]) for size in batch_sizes}
  ones = [(images[i:i + 1], int(chosen[i])) for i in range(singles)]

  def batch_call(run, size):
    return lambda: run(*batches[size])

  def singles_call(run_one):
    def run():
      out = None
      for image, routing_index in ones:
        out = jax.block_until_ready(run_one(image, routing_index))
      return out
    return run

  calls = {}
  for route in routes:
    run = lambda x, _, route=route: predictor.predict_route(x, route)
    for size in batch_sizes:
      calls[route.name, size] = singles_call(run) if size == 1 else batch_call(run, size)
  forced = routing_indices is not None
  for size in batch_sizes:
    calls[ROUTED, size] = (
        singles_call(lambda x, r: predictor.predict_one(x, r if forced else None, False)[0])
        if size == 1 else
        batch_call(lambda x, r: predictor.predict(x, r if forced else None, False)[0], size))
    if predictor.escalation is not None:
      calls[ESCALATED, size] = (
          singles_call(lambda x, _: predictor.predict_one(x)[0]) if size == 1 else
          batch_call(lambda x, _: predictor.predict(x)[0], size))
  seconds = timing.time_calls(calls, rounds)

  def times(name):
    return {str(size): timing.summary_ms(seconds[name, size], singles if size == 1 else size)
            for size in batch_sizes}

  image_shape = predictor.image_shape
  space = table.routing_space
  mix = np.bincount(chosen[:max(batch_sizes[-1], singles)], minlength=len(space))
  mix = mix / mix.sum()
  gated_madds = [complexity.route_complexity(predictor.model, r, image_shape,
                                             with_gate=True).madds for r in space]
  return {
      'model': model_name(predictor.model), 'device': device_description(),
      'date': datetime.date.today().isoformat(),
      'image_shape': list(image_shape),
      'dtype': jnp.dtype(getattr(predictor.model, 'dtype', None) or jnp.float32).name,
      'batch_sizes': batch_sizes, 'rounds': rounds, 'singles': singles,
      'routing_space': [r.name for r in space],
      'routes': {r.name: {'madds': complexity.route_complexity(predictor.model, r,
                                                              image_shape).madds,
                          'ms_per_image': times(r.name)} for r in routes},
      ROUTED: {'madds': float(np.dot(mix, gated_madds)), 'ms_per_image': times(ROUTED),
               'mix': {r.name: float(f) for r, f in zip(space, mix)}, 'forced': forced},
      **({ESCALATED: escalated(predictor, images[:max(batch_sizes[-1], singles)],
                               times(ESCALATED))} if predictor.escalation is not None else {}),
      'chunk_costs': {name: {str(s): t for s, t in sorted(costs.items())}
                      for name, costs in predictor.chunk_costs.items()},
  }


def escalated(predictor: inference.RoutedPredictor, images, ms_per_image) -> dict[str, Any]:
  """The escalation router's row: its MAdds per image on `images` (prefix and every suffix
  each image ran), where its images stopped, its times."""
  rule = predictor.escalation
  space = [r.name for r in predictor.routing_space]
  stops = np.asarray([rule.chain.index(space[i]) for i in predictor.predict(images)[1]])
  costs = escalation_lib.level_costs(predictor.model, rule.chain, predictor.image_shape)
  return {'madds': float(costs[stops].mean()), 'ms_per_image': ms_per_image,
          'chain': list(rule.chain), 'thresholds': list(rule.thresholds),
          'stops': {r: float((stops == k).mean()) for k, r in enumerate(rule.chain)}}


def chunk_costs(latency: dict[str, Any]) -> dict[str, dict[int, float]]:
  """A table's per-program costs in the form `RoutedPredictor(chunk_costs=...)` takes."""
  return {name: {int(s): t for s, t in costs.items()}
          for name, costs in latency.get('chunk_costs', {}).items()}


def format_table(latency: dict[str, Any]) -> str:
  """Markdown: one row per route and the routed model; MAdds and ms/image per batch size."""
  device = latency['device']
  sizes = [str(b) for b in latency['batch_sizes']]
  lines = [f'latency on {device["backend"]} ({device["device_kind"]}, {device["host_cores"]} '
           f'host cores), jax {device["jax"]}, {latency["dtype"]}, image '
           f'{tuple(latency["image_shape"])}, {latency["date"]}; ms/image median (p90) over '
           f'{latency["rounds"]} rounds; batch 1 = each image alone',
           '| route | MAdds (M) | ' + ' | '.join(f'ms/img @{b}' for b in sizes) + ' |',
           '|---|---|' + '---|' * len(sizes)]
  rows = dict(latency['routes'])
  rows[ROUTED] = latency[ROUTED]
  if ESCALATED in latency:
    rows[ESCALATED] = latency[ESCALATED]
  for name, row in rows.items():
    ms = row['ms_per_image']
    lines.append(f'| {name} | {row["madds"] / 1e6:.2f} | ' + ' | '.join(
        f'{ms[b]["median"]:.3g} ({ms[b]["p90"]:.3g})' for b in sizes) + ' |')
  routed = latency[ROUTED]
  mix = ', '.join(f'{name}: {f:.0%}' for name, f in routed['mix'].items())
  lines.append(f'routed mix ({"forced" if routed["forced"] else "the gate on these images"}): '
               f'{mix}')
  if ESCALATED in latency:
    stops = ', '.join(f'{name}: {f:.0%}' for name, f in latency[ESCALATED]['stops'].items())
    lines.append(f'escalated {" -> ".join(latency[ESCALATED]["chain"])}, where images stop: '
                 f'{stops}')
  return '\n'.join(lines)


def save(latency: dict[str, Any], path: str) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(latency, indent=1))


def model_name(model) -> str:
  """The registry name of a model ('ds_mbnet', ...): its module's name."""
  return type(model).__module__.rsplit('.', 1)[-1]


def load(path: str, model=None, image_shape: Sequence[int] | None = None
         ) -> dict[str, Any] | None:
  """The table at `path`, checked, or None when there is none.

  Raises:
    LatencyTableError: not valid JSON, a missing or malformed key, non-finite or non-positive
      times; or, given the `model` (and `image_shape`) it is to be used for, a table measured
      for another model family, for other images, or for another network: a timed route that
      is not one of the model's, or whose MAdds differ from the model's route's.
  """
  if not epath.Path(path).exists():
    return None
  try:
    table = json.loads(epath.Path(path).read_text())
    sizes = [str(b) for b in table['batch_sizes']]
    problems = [f'{key} missing' for key in ('device', 'image_shape', 'routes', ROUTED)
                if key not in table]
    if not sizes or sorted(map(int, sizes)) != list(map(int, sizes)):
      problems.append(f'batch_sizes {table["batch_sizes"]} not increasing')
    rows = [*table.get('routes', {}).items()] + ([(ROUTED, table[ROUTED])] if ROUTED in table
                                                 else [])
    for name, row in rows:
      times = [row['ms_per_image'][b]['median'] for b in sizes]
      if not all(isinstance(t, (int, float)) and 0 < t < float('inf') for t in times):
        problems.append(f'route {name}: ms per image {times} not all positive and finite')
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise LatencyTableError(f'{path} is not a latency table: {type(e).__name__}: {e}') from None
  if model is not None:
    problems += _foreign(table, model, image_shape)
  if problems:
    raise LatencyTableError(f'{path} cannot be used: {"; ".join(problems)}')
  return table


def _foreign(table: dict[str, Any], model, image_shape) -> list[str]:
  """How a table's recorded model, images and route costs differ from `model`'s."""
  name = model_name(model)
  if table.get('model', name) != name:
    return [f'measured for model {table["model"]!r}, not {name!r}']
  if image_shape is None:
    return []
  if tuple(table['image_shape']) != tuple(image_shape):
    return [f'measured for images {tuple(table["image_shape"])}, not {tuple(image_shape)}']
  problems = []
  for route, row in table['routes'].items():
    if route not in model.routes.names:
      problems.append(f'route {route} is not a route of this model')
      continue
    madds = complexity.route_complexity(model, route, tuple(image_shape)).madds
    if row['madds'] != madds:
      problems.append(f'route {route} was {row["madds"]:.0f} MAdds there, this model\'s is '
                      f'{madds}: measured for another network')
  return problems


def model_for(name: str, image_size: int, **kwargs):
  """`get_model(name, **kwargs)` for square RGB images of `image_size` (ViTs need it)."""
  model = get_model(name, **kwargs)
  return model.clone(image_size=image_size) if hasattr(model, 'image_size') else model


def evaluation_images(pipeline, count: int) -> np.ndarray:
  """The first `count` real images of an evaluation pipeline (N, H, W, C)."""
  images = []
  for batch in pipeline.batches():
    images.append(batch['image'][batch['mask'].astype(bool)])
    if sum(len(x) for x in images) >= count:
      break
  images = np.concatenate(images)
  if len(images) < count:
    raise ValueError(f'the evaluation split has {len(images)} images; the latency table needs '
                     f'{count}')
  return images[:count]
