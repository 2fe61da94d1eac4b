"""Stage II's gradient in the route weights, in the authors' mask placement, against a plain-JAX
masked forward written from their description (not from our masked path): every dynamic conv's
output masked by the route weights (pointwise, depthwise, SE's expand); BatchNorm normalising
with per-width statistics mixed by the route weights, each width's row padded with zeros past
it (mean and variance), then masked again."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsnet_jax.models import ds_mbnet

GROUP_WIDTHS = ((8, 12), (8, 12), (12, 16), (8, 12, 16, 20), (16, 20, 24, 28))
SPACE = (0, 1, 2)
IMAGE = (16, 16, 1)


@pytest.fixture(scope='module')
def model_and_variables():
  model = ds_mbnet.Model(num_classes=4, in_channels=1, stem_widths=(4, 8), stem_stride=1,
                         group_widths=GROUP_WIDTHS, group_depths=(1, 1, 1, 2, 1),
                         group_strides=(1, 2, 1, 2, 1), routing_space=SPACE, dtype='float32')
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *IMAGE)), route='largest'))(
      jax.random.key(0))
  # Every parameter and statistic away from its initial value, so that no term vanishes.
  def perturb(tree, seed, positive=()):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5)
           if any(getattr(p, 'key', None) in positive for p in path)
           else x + 0.2 * jax.random.normal(k, x.shape) for k, (path, x) in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)
  return model, {'params': perturb(variables['params'], 1),
                 'batch_stats': perturb(variables['batch_stats'], 2, positive=('var',))}


def authors_suffix(params, stats, hidden, weights):
  """The authors' masked suffix of this DS-MBNet (gate group 3), from hidden to logits."""
  choices = {g: tuple(GROUP_WIDTHS[g][r] for r in SPACE) for g in (3, 4)}

  def keep(group, c):  # (R, c): 1 within each choice's width.
    return jnp.asarray(np.arange(c)[None, :] < np.asarray(choices[group])[:, None], jnp.float32)

  def mask(x, group):
    return x * (weights @ keep(group, x.shape[-1])).reshape(
        (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))

  def batch_norm(x, p, s, group):
    c = x.shape[-1]
    rows = [GROUP_WIDTHS[group].index(w) for w in choices[group]]
    mean = weights @ (s['mean'][jnp.asarray(rows), :c] * keep(group, c))
    var = weights @ (s['var'][jnp.asarray(rows), :c] * keep(group, c))
    y = (x - mean[:, None, None]) / jnp.sqrt(var[:, None, None] + 1e-5)
    return mask(y * p['scale'][:c] + p['bias'][:c], group)

  def pointwise(x, kernel, c_out):
    return jnp.einsum('bhwc,cd->bhwd', x, kernel[0, 0, :x.shape[-1], :c_out])

  def depthwise(x, kernel, stride):
    c = x.shape[-1]
    return jax.lax.conv_general_dilated(x, kernel[..., :c], (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=c)

  def squeeze_excite(x, p, group):
    c = x.shape[-1]
    z = jax.nn.relu(x.mean((1, 2)) @ p['conv_reduce']['kernel'][:c] + p['conv_reduce']['bias'])
    attention = z @ p['conv_expand']['kernel'][:, :c] + p['conv_expand']['bias'][:c]
    return x * jax.nn.sigmoid(mask(attention, group))[:, None, None]

  top = {g: max(choices[g]) for g in (3, 4)}
  block = params['groups_3_0']  # The gate block: its front ran in the prefix.
  x = mask(pointwise(hidden, block['conv_pw']['kernel'], top[3]), 3)
  x = jax.nn.silu(batch_norm(x, block['bn2'], stats['groups_3_0']['bn2'], 3))
  for name, group_in, group_out, stride in (('groups_3_1', 3, 3, 1), ('groups_4_0', 3, 4, 1)):
    p, s = params[name], stats[name]
    x = mask(depthwise(x, p['conv_dw']['kernel'], stride), group_in)
    x = jax.nn.silu(batch_norm(x, p['bn1'], s['bn1'], group_in))
    x = squeeze_excite(x, p['se'], group_in)
    x = mask(pointwise(x, p['conv_pw']['kernel'], top[group_out]), group_out)
    x = jax.nn.silu(batch_norm(x, p['bn2'], s['bn2'], group_out))
  pooled = x.mean((1, 2))
  return pooled @ params['classifier']['kernel'][:pooled.shape[-1]] + params['classifier']['bias']


def test_the_authors_mask_placement_has_their_gradient_in_the_route_weights(model_and_variables):
  model, variables = model_and_variables
  x = jax.random.normal(jax.random.key(3), (5, *IMAGE))
  hidden, _ = model.apply(variables, x, method=model.prefix)
  weights = jax.nn.one_hot(jnp.array([0, 2, 1, 2, 0]), len(SPACE))
  cotangent = jax.random.normal(jax.random.key(4), (5, 4))

  def ours(w, authors):
    logits = model.apply(variables, hidden, w, authors, method=model.masked_suffix)
    return (logits * cotangent).sum(), logits

  def reference(w):
    logits = authors_suffix(variables['params'], variables['batch_stats'], hidden, w)
    return (logits * cotangent).sum(), logits

  (_, theirs_logits), theirs = jax.value_and_grad(reference, has_aux=True)(weights)
  (_, authors_logits), authors = jax.value_and_grad(ours, has_aux=True)(weights, True)
  (_, plain_logits), plain = jax.value_and_grad(ours, has_aux=True)(weights, False)
  # The same values under a one-hot, each example its route's sliced logits.
  for i, r in enumerate([0, 2, 1, 2, 0]):
    sliced = model.apply(variables, x[i:i + 1], route=SPACE[r])[0]
    np.testing.assert_allclose(theirs_logits[i], sliced, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(authors_logits, theirs_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(plain_logits, theirs_logits, rtol=1e-4, atol=1e-4)
  # The authors' gradient in the route weights; our default placement's is another.
  assert np.abs(np.asarray(theirs)).max() > 1e-2
  np.testing.assert_allclose(authors, theirs, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(plain) - np.asarray(theirs)).max() > 0.1 * np.abs(theirs).max()


def test_other_families_refuse_the_authors_mask_placement():
  from dsnet_jax.models import ds_resnet  # pylint: disable=import-outside-toplevel
  model = ds_resnet.Model(num_classes=4)
  with pytest.raises(ValueError, match="authors' mask placement is their DS-MBNet's"):
    model.apply({}, jnp.zeros((1, 7, 7, 8)), jnp.ones((1, 4)), True, method=model.masked_suffix)


def test_the_config_switch_gives_the_authors_stage_two(model_and_variables):
  import dataclasses  # pylint: disable=import-outside-toplevel
  from checks import tiny_config  # pylint: disable=import-outside-toplevel
  from dsnet_jax import (  # pylint: disable=import-outside-toplevel
      config_lib, errors, optim, train_steps)
  config = tiny_config(num_devices=1, **{'gate.authors_mode': True})
  config_lib.validate(config)
  recipe = config_lib.gate_recipe(config)
  assert recipe.authors_mode and not recipe.double_softmax  # The mode implies it.
  for key, value, message in (('gate.budget', 0.5, 'gate.budget=0.5'),
                              ('gate.sgs_targets', 'widest_helps', 'gate.sgs_targets'),
                              ('gate.gumbel_gate_loss', False, 'gate.gumbel_gate_loss')):
    with pytest.raises(errors.ConfigError, match=f"authors' Stage II .*{message}"):
      config_lib.validate(tiny_config(**{'gate.authors_mode': True, key: value}))

  model, shape = config_lib.resolve(config).model, IMAGE
  assert model.routes == model_and_variables[0].routes  # The tiny config's DS-MBNet.
  variables = model_and_variables[1]  # Perturbed: at initialisation both placements agree.
  tx = optim.make_optimizer(config.gate.optimizer, 10, variables['params'])
  state = train_steps.GateState.create(variables, tx, with_ema=True)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(16, *shape)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 4, 16), jnp.int32)}
  costs = jnp.asarray(model.routing_madds(shape), jnp.float32)

  def step(**changes):
    return train_steps.gate_train_step(model, tx, dataclasses.replace(recipe, **changes), 0.0,
                                       state, costs, batch, jax.random.key(1))

  authors, ours_double, ours = (step(), step(authors_mode=False, double_softmax=True),
                                step(authors_mode=False))
  # The gate loss: the double softmax in authors' mode, as the explicit switch gives it.
  np.testing.assert_allclose(authors[1]['gate_ce'], ours_double[1]['gate_ce'], rtol=1e-6)
  assert abs(float(authors[1]['gate_ce']) - float(ours[1]['gate_ce'])) > 1e-4
  # The task CE's gradient reaches the routing head through the authors' masks.
  head = lambda s: np.asarray(s.params['groups_3_0']['gate']['routing_head']['kernel'])
  assert np.abs(head(authors[0]) - head(ours_double[0])).max() > 1e-4
