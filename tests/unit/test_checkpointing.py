"""Checkpointer: round trips, keep-N, partial and sharded restores, mismatch errors, atomicity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsnet_jax import checkpointing, errors, sharding


def make_state(scale=1.0, step=0):
  params = {'conv': {'kernel': jnp.full((3, 3, 2, 8), scale)}, 'bn': {'scale': jnp.ones(8)}}
  return {'params': params,
          'batch_stats': {'bn': {'mean': jnp.full(8, scale), 'var': jnp.ones(8)}},
          'opt_state': optax.sgd(0.1, momentum=0.9).init(params),
          'step': jnp.int32(step)}


META = {'config': {'model': 'ds_mbnet', 'widths': [0.35, 1.0]}, 'stage': 'supernet', 'seed': 0}


def test_round_trip_keeps_structure_values_and_meta(tmp_path):
  state = make_state(2.0, step=7)
  with checkpointing.Checkpointer(tmp_path / 'ckpt') as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, META)
  with checkpointing.Checkpointer(tmp_path / 'ckpt') as ckpt:  # Fresh, as a resumed run.
    restored, meta, step = ckpt.restore(jax.eval_shape(lambda: state))
    assert step == 7
    assert ckpt.restore_meta() == meta == META
  chex.assert_trees_all_equal(restored, state)  # Also checks the optax NamedTuple survives.
  chex.assert_trees_all_equal_dtypes(restored, state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))


def test_keep_n_and_restore_a_specific_step(tmp_path):
  with checkpointing.Checkpointer(tmp_path, keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, make_state(float(step), step), {'step': step})
    assert ckpt.all_steps() == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '3']
    state, meta, _ = ckpt.restore(make_state(), step=2)  # Concrete arrays as the target.
    assert meta == {'step': 2} and int(state['step']) == 2
    np.testing.assert_array_equal(state['batch_stats']['bn']['mean'], np.full(8, 2.0))
    with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 1 .*steps: \[2, 3\]'):
      ckpt.restore(make_state(), step=1)


def test_existing_steps_are_never_overwritten(tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, make_state(1.0), META)
    assert not ckpt.save(5, make_state(9.0), META)  # Skipped, as orbax does.
    with pytest.raises(ValueError, match='already exists'):
      ckpt.save(5, make_state(9.0), META, force=True)
    state, _, _ = ckpt.restore(make_state())
  np.testing.assert_array_equal(state['params']['bn']['scale'], np.ones(8))
  np.testing.assert_array_equal(state['batch_stats']['bn']['mean'], np.full(8, 1.0))


def test_partial_restore_reads_only_the_requested_items(tmp_path):
  state = make_state(3.0)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, META)
    wanted = {k: state[k] for k in ('params', 'batch_stats')}
    restored, _, _ = ckpt.restore(jax.eval_shape(lambda: wanted), partial=True)
  assert set(restored) == {'params', 'batch_stats'}
  chex.assert_trees_all_equal(restored, wanted)


def test_mismatch_names_every_offending_key(tmp_path):
  state = make_state()
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, META)
    target = jax.eval_shape(lambda: state)
    target['params']['conv']['kernel'] = jax.ShapeDtypeStruct((3, 3, 2, 16), jnp.float32)
    target['params']['head'] = {'bias': jax.ShapeDtypeStruct((10,), jnp.float32)}
    target['batch_stats']['bn']['mean'] = jax.ShapeDtypeStruct((8,), jnp.bfloat16)
    del target['batch_stats']['bn']['var']
    with pytest.raises(errors.CheckpointMismatchError) as error:
      ckpt.restore(target)
    message = str(error.value)
    assert 'does not match the model' in message
    assert ('params/conv/kernel: expected (3, 3, 2, 16) float32, found (3, 3, 2, 8) float32'
            in message)
    assert 'params/head/bias: expected (10,) float32, missing from the checkpoint' in message
    assert 'batch_stats/bn/mean: expected (8,) bfloat16, found (8,) float32' in message
    assert 'batch_stats/bn/var: found (8,) float32, not in the model' in message
    with pytest.raises(errors.CheckpointMismatchError, match='params/head/bias'):
      ckpt.restore({'params': target['params']}, partial=True)


def test_missing_directory_or_checkpoint_is_a_clear_error(tmp_path):
  with checkpointing.Checkpointer(tmp_path / 'nothing_here') as ckpt:
    with pytest.raises(FileNotFoundError, match='no checkpoint in .*nothing_here'):
      ckpt.restore(make_state())
    with pytest.raises(FileNotFoundError, match='nothing_here'):
      ckpt.restore_meta()


def test_a_foreign_layout_is_named(tmp_path):
  with ocp.CheckpointManager(tmp_path) as manager:  # e.g. items written without Checkpointer.
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave({'w': jnp.ones(2)})))
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(errors.CheckpointMismatchError, match=r"no `state` item .*'params'"):
      ckpt.restore({'params': {'w': jnp.ones(2)}}, partial=True)


def test_restore_lands_on_the_target_sharding(tmp_path):
  mesh = sharding.make_mesh()
  assert mesh.size == 8  # tests/conftest.py
  state = make_state(4.0)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, META)
    split = NamedSharding(mesh, P(None, None, None, sharding.DATA))
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    shardings['params']['conv']['kernel'] = split
    restored, _, _ = ckpt.restore(checkpointing.abstract_like(state, shardings))
  assert restored['params']['conv']['kernel'].sharding == split
  assert restored['params']['bn']['scale'].sharding == sharding.replicated(mesh)
  chex.assert_trees_all_equal(restored, state)


def test_partial_restore_is_exact_inside_the_requested_items(tmp_path):
  """A model with fewer arrays than the checkpoint must not restore the ones it has."""
  state = make_state()
  state['params']['extra_block'] = {'kernel': jnp.ones((2, 2))}
  state['batch_stats']['extra_bn'] = {'mean': jnp.zeros(4)}
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, META)
    target = {k: jax.eval_shape(lambda: make_state()[k]) for k in ('params', 'batch_stats')}
    with pytest.raises(errors.CheckpointMismatchError) as error:
      ckpt.restore(target, partial=True)
  message = str(error.value)
  assert '(2 differences)' in message
  assert 'params/extra_block/kernel: found (2, 2) float32, not in the model' in message
  assert 'batch_stats/extra_bn/mean: found (4,) float32, not in the model' in message
  assert 'opt_state' not in message  # Items outside the target are not compared.


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_never_saved(tmp_path, bad):
  with checkpointing.Checkpointer(tmp_path, keep=3) as ckpt:
    ckpt.save(1, make_state(1.0, step=1), META)
    state = make_state(1.0, step=2)
    state['batch_stats']['bn']['mean'] = state['batch_stats']['bn']['mean'].at[3].set(bad)
    with pytest.raises(errors.NonFiniteStateError,
                       match=r'not saving step 2 .*batch_stats/bn/mean; the last saved step is 1'):
      ckpt.save(2, state, META)
    assert ckpt.all_steps() == [1]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1']


def _truncate_an_array_file(step_dir):
  files = [p for p in step_dir.rglob('*') if p.is_file() and 'd' in p.parent.name
           and p.stat().st_size > 0]
  assert files, sorted(str(p) for p in step_dir.rglob('*'))
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_an_unreadable_latest_step_falls_back_in_one_line(tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    for step in (1, 2):
      ckpt.save(step, make_state(float(step), step), {'step': step})
  _truncate_an_array_file(tmp_path / '2')
  lines = []
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    state, meta, step = ckpt.restore(make_state(), fallback=True, log=lines.append)
    assert (step, meta) == (1, {'step': 1})
    np.testing.assert_array_equal(state['batch_stats']['bn']['mean'], np.full(8, 1.0))
    assert len(lines) == 1 and '2 is unreadable' in lines[0] and 'falling back to step 1' in lines[0]
    assert '\n' not in lines[0]
    with pytest.raises(Exception):  # Without fallback the bad step is an error.
      ckpt.restore(make_state())
    assert ckpt.set_aside(2).name == '2.unreadable'
    assert ckpt.all_steps() == [1]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2.unreadable']  # Nothing deleted.
  _truncate_an_array_file(tmp_path / '1')
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(errors.UnreadableCheckpointError, match='no readable step'):
      ckpt.restore(make_state(), fallback=True, log=lines.append)


TINY_IMAGE = (16, 16, 1)


def tiny_ds_mbnet(stem_widths=(4, 8)):
  """The tiny config's DS-MBNet (tests/checks.py), with `stem_widths`."""
  from dsnet_jax.models import get_model
  return get_model('ds_mbnet', num_classes=4, in_channels=1, stem_widths=stem_widths,
                   stem_stride=1,
                   group_widths=((8, 12), (8, 12), (12, 16), (8, 12, 16, 20), (16, 20, 24, 28)),
                   group_depths=(1, 1, 1, 2, 1), group_strides=(1, 2, 1, 2, 1),
                   routing_space=(0, 1, 2), dtype='float32')


def test_a_checkpoint_records_its_batchnorm_rows_and_refuses_other_widths(tmp_path):
  from flax import traverse_util
  from dsnet_jax import rundir
  from dsnet_jax.layers.norm import statistics_widths
  shape = TINY_IMAGE
  model = tiny_ds_mbnet()
  widths = statistics_widths(model, shape)
  assert widths['stem_bn'] == [4, 8]  # The config's stem widths, one row each.
  variables = rundir.abstract_variables(model, shape, None)
  stats = {k[:-len('/mean')]: v.shape for k, v in
           traverse_util.flatten_dict(variables['batch_stats'], sep='/').items()
           if k.endswith('/mean')}
  assert stats == {k: (len(w), max(w)) for k, w in widths.items()}
  real = jax.jit(model.init, static_argnames='route')(
      jax.random.key(0), jnp.zeros((1, *shape)), route=model.routes.largest)
  with checkpointing.Checkpointer(str(tmp_path), keep=None) as ckpt:
    ckpt.save(0, dict(real), {'variables_key': '', 'statistics_widths': widths})
  assert rundir.restore_variables(tmp_path, model, shape).step == 0
  other = tiny_ds_mbnet(stem_widths=(6, 8))  # Same shapes, other widths.
  assert jax.tree.map(lambda a: a.shape, rundir.abstract_variables(other, shape, None)) == (
      jax.tree.map(lambda a: a.shape, variables))
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r'statistics of other widths .*stem_bn: \[4, 8\] saved, \[6, 8\]'):
    rundir.restore_variables(tmp_path, other, shape)


@pytest.mark.parametrize('meta, message', [
    ({'routing_offsets': [float('nan'), 0.0, 0.0]}, 'routing_offsets .* are not finite numbers'),
    ({'routing_offsets': [0.0, 0.0]}, 'routing_offsets .* has 2 entries, the routing space'),
    ({'statistics_widths': 'abc'}, 'statistics_widths abc is not'),
    ({'statistics_widths': [4, 8]}, r'statistics_widths \[4, 8\] is not'),
    ({'statistics_widths': {'stem_bn': [4.5, 8]}}, 'is not {layer: '),
    ({'config': '{not json'}, 'config is not a JSON object'),
])
def test_a_damaged_meta_is_named_not_used(tmp_path, meta, message):
  from dsnet_jax import rundir
  shape, model = TINY_IMAGE, tiny_ds_mbnet()
  variables = jax.jit(model.init, static_argnames='route')(
      jax.random.key(0), jnp.zeros((1, *shape)), route=model.routes.largest)
  with checkpointing.Checkpointer(str(tmp_path), keep=None) as ckpt:
    ckpt.save(0, dict(variables), {'variables_key': '', 'gated': True, **meta})
  with pytest.raises(errors.CheckpointMismatchError, match=f'{tmp_path}.*{message}'):
    rundir.restore_variables(tmp_path, model, shape)
