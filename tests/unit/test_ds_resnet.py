"""DS-ResNet: sliced == masked, one compile per route, slice-local gradients, zero-init last BN,
MAdds against a hand formula (ResNet-50 at 224 and a tiny net), and a NumPy reference forward."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import checks
from dsnet_jax import complexity
from dsnet_jax.models import ds_resnet

IMAGE = (32, 32, 3)
TINY = dict(num_classes=10, stem_features=8, group_inner_features=(4, 8, 8, 16),
            group_depths=(1, 1, 2, 2), gate_group=2, prefix_ratio=0.5,
            route_ratios=(0.5, 0.75, 1.0), channel_multiple=2, routing_space=(0, 1, 2))
RESNET50 = (64, (64, 256), (128, 512), (256, 1024), (512, 2048))


def tiny_model(**overrides):
  return ds_resnet.Model(**{**TINY, **overrides})


def images(n, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, *IMAGE))


def randomize_bn(variables, seed=1):
  """Random BN running statistics and affines (this also un-zeroes each block's last BN, so the
  residual branches contribute), so a wrong per-width row or slice would show."""
  def randomize(tree, is_bn):
    flat = traverse_util.flatten_dict(tree)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, (path, value) in zip(keys, sorted(flat.items())):
      if not is_bn(path):
        continue
      if path[-1] in ('scale', 'var'):
        flat[path] = jax.random.uniform(key, value.shape, minval=0.5, maxval=1.5)
      else:  # bias, mean
        flat[path] = 0.1 * jax.random.normal(key, value.shape)
    return traverse_util.unflatten_dict(flat)
  return {'params': randomize(variables['params'], lambda path: 'bn' in path[-2]),
          'batch_stats': randomize(variables['batch_stats'], lambda path: True)}


@pytest.fixture(scope='module')
def model_and_variables():
  """(model, fresh variables, variables with random BN, jitted forward with a static route)."""
  model = tiny_model()
  fresh = jax.jit(lambda k: model.init(k, jnp.zeros((1, *IMAGE)), route='largest'))(
      jax.random.key(0))
  forward = jax.jit(lambda v, x, route: model.apply(v, x, route=route), static_argnames='route')
  return model, fresh, randomize_bn(fresh), forward


def test_route_tables():
  table = ds_resnet.Model().routes
  assert table.names == [str(i) for i in range(13)] + ['largest']
  assert [r.name for r in table.routing_space] == ['0', '1', '2', '3']
  assert table['largest'].widths == RESNET50
  assert table[0].widths == (32, (32, 128), (64, 256), (64, 256), (128, 512))
  assert table[12].widths == (32, (32, 128), (64, 256), (256, 1024), (512, 2048))
  tiny = tiny_model().routes
  assert tiny[1].widths == (4, (2, 8), (4, 16), (6, 24), (12, 48))
  with pytest.raises(ValueError, match="routes '0' and 'largest' .* different widths before"):
    tiny_model(routing_space=(0, 'largest')).routes


def test_sliced_equals_masked_for_mixed_routes(model_and_variables):
  model, _, variables, forward = model_and_variables
  x = images(6)
  per_example = np.array([2, 0, 1, 1, 0, 2])
  masked, _ = checks.assert_masked_equals_sliced(
      model, variables, x, per_example, lambda route: forward(variables, x, route=route))
  assert np.abs(np.asarray(masked)).max() > 1e-2


def test_prefix_suffix_compose_to_call(model_and_variables):
  model, _, variables, forward = model_and_variables
  x = images(6)
  hidden, gate_logits = jax.jit(lambda v, x: model.apply(v, x, method='prefix'))(variables, x)
  assert hidden.shape == (6, 4, 4, 16) and gate_logits.shape == (6, 3)
  logits = jax.jit(lambda v, h: model.apply(v, h, 2, method='suffix'))(variables, hidden)
  np.testing.assert_allclose(logits, forward(variables, x, route=2),
                             atol=checks.tolerance(None, 1.0))  # Two programs: float32 rounding.


def test_bfloat16_keeps_float32_where_it_matters(model_and_variables):
  """Traced only: DS-ResNet's bfloat16 numerics are its layers', which the bfloat16 DS-MBNet
  tests (inference, training) run."""
  model, _, variables, _ = model_and_variables
  checks.assert_float32_where_it_matters(model.clone(dtype=jnp.bfloat16), variables, images(2))


def test_one_compile_per_route(model_and_variables):
  model, _, variables, _ = model_and_variables
  checks.assert_one_compile_per_route(model, variables, images(1), [0, 2, 'largest'], 1)


def test_gradients_outside_the_slice_are_zero(model_and_variables):
  model, _, variables, forward = model_and_variables
  grads = checks.train_mode_gradients(model, variables, images(2), route=0)
  # Route 0: stem 4, layer1 (2, 8), layer2 (4, 16), layer3 (4, 16), layer4 (8, 32).
  slices = [
      (grads['stem_conv']['kernel'], np.s_[..., :4]),
      (grads['groups_0_0']['conv1']['kernel'], np.s_[:, :, :4, :2]),
      (grads['groups_0_0']['shortcut_conv']['kernel'], np.s_[:, :, :4, :8]),
      (grads['groups_1_0']['conv3']['kernel'], np.s_[:, :, :4, :16]),
      (grads['groups_2_0']['conv1']['kernel'], np.s_[:, :, :16, :4]),
      (grads['groups_2_1']['conv2']['kernel'], np.s_[:, :, :4, :4]),
      (grads['groups_2_0']['gate']['se']['conv_reduce']['kernel'], np.s_[:16, :]),
      (grads['groups_3_1']['bn3']['scale'], np.s_[:32]),
      (grads['classifier']['kernel'], np.s_[:32]),
  ]
  checks.assert_gradients_only_inside(slices)
  assert np.all(np.asarray(grads['groups_2_0']['gate']['routing_head']['kernel']) == 0)


def test_fresh_block_is_relu_of_its_shortcut(model_and_variables):
  model, fresh, _, _ = model_and_variables
  for name, params in fresh['params'].items():
    if name.startswith('groups_'):
      assert np.all(np.asarray(params['bn3']['scale']) == 0), name
  x = jax.nn.relu(jax.random.normal(jax.random.key(3), (2, 4, 4, 16)))  # A block output (>= 0).

  @jax.jit
  def blocks(v, x):
    def run(m, x):
      projection = m.groups[3][0]
      shortcut = jax.nn.relu(projection.shortcut_bn(projection.shortcut_conv(x, 32), False))
      return m.groups[2][1](x, 4, 16, False), projection(x, 8, 32, False), shortcut
    return model.apply(v, x, method=run)
  identity, projected, shortcut = blocks(fresh, x)
  np.testing.assert_array_equal(identity, x)
  np.testing.assert_allclose(projected, shortcut, atol=1e-6)


# --- MAdds ----------------------------------------------------------------------------------

def hand_madds(widths, image, depths, in_channels=3, classes=1000, gate_group=2, gate_in=0,
               gate_reduced=0):
  """A plain bottleneck ResNet's multiply-adds, layer by layer (reference convention).

  widths: (stem, (inner, out) per group); strides 1, 2, 2, 2. `gate_reduced` > 0 adds the
  gate's attention head (pool, reduce, expand) at the input of the gate group's first block.
  """
  h = image // 2
  total = in_channels * widths[0] * 7 * 7 * h * h   # stem conv 7x7/2
  h //= 2                                            # max pool 3x3/2: no multiply-adds
  c = widths[0]
  for g, ((inner, out), depth) in enumerate(zip(widths[1:], depths)):
    for b in range(depth):
      if (g, b) == (gate_group, 0) and gate_reduced:
        total += c * h * h + c * gate_reduced + gate_reduced * c
      stride = 2 if (b == 0 and g > 0) else 1
      h_out = math.ceil(h / stride)
      total += c * inner * h * h                     # conv1 1x1
      total += inner * inner * 9 * h_out * h_out     # conv2 3x3 (stride)
      total += inner * out * h_out * h_out           # conv3 1x1
      if b == 0:
        total += c * out * h_out * h_out             # projection 1x1 (stride)
      c, h = out, h_out
  return total + c * h * h + c * classes             # global avg pool + fc


def test_resnet50_largest_madds_is_plain_resnet50():
  plain = hand_madds(RESNET50, 224, (3, 4, 6, 3))
  print(f'plain ResNet-50 at 224: {plain / 1e9:.4f} G MAdds')
  assert plain == 4_089_284_608
  no_attention = complexity.route_complexity(ds_resnet.Model(gate_attention=False), 'largest',
                                             (224, 224, 3))
  assert no_attention.madds == plain
  assert no_attention.params == 25_557_032  # torchvision resnet50's parameter count.
  model = ds_resnet.Model()
  assert complexity.route_complexity(model, 'largest', (224, 224, 3)).madds == hand_madds(
      RESNET50, 224, (3, 4, 6, 3), gate_in=512, gate_reduced=128)
  route0 = model.routes[0]
  assert complexity.route_complexity(model, route0, (224, 224, 3)).madds == hand_madds(
      route0.widths, 224, (3, 4, 6, 3), gate_reduced=128)


def test_tiny_madds_per_route_by_hand():
  model = tiny_model()
  for route in model.routes:
    got = complexity.route_complexity(model, route, IMAGE).madds
    assert got == hand_madds(route.widths, 32, TINY['group_depths'], classes=10, gate_reduced=8)


# --- NumPy reference (NCHW) -----------------------------------------------------------------

def np_conv(x, kernel, stride, pad):
  """x (N, C, H, W); kernel HWIO, already sliced; im2col + einsum in float64."""
  k = kernel.shape[0]
  w = np.asarray(kernel, np.float64).transpose(3, 2, 0, 1)  # OIHW
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  h_out = (x.shape[2] - k) // stride + 1
  w_out = (x.shape[3] - k) // stride + 1
  cols = np.stack([x[:, :, i:i + stride * h_out:stride, j:j + stride * w_out:stride]
                   for i in range(k) for j in range(k)], axis=2)
  return np.einsum('nckhw,ock->nohw', cols, w.reshape(w.shape[0], w.shape[1], k * k))


def np_bn(x, bn, stats, width, widths):
  row = widths.index(width)
  mean = np.asarray(stats['mean'], np.float64)[row, :width]
  var = np.asarray(stats['var'], np.float64)[row, :width]
  scale = np.asarray(bn['scale'], np.float64)[:width]
  bias = np.asarray(bn['bias'], np.float64)[:width]
  c = lambda v: v[None, :, None, None]
  return (x - c(mean)) / np.sqrt(c(var) + 1e-5) * c(scale) + c(bias)


def np_maxpool(x):
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  h_out = (x.shape[2] - 3) // 2 + 1
  w_out = (x.shape[3] - 3) // 2 + 1
  return np.max(np.stack([x[:, :, i:i + 2 * h_out:2, j:j + 2 * w_out:2]
                          for i in range(3) for j in range(3)]), axis=0)


def np_forward(variables, table, route, x_nhwc, depths, gate_group):
  relu = lambda v: np.maximum(v, 0)
  params, stats = variables['params'], variables['batch_stats']
  all_widths = [r.widths for r in table]
  widths_of = lambda pick: sorted({pick(w) for w in all_widths})
  w = route.widths
  x = np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)
  x = np_conv(x, params['stem_conv']['kernel'][..., :w[0]], 2, 3)
  x = np_maxpool(relu(np_bn(x, params['stem_bn'], stats['stem_bn'], w[0],
                            widths_of(lambda v: v[0]))))
  for g, depth in enumerate(depths):
    inner, out = w[g + 1]
    inner_widths = widths_of(lambda v: v[g + 1][0])
    out_widths = widths_of(lambda v: v[g + 1][1])
    for b in range(depth):
      name = f'groups_{g}_{b}'
      p, st = params[name], stats[name]
      c = x.shape[1]
      if (g, b) == (gate_group, 0):
        se = p['gate']['se']
        z = relu(x.mean((2, 3)) @ np.asarray(se['conv_reduce']['kernel'], np.float64)[:c]
                 + np.asarray(se['conv_reduce']['bias'], np.float64))
        a = 1 / (1 + np.exp(-(z @ np.asarray(se['conv_expand']['kernel'], np.float64)[:, :c]
                              + np.asarray(se['conv_expand']['bias'], np.float64)[:c])))
        x = x * a[:, :, None, None]
      stride = 2 if (b == 0 and g > 0) else 1
      y = relu(np_bn(np_conv(x, p['conv1']['kernel'][:, :, :c, :inner], 1, 0), p['bn1'],
                     st['bn1'], inner, inner_widths))
      y = relu(np_bn(np_conv(y, p['conv2']['kernel'][:, :, :inner, :inner], stride, 1),
                     p['bn2'], st['bn2'], inner, inner_widths))
      y = np_bn(np_conv(y, p['conv3']['kernel'][:, :, :inner, :out], 1, 0), p['bn3'], st['bn3'],
                out, out_widths)
      if b == 0:
        x = np_bn(np_conv(x, p['shortcut_conv']['kernel'][:, :, :c, :out], stride, 0),
                  p['shortcut_bn'], st['shortcut_bn'], out, out_widths)
      x = relu(y + x)
  pooled = x.mean((2, 3))
  fc = params['classifier']
  return (pooled @ np.asarray(fc['kernel'], np.float64)[:pooled.shape[1]]
          + np.asarray(fc['bias'], np.float64))


@pytest.mark.parametrize('route', [0, 2, 'largest'])
def test_matches_numpy_reference(model_and_variables, route):
  model, _, variables, forward = model_and_variables
  x = images(6)  # The shape the other tests compiled.
  got = forward(variables, x, route=route)
  want = np_forward(jax.device_get(variables), model.routes, model.routes[route], x,
                    TINY['group_depths'], TINY['gate_group'])
  err = np.abs(np.asarray(got, np.float64) - want).max()
  print(f'route {route}: max |jax - numpy| = {err:.2e}')
  assert err < 1e-4
  assert np.abs(want).max() > 1e-2
