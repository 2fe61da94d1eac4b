"""A function of (variables, inputs), specialised to fixed variables: the static program.

`specialize(fn, variables, *input_specs)` traces `fn(variables, *inputs)` once and partially
evaluates it. Every value that depends on the variables alone is computed here, once: a route's
prefix slices of the full-size kernels, the row of per-width BatchNorm statistics it reads,
BatchNorm's scale and shift, calibrated routing offsets. What depends on the inputs is kept as
a list of JAX primitives. Then each per-channel affine chain behind a convolution or a matmul
(eval-mode BatchNorm, a bias) is folded into that op: kernel * s and one bias t.

The result, a `StaticProgram`, holds the parameters the remaining program reads (a flat dict:
name -> array, named by the variables' paths: 'stem_conv/kernel', 'stem_conv/bias') and
replays the program as an ordinary JAX function, so that `jax.export` and ONNX converters see a
plain static network: no route, no mask, no BatchNorm, no unused weights. One mechanism serves
every model family and any function of the variables (a route, a gate's prefix, a suffix).

    program = specialize(lambda v, x: model.apply(v, x, route=2), variables,
                         jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32))
    logits = program(program.params, images)     # == model.apply(variables, images, route=2)
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from dsnet_jax.layers.linear import depthwise_conv_by_taps

# Call-like primitives whose body is inlined, so that what inside them depends on the
# variables alone is evaluated too.
_INLINED = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call', 'custom_vjp_call',
            'custom_vjp_call_jaxpr', 'remat', 'checkpoint')
# Per-channel ops an affine chain folds: y = x * s + t.
_AFFINE = ('mul', 'div', 'add', 'sub')


@dataclasses.dataclass
class _Step:
  """One primitive of the input-dependent program; nodes are ints."""
  primitive: Any
  params: dict
  inputs: list[int]
  outputs: list[int]
  # A folded linear op: (bias node or None, output dtype, the node the chain ended in).
  fold: tuple[int | None, Any, int] | None = None


class _Trace:
  """Walks a jaxpr: known nodes get values, the others become `_Step`s.

  A cast of a parameter to a narrower float (bfloat16 compute) stays a step: what ships is
  the float32 parameter, which NumPy and ONNX read, and the program casts it.
  """

  def __init__(self):
    self.values: dict[int, Any] = {}    # Known node -> value.
    self.origins: dict[int, str] = {}   # Known node -> the variables' path it derives from.
    self.avals: dict[int, Any] = {}
    self.steps: list[_Step] = []

  def node(self, aval, value=None, origin=None) -> int:
    n = len(self.avals)
    self.avals[n] = aval
    if value is not None:
      self.values[n] = value
      if origin is not None:
        self.origins[n] = origin
    return n

  def walk(self, jaxpr, consts, inputs: list[int]) -> list[int]:
    env = {}
    for var, value in zip(jaxpr.constvars, consts):
      env[var] = self.node(var.aval, value)
    env.update(zip(jaxpr.invars, inputs))

    def read(atom):
      if isinstance(atom, core.Literal):
        return self.node(atom.aval, atom.val)
      return env[atom]

    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      body = _body(eqn)
      if body is not None:
        outs = self.walk(*body, ins)
      elif self._evaluable(eqn, ins):
        values = eqn.primitive.bind(*[self.values[n] for n in ins], **eqn.params)
        values = values if eqn.primitive.multiple_results else [values]
        origin = next((self.origins[n] for n in ins if n in self.origins), None)
        outs = [self.node(v.aval, value, origin) for v, value in zip(eqn.outvars, values)]
      else:
        outs = [self.node(v.aval) for v in eqn.outvars]
        self.steps.append(_Step(eqn.primitive, dict(eqn.params), ins, outs))
      for var, n in zip(eqn.outvars, outs):
        if not isinstance(var, core.DropVar):
          env[var] = n
    return [read(a) for a in jaxpr.outvars]

  def _evaluable(self, eqn, ins) -> bool:
    """Known inputs, concrete output shapes, and not an expansion (a broadcast to the batch
    stays in the program, so that parameters stay their own size)."""
    if not all(n in self.values for n in ins):
      return False
    if not all(all(isinstance(d, int) for d in v.aval.shape) for v in eqn.outvars):
      return False
    if eqn.primitive.name == 'broadcast_in_dim':
      return eqn.outvars[0].aval.size <= self.avals[ins[0]].size
    if eqn.primitive.name == 'convert_element_type':  # Parameters ship in float32 (or wider);
      new, old = jnp.dtype(eqn.params['new_dtype']), jnp.dtype(self.avals[ins[0]].dtype)
      return not (jnp.issubdtype(old, jnp.floating) and new.itemsize < old.itemsize)
    return True


def _body(eqn):
  """(jaxpr, consts) of a call-like primitive to inline, else None."""
  if eqn.primitive.name not in _INLINED:
    return None
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if key in eqn.params:
      body = eqn.params[key]
      return (body.jaxpr, body.consts) if isinstance(body, core.ClosedJaxpr) else (body, ())
  return None


@dataclasses.dataclass(eq=False)
class StaticProgram:
  """The input-dependent part of a function, its parameters precomputed (see module doc).

  Attributes:
    params: name -> NumPy array, what the program reads (sliced, folded kernels; biases).
    input_specs: the flat inputs' ShapeDtypeStructs it was traced for (a symbolic batch stays
      symbolic: the program runs on any batch size).
    out_tree: the outputs' tree structure.
  """
  params: dict[str, np.ndarray]
  input_specs: tuple
  out_tree: Any
  _steps: list[_Step]
  _inputs: list[int]
  _outputs: list[int]
  _param_nodes: dict[str, int]
  _constants: dict[int, Any]
  _call: Any = None  # The exported program's call, jitted (cached per input shape).

  def __call__(self, params, *inputs, onnx: bool = False):
    """Traces the program on `params` (a dict like `self.params`) and inputs shaped like
    `input_specs` (symbolic dimensions included: use `call` or `export` on concrete arrays).

    For XLA (`onnx=False`) depthwise convs run as shifted taps on CPU (XLA:CPU's grouped conv
    is slow) and as grouped convs elsewhere, chosen when the program is lowered, so one
    jax.export artifact serves both. For ONNX they stay grouped convs, and an NHWC max pool
    becomes the max of its shifted windows (jax2onnx lowers `reduce_window_max` to a 4-D
    MaxPool that onnxruntime refuses).
    """
    missing = set(self._param_nodes) - set(params)
    if missing:
      raise KeyError(f'params lack {sorted(missing)[:5]} ({len(missing)} in all)')
    env = dict(self._constants)
    env.update({n: jnp.asarray(params[name]) for name, n in self._param_nodes.items()})
    flat_inputs = jax.tree.leaves(inputs)
    if len(flat_inputs) != len(self._inputs):
      raise ValueError(f'the program takes {len(self._inputs)} input arrays, got '
                       f'{len(flat_inputs)}')
    env.update(zip(self._inputs, flat_inputs))
    for step in self._steps:
      args = [env[n] for n in step.inputs]
      if not onnx and _is_depthwise(step):
        outs = [_depthwise_by_platform(step, *args)]
      elif onnx and _is_spatial_max_pool(step):
        outs = [_max_pool_by_taps(step, *args)]
      else:
        outs = step.primitive.bind(*args, **step.params)
        outs = outs if step.primitive.multiple_results else [outs]
      if step.fold is not None:
        bias, dtype, last = step.fold
        y = outs[0].astype(dtype)
        env[last] = y if bias is None else y + env[bias].astype(dtype)
      else:
        env.update(zip(step.outputs, outs))
    return jax.tree.unflatten(self.out_tree, [env[n] for n in self._outputs])

  def export(self, platforms=('cpu',)) -> jax.export.Exported:
    """The program as a `jax.export` artifact taking (params, *inputs): any batch size when
    the batch was traced symbolic, lowered for each of `platforms`."""
    specs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), self.params)
    return jax.export.export(jax.jit(self.__call__), platforms=tuple(platforms))(
        specs, *self.input_specs)

  def call(self, *inputs):
    """Runs the program on concrete inputs of any batch size, with its own params."""
    if self._call is None:
      self._call = jax.jit(self.export((jax.default_backend(),)).call)
    return self._call(self.params, *inputs)

  @property
  def num_params(self) -> int:
    return int(sum(p.size for p in self.params.values()))

  @property
  def primitives(self) -> collections.Counter:
    """How often each primitive runs in the program (folded chains count once)."""
    return collections.Counter(s.primitive.name for s in self._steps)


def specialize(fn: Callable, variables, *input_specs) -> StaticProgram:
  """Partially evaluates `fn(variables, *inputs)` at `variables` (see the module doc).

  Args:
    fn: a JAX-traceable function of (variables, *inputs).
    variables: a pytree of arrays (its dict keys name the parameters).
    *input_specs: pytrees of jax.ShapeDtypeStruct; a symbolic dimension
      (`jax.export.symbolic_shape`) stays symbolic.
  Returns:
    The StaticProgram: `program(program.params, *inputs)` equals `fn(variables, *inputs)`.
  """
  closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(variables, *input_specs)
  trace = _Trace()
  paths, _ = jax.tree_util.tree_flatten_with_path(variables)
  inputs = []
  for path, value in paths:
    value = np.asarray(value)
    inputs.append(trace.node(jax.core.ShapedArray(value.shape, value.dtype), value,
                             _path_name(path)))
  flat_specs = jax.tree.leaves(input_specs)
  input_nodes = [trace.node(jax.core.ShapedArray(s.shape, s.dtype)) for s in flat_specs]
  outputs = trace.walk(closed.jaxpr, closed.consts, inputs + input_nodes)
  _fold_affine_chains(trace, outputs)
  _remove_dead_steps(trace, outputs)

  used = [n for s in trace.steps for n in s.inputs + ([s.fold[0]] if s.fold else [])]
  used += outputs
  param_nodes, constants = {}, {}
  for n in dict.fromkeys(used):
    if n not in trace.values:
      continue
    if n in trace.origins:
      param_nodes[_unique(trace.origins[n], param_nodes)] = n
    else:
      constants[n] = trace.values[n]
  params = {name: np.asarray(trace.values[n]) for name, n in param_nodes.items()}
  return StaticProgram(params, tuple(flat_specs), jax.tree.structure(out_shapes), trace.steps,
                       input_nodes, outputs, param_nodes, constants)


def _fold_affine_chains(trace: _Trace, outputs: list[int]) -> None:
  """Folds y = (conv(x, K) [op k]...) with per-channel known k into conv(x, K * s) + t."""
  consumers = collections.defaultdict(list)
  for step in trace.steps:
    for n in step.inputs:
      consumers[n].append(step)
  for n in outputs:
    consumers[n].append(None)
  removed = set()
  producers = {n: step for step in trace.steps for n in step.outputs}
  for step in trace.steps:
    linear = _linear_kernel(trace, step)
    if linear is None:
      continue
    index, axis = linear
    kernel_at = _known_source(trace, step, index, producers, consumers)
    if kernel_at is None:
      continue
    node = step.outputs[0]
    channels = trace.avals[node].shape[-1]
    scale, shift = np.ones(channels), np.zeros(channels)
    dtype, chain, last_origin = trace.avals[node].dtype, [], None
    while len(consumers[node]) == 1 and consumers[node][0] is not None:
      nxt = consumers[node][0]
      name = nxt.primitive.name
      if name == 'convert_element_type' and jnp.issubdtype(nxt.params['new_dtype'],
                                                           jnp.floating):
        dtype = nxt.params['new_dtype']
      elif name in _AFFINE and len(nxt.inputs) == 2:
        first = nxt.inputs[0] == node
        other = nxt.inputs[1] if first else nxt.inputs[0]
        k = _per_channel(trace, other, channels)
        if k is None or (name in ('sub', 'div') and not first):
          break
        if name == 'mul':
          scale, shift = scale * k, shift * k
        elif name == 'div':
          scale, shift = scale / k, shift / k
        else:
          shift = shift + k if name == 'add' else shift - k
        last_origin = trace.origins.get(other, last_origin)
      else:
        break
      chain.append(nxt)
      node = nxt.outputs[0]
    if not any(s.primitive.name in _AFFINE for s in chain):
      continue
    owner, at = kernel_at
    kernel_node = owner.inputs[at]
    kernel = np.asarray(trace.values[kernel_node])
    shape = [1] * kernel.ndim
    shape[axis] = channels
    folded = (kernel.astype(np.float64) * scale.reshape(shape)).astype(kernel.dtype)
    origin = trace.origins.get(kernel_node, last_origin or 'folded/kernel')
    owner.inputs[at] = trace.node(trace.avals[kernel_node], folded, origin)
    bias = None
    if np.any(shift):
      stem = origin.rsplit('/', 1)[0] if '/' in origin else origin
      wide = jnp.promote_types(dtype, jnp.float32)  # Cast to `dtype` when it runs.
      bias = trace.node(jax.core.ShapedArray((channels,), wide), shift.astype(wide),
                        f'{stem}/bias')
    step.fold = (bias, dtype, node)
    removed.update(id(s) for s in chain)
  trace.steps[:] = [s for s in trace.steps if id(s) not in removed]


def _remove_dead_steps(trace: _Trace, outputs: list[int]) -> None:
  """Drops steps no output depends on (a route's forward still computes the routing logits
  it does not use; their head's weights must not ship)."""
  live = set(outputs)
  kept = []
  for step in reversed(trace.steps):
    ends = [step.fold[2]] if step.fold else step.outputs
    if live.intersection(ends):
      kept.append(step)
      live.update(step.inputs)
      if step.fold and step.fold[0] is not None:
        live.add(step.fold[0])
  trace.steps[:] = kept[::-1]


def _known_source(trace: _Trace, step: _Step, index: int, producers, consumers
                  ) -> tuple[_Step, int] | None:
  """(step, input index) holding the known kernel of `step`'s input `index`: the input
  itself, or through a cast (a bfloat16 conv's) used only there; else None."""
  node = step.inputs[index]
  if node in trace.values:
    return step, index
  cast = producers.get(node)
  if (cast is not None and cast.primitive.name == 'convert_element_type'
      and cast.inputs[0] in trace.values and len(consumers[node]) == 1):
    return cast, 0
  return None


def _linear_kernel(trace: _Trace, step: _Step) -> tuple[int, int] | None:
  """(input index of the kernel, its output-channel axis) when `step` is a conv or a matmul
  whose output channels are the output's last axis; else None."""
  if len(step.outputs) != 1 or len(step.inputs) != 2:
    return None
  out_rank = len(trace.avals[step.outputs[0]].shape)
  if step.primitive.name == 'conv_general_dilated':
    numbers = step.params['dimension_numbers']
    if step.params['batch_group_count'] != 1 or numbers.out_spec[1] != out_rank - 1:
      return None
    return 1, numbers.rhs_spec[0]
  if step.primitive.name == 'dot_general':
    (_, rhs_contract), (lhs_batch, _) = step.params['dimension_numbers']
    rank = len(trace.avals[step.inputs[1]].shape)
    if lhs_batch or rank != 2 or tuple(rhs_contract) != (0,):
      return None
    return 1, 1
  return None


def _per_channel(trace: _Trace, node: int, channels: int) -> np.ndarray | None:
  """A known value that broadcasts along the last axis only, as (channels,) float64."""
  if node not in trace.values:
    return None
  value = np.asarray(trace.values[node], np.float64)
  if value.size == 1:
    return np.full(channels, value.reshape(()))
  if value.size == channels and value.shape[-1] == channels:
    return value.reshape(channels)
  return None


def _is_depthwise(step: _Step) -> bool:
  if step.primitive.name != 'conv_general_dilated':
    return False
  p = step.params
  return (p['feature_group_count'] > 1 and p['dimension_numbers'].rhs_spec == (3, 2, 0, 1)
          and p['dimension_numbers'].lhs_spec == (0, 3, 1, 2)
          and set(p['lhs_dilation']) == {1} and set(p['rhs_dilation']) == {1}
          and len(set(p['window_strides'])) == 1
          and all(lo == hi for lo, hi in p['padding']) and len(set(p['padding'])) == 1)


def _depthwise_by_platform(step: _Step, x, kernel):
  stride, pad = step.params['window_strides'][0], step.params['padding'][0][0]

  def taps(x, kernel):
    return depthwise_conv_by_taps(x, kernel, stride, pad)

  def grouped(x, kernel):
    return step.primitive.bind(x, kernel, **step.params)

  return jax.lax.platform_dependent(x, kernel, cpu=taps, default=grouped)


def _is_spatial_max_pool(step: _Step) -> bool:
  p = step.params
  return (step.primitive.name == 'reduce_window_max' and len(p['window_dimensions']) == 4
          and p['window_dimensions'][0] == p['window_dimensions'][3] == 1
          and p['window_strides'][0] == p['window_strides'][3] == 1
          and set(p['base_dilation']) == {1} and set(p['window_dilation']) == {1}
          and p['padding'][0] == p['padding'][3] == (0, 0))


def _max_pool_by_taps(step: _Step, x):
  """An NHWC max pool as the elementwise max of its k*k shifted, strided windows."""
  p = step.params
  (_, kh, kw, _), (_, sh, sw, _) = p['window_dimensions'], p['window_strides']
  x = jnp.pad(x, p['padding'], constant_values=-jnp.inf)
  n, h, w, c = x.shape
  h_out, w_out = (h - kh) // sh + 1, (w - kw) // sw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(x, (0, i, j, 0), (n, i + (h_out - 1) * sh + 1,
                                            j + (w_out - 1) * sw + 1, c), (1, sh, sw, 1))
      y = tap if y is None else jnp.maximum(y, tap)
  return y


def _path_name(path) -> str:
  names = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
  if names and names[0] == 'params':
    names = names[1:]
  return '/'.join(names)


def _unique(name: str, taken) -> str:
  if name not in taken:
    return name
  i = 1
  while f'{name}:{i}' in taken:
    i += 1
  return f'{name}:{i}'
