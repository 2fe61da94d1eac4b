"""Routed batched inference: the gate once per batch, then each route's own dense program.

One image's path through `RoutedPredictor.predict`:

1. Its batch is cut into chunks whose sizes are on a fixed *ladder* of compiled sizes (powers
   of two by default; only the last chunk is padded), the cut with the least measured time
   (`plan_chunks` on `chunk_costs`, timed per program and size at warm-up on the present
   device; on CPU a big batch often runs faster as several cache-sized chunks). The **prefix**
   program of each chunk size runs the network up to and including the gate, at the routing
   space's shared prefix widths, writes the prefix output (`hidden`) into a device-resident
   *hidden buffer* at the chunk's offset and returns the gate's argmax (deterministic: no
   Gumbel noise).
2. The argmaxes of the whole batch come to the host in one transfer: the one host sync.
3. The host groups the examples by route (stable, so input order inside a group) and cuts
   each group into chunks the same way, on that route's suffix timings.
4. For each chunk, the **suffix** program of (route, chunk size) gathers its rows from the
   hidden buffer (`take` on an index array computed on the host), runs the route's dense slices from
   the gate onward (the prefix is not recomputed) and scatters the logits into their input
   positions of a device-resident *out* buffer (padding rows go out of bounds and are dropped).
5. The first n rows of the out buffer are copied out: logits in input order.

Every program is compiled ahead of time and kept in `RoutedPredictor.compiled`, keyed by
(kind, route name or None, size), so the number of compiles is bounded: one prefix per ladder
size, one suffix per (route, ladder size), one copy-out per batch size. Step 4 needs no
per-(prefix size, chunk size) program because the hidden and out buffers have fixed shapes.

    predictor = RoutedPredictor(model, variables, image_shape=(224, 224, 3))
    predictor.warmup()
    logits, routing_indices = predictor.predict(images)    # any batch size
    logits = predictor.predict_route(images, 'largest')    # one static route for all
    logits, routing_index = predictor.predict_one(image)   # batch 1, one dispatch

The hidden and out buffers are donated and reused between calls, so one predictor is not
meant to be called from several threads at once.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsnet_jax import escalation as escalation_lib
from dsnet_jax import routes as routes_lib
from dsnet_jax import timing
from dsnet_jax.errors import ConfigError, NotGatedError
from dsnet_jax.models.gated import check_images


def check_gated(model) -> routes_lib.RouteTable:
  """The model's route table, or a clear error when it cannot be routed."""
  table = getattr(model, 'routes', None)
  missing = [name for name in ('prefix', 'suffix') if not callable(getattr(model, name, None))]
  if not isinstance(table, routes_lib.RouteTable) or missing:
    what = ('no route table with a routing space (model.routes)'
            if not isinstance(table, routes_lib.RouteTable) else
            f'no {" / ".join(missing)} method')
    raise NotGatedError(
        f'{type(model).__name__} is not a gated model: it has {what}. Routed inference needs '
        'model.routes.routing_space and the prefix (up to the gate) and suffix (a route from the '
        'gate on) methods; run a static route with model.apply(variables, x, route=...) instead.')
  return table


def powers_of_two(max_batch: int) -> tuple[int, ...]:
  """1, 2, 4, ... up to max_batch (max_batch itself included when it is not a power of two)."""
  sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch]
  return tuple(sorted(set(sizes + [max_batch])))


def linear_costs(sizes: Sequence[int]) -> dict[int, float]:
  """Stand-in chunk costs before any are measured: one unit per row plus 0.01 per call (so the
  cheapest plan computes no padding, in as few chunks as that allows)."""
  return {int(s): s + 0.01 for s in sizes}


def plan_chunks(n: int, costs: Mapping[int, float], max_rows: int | None = None
                ) -> list[tuple[int, int]]:
  """The cheapest cut of n examples into chunks: [(size, valid), ...], only the last padded.

  Args:
    n: examples (0 gives no chunks).
    costs: {chunk size: cost of one call at that size} (seconds when measured; any additive
      unit). On CPU a measured cost can grow faster than the size (activations that no longer
      fit in cache), and then the plan runs a big batch as several smaller chunks; on
      accelerators it grows slower, and then padding one bigger chunk is cheaper than two calls.
    max_rows: the padded end of the plan (rows written back to back) may not exceed this.
  Returns:
    Full chunks first, largest first, then at most one padded chunk (valid < size); the total
    cost is minimal (dynamic programming over the examples in full chunks; ties: fewer chunks).
  Raises:
    ValueError: no plan fits within max_rows.
  """
  sizes = sorted(costs)
  none = (float('inf'), 0)
  exact = [(0.0, 0)] + [none] * n  # (cost, chunks) of exactly m examples in full chunks
  last = [0] * (n + 1)
  for m in range(1, n + 1):
    for s in sizes:
      if s <= m and exact[m - s] != none:
        option = (exact[m - s][0] + costs[s], exact[m - s][1] + 1)
        if option < exact[m]:
          exact[m], last[m] = option, s
  best, padded = none, None
  for m in range(n + 1):
    rest = n - m
    if exact[m] == none:
      continue
    for s in ([0] if rest == 0 else [s for s in sizes if s >= rest]):
      if max_rows is not None and m + s > max_rows:
        continue
      option = (exact[m][0] + costs.get(s, 0.0), exact[m][1] + (s > 0))
      if option < best:
        best, padded = option, (m, s)
  if padded is None:
    raise ValueError(f'no chunk plan for {n} examples within {max_rows} rows with sizes {sizes}')
  m, s = padded
  full = [s] if s and s == n - m else []
  while m:
    full.append(last[m])
    m -= last[m]
  chunks = [(size, size) for size in sorted(full, reverse=True)]
  return chunks + ([(s, n - sum(full))] if sum(full) < n else [])


class RoutedPredictor:
  """Batched inference of a gated model, with one compiled program per (kind, route, size).

  For a checkpoint, `dsnet_jax.load(...).predictor()` builds it with the checkpoint's own
  router and refuses a gate that was never trained; built directly, it routes by whatever
  gate `variables` hold (or by `escalation`).

  Args:
    model: a gated Flax model (`routes`, `prefix`, `suffix`; see module docstring).
    variables: its variables ({'params', 'batch_stats', ...}), used as given (not copied).
    image_shape: (H, W, C) of one image; every program is compiled for it.
    ladder: batch sizes programs are compiled for; default powers of two up to `max_batch`.
      The largest is the biggest batch one program sees; bigger inputs run in several passes.
    max_batch: the largest ladder size when `ladder` is not given.
    chunk_costs: measured seconds per call, {program: {size: seconds}} with programs named
      'prefix', 'suffix/<route>', 'route/<route>' (as `chunk_costs` holds after
      `warmup(measure=True)`, or as a latency table keeps them). Batches are cut into chunks
      by `plan_chunks` on these costs; programs not measured yet cost `linear_costs`.
    escalation: route by escalation (`dsnet_jax.escalation`) instead of the gate's argmax:
      every image runs the prefix and the chain's first suffix, the less confident ones the
      next suffix on the same prefix output, and so on (one host sync per level).
    gate_trained: False for variables whose routing head no gate stage trained (as
      `dsnet_jax.load(...).predictor()` says): routing by the gate is then refused (escalation
      and forced routing indices still run).
    dtype: the images' dtype in the compiled programs (other inputs are cast to it on the
      way in). float32 suits a bfloat16 model too: its stem casts to bfloat16 on the device,
      where casting NumPy images on the host would cost more than the transfer it saves.
      The hidden buffer holds the prefix's output in the model's compute dtype; logits are
      float32.
  """

  def __init__(self, model, variables, image_shape: Sequence[int], *,
               ladder: Sequence[int] | None = None, max_batch: int = 256,
               chunk_costs: Mapping[str, Mapping[int, float]] | None = None,
               dtype: Any = jnp.float32, escalation: escalation_lib.Escalation | None = None,
               gate_trained: bool = True):
    self.model = model
    self.gate_trained = gate_trained
    self.table = check_gated(model)
    self.escalation = escalation
    self.variables = variables
    self.image_shape = tuple(image_shape)
    self.chain = () if escalation is None else tuple(
        self.table[r] for r in escalation_lib.checked_chain(model, escalation.chain,
                                                            self.image_shape))
    self.ladder = tuple(sorted(set(ladder))) if ladder else powers_of_two(max_batch)
    if self.ladder[0] < 1:
      raise ValueError(f'ladder sizes must be positive, got {self.ladder}')
    self.chunk_costs = {name: {int(s): float(t) for s, t in costs.items()}
                        for name, costs in (chunk_costs or {}).items()}
    bad = {name: costs for name, costs in self.chunk_costs.items()
           if not all(s >= 1 and 0 < t < float('inf') for s, t in costs.items())}
    if bad:
      raise ValueError(f'chunk_costs need positive sizes and positive, finite seconds; got {bad}')
    self._plans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    self._timing_inputs: dict[int, jax.Array] = {}
    self.dtype = jnp.dtype(dtype)
    self.compiled: dict[tuple[str, str | None, Hashable], jax.stages.Compiled] = {}

    one = jax.ShapeDtypeStruct((1, *self.image_shape), self.dtype)
    hidden, routing_logits = jax.eval_shape(
        lambda v, x: model.apply_prefix(v, x), variables, one)
    if routing_logits.shape != (1, len(self.routing_space)):
      raise ValueError(f'routing logits {routing_logits.shape} do not match the routing space of '
                       f'{len(self.routing_space)} routes')
    self._hidden_shapes = hidden
    logits = jax.eval_shape(
        lambda v, h: model.apply_suffix(v, h, self.routing_space[0]), variables, hidden)
    self.num_classes = logits.shape[-1]
    self._logits_dtype = logits.dtype
    self._buffer_rows = self.max_batch  # Prefix plans end within it (plan_chunks' max_rows).
    self._hidden_buffer = None
    self._out = None

  # --- public API -------------------------------------------------------------------------

  @property
  def routing_space(self) -> tuple[routes_lib.Route, ...]:
    return self.table.routing_space

  @property
  def max_batch(self) -> int:
    return self.ladder[-1]

  @property
  def num_compiles(self) -> int:
    return len(self.compiled)

  def warmup(self, routes: Sequence[routes_lib.Route | str | int] = (), batch_one: bool = True,
             measure: bool = True, rounds: int = 3):
    """Compiles every program `predict` can need (and `predict_route`'s for `routes`), and
    times each one at each ladder size on this device (`measure`), for `plan_chunks`.

    That is the prefix and copy-out per ladder size and the suffix per (route, ladder size),
    plus the batch-1 program of `predict_one`. Copy-outs for batch sizes off the ladder compile
    on first use. Programs already in `chunk_costs` are not timed again.
    """
    routes = [self.table[r] for r in routes]
    calls = {}
    for size in self.ladder:
      self._prefix(size)
      self._copy_out(size)
      calls[('prefix', size)] = functools.partial(self._run_prefix, size)
      for route in self.routing_space:
        self._suffix(route, size)
        calls[(f'suffix/{route.name}', size)] = functools.partial(self._run_suffix, route, size)
      for route in self.chain[:-1]:  # The last level's suffix needs no confidence.
        self._suffix(route, size, with_confidence=True)
      for route in routes:
        self._route(route, size)
        calls[(f'route/{route.name}', size)] = functools.partial(self._run_route, route, size)
    if batch_one:
      self._single(False)
      if self.escalation is not None:
        self._single(True)
    calls = {key: call for key, call in calls.items()
             if key[1] not in self.chunk_costs.get(key[0], {})}
    if measure and calls:
      self._ensure_buffers()
      for (name, size), seconds in timing.time_calls(calls, rounds).items():
        self.chunk_costs.setdefault(name, {})[size] = float(np.median(seconds))
      self._plans.clear()
      self._timing_inputs.clear()  # Up to a ladder of image batches: not kept on the device.
    return self

  def predict(self, images, routing_indices: Sequence[int] | np.ndarray | None = None,
              escalate: bool | None = None) -> tuple[jax.Array, np.ndarray]:
    """Routed logits in input order, and each example's routing index (its route is
    `routing_space[index]`).

    Args:
      images: (n, H, W, C) floating point, NumPy or JAX, any n >= 1.
      routing_indices: optional forced routing indices (n,), e.g. to benchmark a given route
        mix. The gate still runs and its argmax still comes to the host, so the routing cost
        is paid as in normal use; only the decision is replaced.
      escalate: route by the escalation (True) or the gate's argmax (False); default: the
        escalation when the predictor has one.
    Returns:
      (logits (n, num_classes) on device, routing indices (n,) int32 on the host).
    Raises:
      ValueError: images not (n, H, W, C) of the predictor's image shape, or not floating.
    """
    images = self._check_images(images)
    n = images.shape[0]
    if routing_indices is not None:
      given = np.asarray(routing_indices)
      integral = given.dtype.kind in 'iu' or (given.dtype.kind == 'f' and np.all(given % 1 == 0))
      routing_indices = given.astype(np.int32).reshape(-1) if integral else None
      if (routing_indices is None or given.shape != (n,) or routing_indices.min() < 0
          or routing_indices.max() >= len(self.routing_space)):
        raise ValueError(f'forced routing indices need {n} integers in '
                         f'[0, {len(self.routing_space)}), got {given.tolist()}')
    logits, chosen = [], []
    for start in range(0, n, self.max_batch):
      stop = min(start + self.max_batch, n)
      forced = None if routing_indices is None else routing_indices[start:stop]
      part = images if (start, stop) == (0, n) else images[start:stop]
      if forced is None and self._escalates(escalate):
        part_logits, part_routes = self._escalate_pass(part)
      else:
        part_logits, part_routes = self._predict_pass(part, forced)
      logits.append(part_logits)
      chosen.append(part_routes)
    if len(logits) == 1:
      return logits[0], chosen[0]
    return jnp.concatenate(logits), np.concatenate(chosen)

  def predict_route(self, images, route: routes_lib.Route | str | int) -> jax.Array:
    """Logits of one static route (any route of the table, e.g. 'largest') for the batch."""
    route = self.table[route]
    images = self._check_images(images)
    outputs = []
    n = images.shape[0]
    for start in range(0, n, self.max_batch):
      part = images if n <= self.max_batch else images[start:start + self.max_batch]
      offset = 0
      for size, valid in self.plan(f'route/{route.name}', part.shape[0]):
        chunk = part if valid == part.shape[0] else part[offset:offset + valid]
        logits = self._route(route, size)(self.variables, _padded(chunk, size))
        outputs.append(logits if valid == size else logits[:valid])
        offset += valid
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs)

  def predict_one(self, image, routing_index: int | None = None, escalate: bool | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Batch-1 routed inference in one program (no padding, no host sync).

    The gate's choice selects the route's suffix on the device (`lax.switch`).
    Args:
      image: (H, W, C) or (1, H, W, C), floating point.
      routing_index: optional forced routing index, as in `predict`.
      escalate: as in `predict`.
    Returns:
      (logits (num_classes,), routing index as a device scalar).
    Raises:
      ValueError: any other shape (e.g. channels-first) or dtype.
    """
    if np.ndim(image) == len(self.image_shape):
      image = image[None]
    image = self._check_images(image)
    if image.shape[0] != 1:
      raise ValueError(f'predict_one takes one image, got a batch of {image.shape[0]}; use '
                       'predict')
    if routing_index is not None and not 0 <= routing_index < len(self.routing_space):
      raise ValueError(f'forced routing index {routing_index} is not in '
                       f'[0, {len(self.routing_space)})')
    force = np.int32(-1 if routing_index is None else routing_index)
    escalate = self._escalates(escalate) if routing_index is None else bool(self.escalation)
    return self._single(escalate)(self.variables, image, force)

  def _escalates(self, escalate: bool | None) -> bool:
    """Whether a call routes by escalation (else by the gate's argmax).

    Raises:
      errors.NotGatedError: routing by a gate that was never trained; errors.ConfigError:
        escalating without a rule.
    """
    escalates = self.escalation is not None if escalate is None else bool(escalate)
    if escalates and self.escalation is None:
      raise ConfigError('escalate=True, but this predictor has no escalation rule')
    if not escalates and not self.gate_trained:
      raise NotGatedError('these variables hold a gate no gate stage trained: routing by it '
                          'would be arbitrary. Route by escalation, or force routing indices.')
    return escalates

  # --- one pass of at most max_batch examples ----------------------------------------------

  def _predict_pass(self, images, forced):
    n = images.shape[0]
    gate_choices, plan = self._run_prefixes(images)
    # The one device->host transfer per pass: the gate's decisions.
    chosen = np.concatenate([c[:valid] for c, (_, valid) in
                             zip(jax.device_get(gate_choices), plan)]).astype(np.int32)
    if forced is not None:
      chosen = forced
    for r, route in enumerate(self.routing_space):
      self._run_suffixes(route, np.flatnonzero(chosen == r).astype(np.int32))
    return self._copy_out(n)(self._out), chosen

  def _escalate_pass(self, images):
    """Escalation: the prefix for all, then each level's suffix on the rows still undecided
    (one transfer of their confidences per level but the last)."""
    n = images.shape[0]
    self._run_prefixes(images)
    rows = np.arange(n, dtype=np.int32)
    stopped = np.full(n, len(self.chain) - 1, np.int32)
    for level, route in enumerate(self.chain):
      last = level == len(self.chain) - 1
      confidences = self._run_suffixes(route, rows, with_confidence=not last)
      if last:
        break
      stays = np.concatenate(jax.device_get(confidences)) >= self.escalation.thresholds[level]
      stopped[rows[stays]] = level
      rows = rows[~stays]
      if not len(rows):
        break
    space = [r.name for r in self.routing_space]
    indices = np.array([space.index(r.name) for r in self.chain], np.int32)[stopped]
    return self._copy_out(n)(self._out), indices

  def _run_prefixes(self, images):
    """The prefix over the batch in planned chunks, filling the hidden buffer; the gate's
    argmax of each chunk (on the device) and the plan."""
    n = images.shape[0]
    self._ensure_buffers()
    plan = self.plan('prefix', n)
    gate_choices, offset = [], 0
    for size, valid in plan:
      chunk = images if valid == n else images[offset:offset + valid]
      self._hidden_buffer, choice = self._prefix(size)(
          self.variables, _padded(chunk, size), self._hidden_buffer, np.int32(offset))
      gate_choices.append(choice)
      offset += valid
    return gate_choices, plan

  def _run_suffixes(self, route, members: np.ndarray, with_confidence: bool = False):
    """`route`'s suffix on the hidden buffer's rows `members`, written to those rows of the
    out buffer in planned chunks; with_confidence: each chunk's confidences (device arrays,
    padding cut off) in the order of `members`."""
    start, confidences = 0, []
    for size, valid in self.plan(f'suffix/{route.name}', len(members)):
      rows = members[start:start + valid]
      pad = size - valid
      src = np.concatenate([rows, np.full(pad, rows[-1], np.int32)])
      # Padding rows scatter out of bounds (dropped); distinct, so indices stay unique.
      dst = np.concatenate([rows, self.max_batch + np.arange(pad, dtype=np.int32)])
      program = self._suffix(route, size, with_confidence)
      if with_confidence:
        self._out, confidence = program(self.variables, self._hidden_buffer, src, self._out, dst)
        confidences.append(confidence[:valid])
      else:
        self._out = program(self.variables, self._hidden_buffer, src, self._out, dst)
      start += valid
    return confidences

  def plan(self, program: str, n: int) -> list[tuple[int, int]]:
    """plan_chunks on the program's measured costs (prefix plans end within the buffer)."""
    if (program, n) not in self._plans:
      measured = self.chunk_costs.get(program, {})
      costs = measured if set(self.ladder) <= set(measured) else linear_costs(self.ladder)
      costs = {s: costs[s] for s in self.ladder}
      self._plans[program, n] = plan_chunks(
          n, costs, self._buffer_rows if program == 'prefix' else None)
    return self._plans[program, n]

  # --- one call of each program at a ladder size, on fixed inputs (for measuring) -----------

  def _timing_images(self, size):
    if size not in self._timing_inputs:
      self._timing_inputs[size] = jnp.zeros((size, *self.image_shape), self.dtype)
    return self._timing_inputs[size]

  def _run_prefix(self, size):
    self._hidden_buffer, choice = self._prefix(size)(
        self.variables, self._timing_images(size), self._hidden_buffer, np.int32(0))
    return choice

  def _run_suffix(self, route, size):
    rows = np.arange(size, dtype=np.int32)
    self._out = self._suffix(route, size)(self.variables, self._hidden_buffer, rows, self._out,
                                          rows)
    return self._out

  def _run_route(self, route, size):
    return self._route(route, size)(self.variables, self._timing_images(size))

  def _ensure_buffers(self):
    if self._hidden_buffer is None or any(x.is_deleted() for x in jax.tree.leaves(self._hidden_buffer)):
      self._hidden_buffer = jax.tree.map(
          lambda f: jnp.zeros((self._buffer_rows, *f.shape[1:]), f.dtype), self._hidden_shapes)
    if self._out is None or self._out.is_deleted():
      self._out = jnp.zeros((self.max_batch, self.num_classes), self._logits_dtype)

  # --- compiled programs --------------------------------------------------------------------

  def _compile(self, key, fn: Callable, *args, donate: tuple[int, ...] = ()):
    if key not in self.compiled:
      self.compiled[key] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return self.compiled[key]

  def _images_spec(self, size):
    return jax.ShapeDtypeStruct((size, *self.image_shape), self.dtype)

  def _buffer_spec(self):
    return jax.tree.map(lambda f: jax.ShapeDtypeStruct((self._buffer_rows, *f.shape[1:]), f.dtype),
                        self._hidden_shapes)

  def _out_spec(self):
    return jax.ShapeDtypeStruct((self.max_batch, self.num_classes), self._logits_dtype)

  def _prefix(self, size: int):
    model = self.model

    def prefix(variables, images, buffer, offset):
      hidden, routing_logits = model.apply_prefix(variables, images)
      buffer = jax.tree.map(
          lambda s, f: jax.lax.dynamic_update_slice_in_dim(s, f.astype(s.dtype), offset, 0),
          buffer, hidden)
      return buffer, jnp.argmax(routing_logits, axis=-1).astype(jnp.int32)

    return self._compile(('prefix', None, size), prefix, self.variables, self._images_spec(size),
                         self._buffer_spec(), jax.ShapeDtypeStruct((), jnp.int32), donate=(2,))

  def _suffix(self, route: routes_lib.Route, size: int, with_confidence: bool = False):
    model = self.model
    kind = self.escalation.confidence if with_confidence else None

    def suffix(variables, buffer, src, out, dst):
      hidden = jax.tree.map(lambda b: jnp.take(b, src, axis=0, mode='clip'), buffer)
      logits = model.apply_suffix(variables, hidden, route)
      out = out.at[dst].set(logits.astype(out.dtype), mode='drop', indices_are_sorted=True,
                            unique_indices=True)
      return (out, escalation_lib.confidence(logits, kind)) if kind else out

    index = jax.ShapeDtypeStruct((size,), jnp.int32)
    key = ('escalate' if kind else 'suffix', route.name, size)
    return self._compile(key, suffix, self.variables, self._buffer_spec(), index,
                         self._out_spec(), index, donate=(3,))

  def _copy_out(self, n: int):
    return self._compile(('copy_out', None, n), lambda out: out[:n], self._out_spec())

  def _route(self, route: routes_lib.Route, size: int):
    model = self.model

    def static(variables, images):
      return model.apply(variables, images, route=route)

    return self._compile(('route', route.name, size), static, self.variables,
                         self._images_spec(size))

  def _single(self, escalate: bool):
    model, space = self.model, self.routing_space
    escalate = self._escalate_one if escalate else None

    def single(variables, image, force):
      hidden, routing_logits = model.apply_prefix(variables, image)
      branches = [functools.partial(_suffix_branch, model, route) for route in space]
      if escalate is not None:
        logits, choice = jax.lax.cond(
            force >= 0, lambda: (jax.lax.switch(jnp.maximum(force, 0), branches, variables,
                                                hidden), force),
            lambda: escalate(variables, hidden))
        return logits[0], choice
      choice = jnp.argmax(routing_logits[0]).astype(jnp.int32)
      choice = jnp.where(force >= 0, force, choice)
      return jax.lax.switch(choice, branches, variables, hidden)[0], choice

    return self._compile(('single', 'escalate' if escalate else None, 1), single,
                         self.variables, self._images_spec(1),
                         jax.ShapeDtypeStruct((), jnp.int32))

  def _escalate_one(self, variables, hidden):
    """One image's escalation on the device: (logits (1, classes), routing index)."""
    space = [r.name for r in self.routing_space]
    thresholds, kind = self.escalation.thresholds, self.escalation.confidence

    def from_level(level):
      route = self.chain[level]
      logits = self.model.apply_suffix(variables, hidden, route)
      index = jnp.int32(space.index(route.name))
      if level == len(self.chain) - 1:
        return logits, index
      stays = escalation_lib.confidence(logits, kind)[0] >= thresholds[level]
      return jax.lax.cond(stays, lambda: (logits, index), lambda: from_level(level + 1))

    return from_level(0)

  def _check_images(self, images):
    if not hasattr(images, 'shape'):  # A list of images, or of rows: one array.
      images = np.asarray(images)
    check_images(images, self.image_shape[-1], type(self).__name__)
    if np.shape(images)[1:] != self.image_shape:
      raise ValueError(f'images must be (n, {", ".join(map(str, self.image_shape))}) (NHWC), got '
                       f'shape {np.shape(images)}')
    if images.shape[0] < 1:
      raise ValueError('predict needs at least one image')
    if images.dtype != self.dtype:
      images = images.astype(self.dtype)
    return images


def _suffix_branch(model, route, variables, hidden):
  return model.apply_suffix(variables, hidden, route)


def _padded(images, size: int):
  """Pads the batch axis to `size` with zeros (on the host for NumPy inputs)."""
  pad = size - images.shape[0]
  if pad == 0:
    return images
  if isinstance(images, np.ndarray):
    return np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  return jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
