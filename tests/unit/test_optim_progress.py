"""Optimizer from the config (decay mask, groups, schedule) and the progress logger."""
import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsnet_jax import config_lib, optim
from dsnet_jax.progress import ProgressLogger

PARAMS = {'conv': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones((3,))},
          'gate': {'routing_head': {'kernel': jnp.ones((3, 2))}}}


def optimizer_config(**overrides):
  config = config_lib.defaults().supernet.optimizer
  config.unlock()
  config.update(overrides)
  return config


def one_step(config, grads):
  tx = optim.make_optimizer(config, 10, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  return updates


def test_weight_decay_skips_biases_and_1d_params():
  zeros = {'conv': {'kernel': jnp.zeros((2, 3)), 'bias': jnp.zeros((3,))},
           'gate': {'routing_head': {'kernel': jnp.zeros((3, 2))}}}
  updates = one_step(optimizer_config(lr=0.1, warmup_steps=0, weight_decay=0.5,
                                      momentum=0.0), zeros)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1 * 0.5 * np.ones((2, 3)), rtol=1e-6)
  np.testing.assert_array_equal(updates['conv']['bias'], 0.0)


def test_param_groups_scale_or_freeze_and_name_unmatched_params():
  grads = {'conv': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones((3,))},
           'gate': {'routing_head': {'kernel': jnp.ones((3, 2))}}}
  config = optimizer_config(lr=1.0, warmup_steps=0, weight_decay=0.0, momentum=0.0,
                            param_groups=(('.*routing_head.*', 0.5), ('.*', None)))
  updates = one_step(config, grads)
  np.testing.assert_allclose(updates['gate']['routing_head']['kernel'], -0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates['conv']['kernel'], 0.0)
  assert optim.trainable_count(PARAMS, config.param_groups) == 6
  with pytest.raises(ValueError, match="'conv/bias' matches no param_groups"):
    one_step(optimizer_config(param_groups=(('.*kernel', 1.0),)), grads)


def test_warmup_then_cosine_to_end_lr():
  schedule = optim.learning_rate_schedule(
      ml_collections.ConfigDict(dict(lr=1.0, end_lr=0.1, warmup_steps=4)), 14)
  np.testing.assert_allclose([schedule(s) for s in (0, 2, 4, 9, 14)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5)


def test_ema_update():
  ema = optim.ema_update({'w': jnp.zeros(2)}, {'w': jnp.ones(2)}, 0.9)
  np.testing.assert_allclose(ema['w'], 0.1, rtol=1e-6)


def test_progress_appends_jsonl_and_stops_on_nan(tmp_path, capsys):
  logger = ProgressLogger(str(tmp_path / 'metrics.jsonl'), 'supernet', total_steps=10, batch_size=4)
  logger.start(0)
  logger.log(5, {'loss': jnp.float32(1.5), 'route_histogram': jnp.array([1.0, 3.0])})
  line = capsys.readouterr().out
  assert 'step 5/10' in line and 'loss 1.5000' in line and 'img/s' in line and 'ETA' in line
  record = json.loads((tmp_path / 'metrics.jsonl').read_text())
  assert record == {'stage': 'supernet', 'step': 5, 'loss': 1.5, 'route_histogram': [1.0, 3.0]}
  with pytest.raises(FloatingPointError, match='loss is nan at step 6'):
    logger.log(6, {'loss': jnp.float32(np.nan)})


def test_tensorboard_replaces_what_a_resumed_or_restarted_stage_logs_again(tmp_path):
  """TensorBoard's own reader sees what metrics.jsonl holds: a stage resumed at step 2 keeps
  steps 1-2 and replaces 3-4; a stage restarted from step 0 replaces everything."""
  from tensorboard.backend.event_processing import event_accumulator

  def log(start, steps, offset):
    logger = ProgressLogger(str(tmp_path / 'metrics.jsonl'), 'supernet', 4, 8)
    logger.start(start)
    for step in steps:
      logger.write(step, {'loss': offset + step})
    logger._tensorboard.close()  # pylint: disable=protected-access

  def scalars():
    reader = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard' / 'supernet'))
    reader.Reload()
    return [(e.step, e.value) for e in reader.Scalars('supernet/loss')]

  log(0, [1, 2, 3, 4], 0)
  assert scalars() == [(1, 1), (2, 2), (3, 3), (4, 4)]
  log(2, [3, 4], 100)  # Resumed from its step-2 checkpoint.
  assert scalars() == [(1, 1), (2, 2), (3, 103), (4, 104)]
  log(0, [1, 2], 200)  # Restarted (its checkpoints moved aside).
  assert scalars() == [(1, 201), (2, 202)]
