"""DS-ViT++: sliced == masked, idle slicing, slice-local gradients, a NumPy reference, MAdds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import checks
from dsnet_jax import complexity
from dsnet_jax.models import ds_vit
from dsnet_jax.errors import UnknownRouteError

IMAGE = (32, 32, 3)
TINY = dict(variant=None, width=48, depth=4, num_heads=3, mlp_dim=96, patch_size=8,
            image_size=32, num_classes=10, group_depths=(1, 1, 1, 1),
            level_fractions=(1 / 3, 2 / 3, 1.0), routing_space=(0, 2, 4, 6))
HEAD_DIM = 16
TOKENS = (32 // 8) ** 2 + 1
GATE_REDUCED = 12  # round(0.25 * 48)


def randomize(shapes, seed=1):
  """O(1) random parameters (NumPy, no compile), so a wrong slice or mask shows in the logits."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, x in leaves:
    name = jax.tree_util.keystr(path[-1:])
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if x.ndim >= 2 and 'embed' not in name and 'token' not in name:  # kernels
      out.append(noise / np.sqrt(np.prod(x.shape[:-1])))
    elif 'scale' in name:
      out.append(1 + 0.2 * noise)
    else:
      out.append(0.5 * noise)
  return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in out])


@pytest.fixture(scope='module')
def model_and_variables():
  model = ds_vit.Model(**TINY)
  # Full-size shapes from init on route 'largest'; values random (a jitted init compiles slowly).
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)),
                                             route='largest'))
  assert set(shapes) == {'params'}
  return model, {'params': randomize(shapes['params'])}


# One jitted forward shared by the tests: each (route, batch shape) compiles once.
forward = jax.jit(lambda model, v, x, route: model.apply(v, x, route=route),
                  static_argnums=(0,), static_argnames='route')


def images(n=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, *IMAGE)), jnp.float32)


def test_variants_decode_in_one_place():
  s16 = ds_vit.decode_variant('S/16')
  assert (s16.width, s16.depth, s16.num_heads, s16.head_dim, s16.mlp_dim, s16.patch_size) == (
      384, 12, 6, 64, 1536, 16)
  assert ds_vit.decode_variant('Ti/16').num_heads == 3
  assert ds_vit.decode_variant('B/16', depth=6).depth == 6
  with pytest.raises(ValueError, match='unknown ViT variant'):
    ds_vit.decode_variant('L/16')


def test_route_table_and_full_size_init(model_and_variables):
  model, variables = model_and_variables
  table = model.routes
  assert table.names == [str(i) for i in range(7)] + ['largest']
  assert [r.name for r in table.routing_space] == ['0', '2', '4', '6']
  assert table[2].widths == ((16, 1, 32), (16, 1, 32), (32, 2, 64), (32, 2, 64))
  assert table['largest'].widths == ((48, 3, 96),) * 4
  p = variables['params']
  assert p['blocks_3']['attn']['query']['kernel'].shape == (48, 48)
  assert p['blocks_3']['mlp']['fc1']['kernel'].shape == (48, 96)
  assert p['gate']['reduce']['kernel'].shape == (48, GATE_REDUCED)
  assert p['gate']['routing_head']['kernel'].shape == (GATE_REDUCED, 4)
  assert p['pos_embed'].shape == (1, TOKENS, 48)
  with pytest.raises(UnknownRouteError, match='unknown route'):
    model.apply(variables, images(1), route='7')


# bfloat16 runs the slimmest and the widest routing choice only: each bfloat16 route takes
# seconds to compile on a CPU.
@pytest.mark.parametrize('dtype, per_example', [(None, (2, 0, 3, 1)), (jnp.bfloat16, (3, 0, 0, 3))],
                         ids=checks.DTYPE_IDS)
def test_sliced_equals_masked_for_mixed_routes(model_and_variables, dtype, per_example):
  float32_model, variables = model_and_variables
  model = float32_model.clone(dtype=dtype)
  x = images()
  per_example = np.array(per_example)
  masked, gate_logits = checks.assert_masked_equals_sliced(
      model, variables, x, per_example,
      lambda route: forward(model, variables, x, route=route.name))
  scale = float(np.abs(np.asarray(masked)).max())
  assert scale > 1e-1  # Not trivially small.
  if dtype is None:
    # prefix + suffix is the sliced forward (in any dtype: the same code).
    hidden, prefix_logits = model.apply(variables, x, method='prefix')
    np.testing.assert_allclose(prefix_logits, gate_logits, atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, hidden, '2', method='suffix'),
                               forward(model, variables, x, route='2'), atol=1e-5)
    return
  checks.assert_float32_where_it_matters(model, variables, x)
  # Near the float32 logits: here each layer's rounding adds up (2^-8 of the scale measured);
  # 2^-5 would be eight roundings of the largest logit.
  space = model.routes.routing_space
  exact = np.stack([forward(float32_model, variables, x, route=space[k].name)[i]
                    for i, k in enumerate(per_example)])
  error = float(np.abs(np.asarray(masked) - exact).max())
  print(f'|bfloat16 - float32| = {error / scale:.2e} of the logit scale')
  assert error <= 2.0 ** -5 * scale


def test_one_compile_per_route(model_and_variables):
  model, variables = model_and_variables
  checks.assert_one_compile_per_route(model, variables, images(2), [0, 'largest'], 2)


def test_idle_channels_pass_through_a_block(model_and_variables):
  model, variables = model_and_variables
  x = jax.random.normal(jax.random.key(3), (2, TOKENS, 48))
  run = jax.jit(lambda widths, x: model.apply(variables, x,
                                              method=lambda m, x: m.blocks[2](x, widths)),
                static_argnums=0)
  y = np.asarray(run(ds_vit.BlockWidths(16, 2, 64), x))
  np.testing.assert_array_equal(y[..., 16:], np.asarray(x)[..., 16:])
  assert np.abs(y[..., :16] - np.asarray(x)[..., :16]).min() > 0
  # Masked: each example keeps the channels past its own width.
  @jax.jit
  def run_masked(x, onehot):
    mw = lambda *choices: ds_vit.MaskedWidth(onehot, choices)
    widths = ds_vit.BlockWidths(mw(16, 32), mw(1, 3), mw(32, 96))
    return model.apply(variables, x, method=lambda m, x: m.blocks[2](x, widths))
  y = np.asarray(run_masked(x, jax.nn.one_hot(np.array([0, 1]), 2)))
  np.testing.assert_array_equal(y[0, :, 16:], np.asarray(x)[0, :, 16:])
  np.testing.assert_array_equal(y[1, :, 32:], np.asarray(x)[1, :, 32:])
  np.testing.assert_allclose(y[1:], run(ds_vit.BlockWidths(32, 3, 96), x[1:]), atol=1e-5)


def test_gradients_outside_the_slice_are_zero(model_and_variables):
  model, variables = model_and_variables

  def loss(params):
    return jnp.sum(model.apply({'params': params}, images(), route=2) ** 2)
  grads = jax.jit(jax.grad(loss))(variables['params'])
  # Route 2: groups at (16, 1, 32), (16, 1, 32), (32, 2, 64), (32, 2, 64); head at width 32.
  slices = [
      (grads['blocks_1']['mlp']['fc1']['kernel'], np.s_[:16, :32]),
      (grads['blocks_1']['mlp']['fc2']['kernel'], np.s_[:32, :16]),
      (grads['blocks_1']['norm1']['scale'], np.s_[:16]),
      (grads['blocks_2']['attn']['query']['kernel'], np.s_[:32, :2 * HEAD_DIM]),
      (grads['blocks_2']['attn']['value']['bias'], np.s_[:2 * HEAD_DIM]),
      (grads['blocks_3']['attn']['out']['kernel'], np.s_[:2 * HEAD_DIM, :32]),
      (grads['blocks_3']['norm2']['scale'], np.s_[:32]),
      (grads['norm']['scale'], np.s_[:32]),
      (grads['head']['kernel'], np.s_[:32]),
      (grads['cls_token'], np.s_[..., :32]),
      (grads['pos_embed'], np.s_[..., :32]),
      (grads['patch_embed']['kernel'], np.s_[..., :32]),
      (grads['gate']['reduce']['kernel'], np.s_[:16]),
  ]
  checks.assert_gradients_only_inside(slices)
  # The routing head is not on a static route's loss.
  assert np.all(np.asarray(grads['gate']['routing_head']['kernel']) == 0)


def _gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _layer_norm(x, p, eps=1e-6):
  d = x.shape[-1]
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'][:d] + p['bias'][:d]


def _dense(x, p, d_out):
  return x @ p['kernel'][:x.shape[-1], :d_out] + p['bias'][:d_out]


def numpy_forward(params, x, widths):
  """Plain NumPy (float64) DS-ViT forward at one route's widths."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, patch = x.shape[0], 8
  g = 32 // patch
  patches = x.reshape(b, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  tokens = patches @ p['patch_embed']['kernel'].reshape(-1, 48) + p['patch_embed']['bias']
  x = np.concatenate([np.broadcast_to(p['cls_token'], (b, 1, 48)), tokens], 1) + p['pos_embed']
  for i, (d, heads, mlp) in enumerate(widths):
    bp = p[f'blocks_{i}']
    s = x[..., :d]
    y = _layer_norm(s, bp['norm1'])
    inner = heads * HEAD_DIM
    q, k, v = (_dense(y, bp['attn'][n], inner).reshape(b, TOKENS, heads, HEAD_DIM)
               for n in ('query', 'key', 'value'))
    scores = np.einsum('bqhc,bkhc->bhqk', q, k) / np.sqrt(HEAD_DIM)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum('bhqk,bkhc->bqhc', probs, v).reshape(b, TOKENS, inner)
    s = s + _dense(o, bp['attn']['out'], d)
    y = _gelu(_dense(_layer_norm(s, bp['norm2']), bp['mlp']['fc1'], mlp))
    s = s + _dense(y, bp['mlp']['fc2'], d)
    x = np.concatenate([s, x[..., d:]], -1)
    if i == 0:  # The gate's attention head, after group 0.
      gp = p['gate']
      z = np.maximum(_dense(_layer_norm(x[:, 0, :d], gp['norm']), gp['reduce'], GATE_REDUCED), 0)
      x = x / (1 + np.exp(-_dense(z, gp['expand'], 48)))[:, None, :]
  final = max(w[0] for w in widths)
  return _dense(_layer_norm(x[:, 0, :final], p['norm']), p['head'], 10)


@pytest.mark.parametrize('route', ['2', '6', 'largest'])
def test_matches_numpy_reference(model_and_variables, route):
  model, variables = model_and_variables
  x = images()
  got = forward(model, variables, x, route=route)
  want = numpy_forward(variables['params'], x, model.routes[route].widths)
  err = np.abs(np.asarray(got, np.float64) - want).max()
  print(f'route {route}: max |jax - numpy| = {err:.2e}, max |logit| = {np.abs(want).max():.2f}')
  assert err < 1e-4
  assert np.abs(want).max() > 1e-1


def test_drop_path_only_on_largest(model_and_variables):
  model, variables = model_and_variables
  x = images()

  @jax.jit(static_argnames='route')
  def run(v, x, key, route):
    return model.apply(v, x, route=route, train=True, rngs={'dropout': key})
  keys = jax.random.key(0), jax.random.key(1)
  largest = [np.asarray(run(variables, x, k, route='largest')) for k in keys]
  assert np.abs(largest[0] - largest[1]).max() > 1e-2
  route6 = [np.asarray(run(variables, x, k, route='6')) for k in keys]
  np.testing.assert_array_equal(*route6)
  np.testing.assert_allclose(route6[0], forward(model, variables, x, route='6'), atol=1e-5)


def hand_madds(widths, image, patch, channels_in, width, classes, head_dim, gate_reduced):
  """Our ViT MAdds: conv/linear in*out per output, attention q.k and probs.v, no norms."""
  n = (image // patch) ** 2
  tokens = n + 1
  total = channels_in * patch * patch * width * n  # patch embedding
  for s, (d, heads, mlp) in enumerate(widths):
    inner = heads * head_dim
    total += (3 * d * inner + inner * d + 2 * d * mlp) * tokens + 2 * inner * tokens ** 2
    if s == 0:
      total += widths[0][0] * gate_reduced + gate_reduced * width  # gate attention head
  return total + max(w[0] for w in widths) * classes


def test_madds_match_hand_count_on_tiny_model():
  model = ds_vit.Model(**TINY)
  for route in model.routes:  # One block per group.
    got = complexity.route_complexity(model, route, IMAGE).madds
    assert got == hand_madds(route.widths, 32, 8, 3, 48, 10, HEAD_DIM, GATE_REDUCED), route
  plain = complexity.route_complexity(model, 0, IMAGE)
  gated = complexity.route_complexity(model, 0, IMAGE, with_gate=True)
  assert gated.madds - plain.madds == GATE_REDUCED * 4


def test_s16_route_table():
  model = ds_vit.Model()
  blocks = lambda route: tuple(w for w in route.widths for _ in range(3))
  madds = {r.name: hand_madds(blocks(r), 224, 16, 3, 384, 1000, 64, 96) for r in model.routes}
  print({k: round(v / 1e6, 1) for k, v in madds.items()})
  numbered = [v for k, v in madds.items() if k != 'largest']
  assert len(numbered) >= 8 and numbered == sorted(numbered)
  assert max(numbered) / min(numbered) >= 3
  assert len(model.routes.routing_space) == 4
  for route in (0, 'largest'):
    assert complexity.route_complexity(model, route, (224, 224, 3)).madds == madds[str(route)]
  assert abs(madds['largest'] / 1e9 - 4.6) < 0.05  # DeiT-S: 4.6 G (MACs).


@pytest.mark.parametrize('route', [0, 'largest'])
def test_xla_cost_analysis_agrees_roughly(route):
  model = ds_vit.Model(**TINY)
  variables = model.abstract_variables(IMAGE)
  x = jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32)
  flops = complexity.xla_flops(lambda v, x: model.apply(v, x, route=route), variables, x)
  madds = complexity.route_complexity(model, route, IMAGE).madds
  ratio = flops / (2 * madds)
  print(f'route {route}: XLA flops / (2 * MAdds) = {ratio:.3f}')
  # XLA also counts LayerNorm, softmax, GELU and elementwise ops; the tiny model is
  # elementwise-heavy, so the band is loose.
  assert 0.95 < ratio < 2.0
