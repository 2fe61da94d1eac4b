"""The PyTorch DS-MBNet importer against an independent NumPy forward of the authors' layout."""
import pathlib
import argparse
import ast
import functools
import math
import sys

import chex
import jax
import numpy as np
import pytest

from dsnet_jax import checkpointing
from dsnet_jax.convert import ds_mbnet_torch
from dsnet_jax.convert.state_dict import StateDictMismatchError
from dsnet_jax.tools import convert_ds_mbnet
from dsnet_jax.models import ds_mbnet

# Every key and PyTorch shape of the authors' released DS-MBNet state dict.
KEYS_FILE = pathlib.Path(__file__).parent / 'testdata/ds_mbnet_state_dict_keys.txt'
ROUTES = (*range(14), 'largest')
GROUP_DEPTHS = (1, 2, 2, 6, 2)  # Blocks in each of blocks.0..4.
GROUP_STRIDES = (1, 2, 2, 2, 2)


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random values for every key of KEYS_FILE."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  with open(KEYS_FILE) as f:
    for line in f:
      if line.startswith('#') or ' (' not in line:
        continue
      key, shape = line.split(' ', 1)
      shape = ast.literal_eval(shape.strip())
      if key.endswith('num_batches_tracked'):
        value = np.array(rng.integers(1, 10**6), np.int64)
      elif key.endswith('running_var'):
        value = rng.uniform(0.5, 2.0, shape)
      elif key.endswith('running_mean') or key.endswith('bias'):
        value = rng.normal(0.0, 0.2, shape)
      elif '.aux_bn.' in key:  # BN weight
        value = rng.uniform(0.5, 1.5, shape)
      else:  # conv / linear weight
        value = rng.normal(0.0, math.sqrt(2 / math.prod(shape[1:])), shape)
      state_dict[key] = value.astype(np.float32) if value.dtype == np.float64 else value
  return state_dict


# --- Independent NumPy reference (NCHW, OIHW, float64), reference section 2. ---


def conv2d(x, weight, stride, depthwise=False):
  """PyTorch conv2d, padding (k-1)//2, no bias, by im2col."""
  k = weight.shape[-1]
  p = (k - 1) // 2
  x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  h_out = (x.shape[2] - k) // stride + 1
  w_out = (x.shape[3] - k) // stride + 1
  patches = np.stack([x[:, :, i:i + stride * h_out:stride, j:j + stride * w_out:stride]
                      for i in range(k) for j in range(k)], axis=2)  # (N, C, k*k, H, W)
  if depthwise:
    return np.einsum('ncphw,cp->nchw', patches, weight.reshape(weight.shape[0], k * k))
  return np.einsum('ncphw,ocp->nohw', patches, weight.reshape(*weight.shape[:2], k * k),
                   optimize=True)


def batch_norm(x, sd, prefix, index, calibrate=None):
  """Eval BN with the statistics of `aux_bn.{index}` and the shared (last) affine, sliced.

  With a Generator `calibrate`, first sets those statistics to x's, randomly perturbed.
  """
  c = x.shape[1]
  stats = f'{prefix}.aux_bn.{index}.running_'
  assert sd[stats + 'mean'].shape == (c,), (prefix, index, c)
  if calibrate is not None:
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    sd[stats + 'mean'] = (mean + 0.2 * np.sqrt(var) * calibrate.normal(size=c)).astype(np.float32)
    # The floor keeps near-constant channels from amplifying float32 rounding.
    var = var * calibrate.uniform(0.5, 2.0, c) + var.mean()
    sd[stats + 'var'] = var.astype(np.float32)
  mean, var = sd[stats + 'mean'], sd[stats + 'var']
  affine = next(k[:-len('weight')] for k in sd
                if k.startswith(f'{prefix}.aux_bn.') and k.endswith('.weight'))
  w, b = sd[affine + 'weight'][:c], sd[affine + 'bias'][:c]
  return ((x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) * w[:, None, None]
          + b[:, None, None])


def silu(x):
  return x / (1 + np.exp(-x))


def block(x, sd, prefix, stride, in_index, width, index, calibrate):
  """dw3x3 -> BN -> SiLU -> SE -> pw1x1 -> BN -> SiLU; returns (x, SE reduced vector)."""
  c = x.shape[1]
  x = silu(batch_norm(conv2d(x, sd[f'{prefix}.conv_dw.weight'][:c], stride, True),
                      sd, f'{prefix}.bn1', in_index, calibrate))
  se = f'{prefix}.gate'
  z = np.maximum(x.mean((2, 3)) @ sd[f'{se}.conv_reduce.weight'][:, :c, 0, 0].T
                 + sd[f'{se}.conv_reduce.bias'], 0)
  a = 1 / (1 + np.exp(-(z @ sd[f'{se}.conv_expand.weight'][:c, :, 0, 0].T
                        + sd[f'{se}.conv_expand.bias'][:c])))
  x = x * a[:, :, None, None]
  x = conv2d(x, sd[f'{prefix}.conv_pw.weight'][:width, :c], 1)
  return silu(batch_norm(x, sd, f'{prefix}.bn2', index, calibrate)), z


def route_widths(route):
  """(width, aux_bn index) of the stem and blocks.0..4."""
  if route == 'largest':
    return [(24, 1), (88, 1), (168, 1), (264, 1), (640, 13), (1152, 13)]
  return [(16, 0), (32, 0), (48, 0), (96, 0), (224 + 32 * route, route), (736 + 32 * route, route)]


def reference_forward(sd, images_nchw, route, calibrate=None):
  """Logits and the gate's routing logits of the authors' DS-MBNet at `route`, in float64.

  With a Generator `calibrate`, first sets each running statistic that `route` uses (in `sd`)
  to the statistics of its input, randomly perturbed: activations stay O(1) and logits depend on
  the input, so the tolerance means something (with random statistics the signal dies out
  and the logits are the same for every image).
  """
  (stem, stem_index), *groups = route_widths(route)
  x = conv2d(images_nchw.astype(np.float64), sd['conv_stem.weight'][:stem, :3], 2)
  x = silu(batch_norm(x, sd, 'bn1', stem_index, calibrate))
  in_index = stem_index
  for g, ((width, index), depth, stride) in enumerate(zip(groups, GROUP_DEPTHS, GROUP_STRIDES)):
    for b in range(depth):
      prefix = f'blocks.{g}.first_block' if b == 0 else f'blocks.{g}.residual_blocks.{b - 1}'
      x, z = block(x, sd, prefix, stride if b == 0 else 1, in_index, width, index, calibrate)
      if (g, b) == (3, 0):
        routing_logits = z @ sd[f'{prefix}.gate.gate.0.weight'][:, :, 0, 0].T
      in_index = index
  logits = x.mean((2, 3)) @ sd['classifier.weight'][:, :x.shape[1]].T + sd['classifier.bias']
  return logits, routing_logits


# --- Tests. ---


@pytest.fixture(scope='module')
def state_dict():
  return random_state_dict()


@pytest.fixture(scope='module')
def variables(state_dict):
  return ds_mbnet_torch.convert_state_dict(state_dict, ds_mbnet.Model())


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(1).normal(size=(2, 3, 64, 64))  # NCHW


def test_converted_tree_matches_model(variables):
  model = ds_mbnet.Model()
  abstract, _ = ds_mbnet_torch.model_layout(model)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, abstract)
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == 7_676_204


@pytest.mark.parametrize('route', ROUTES)
def test_route_matches_reference(state_dict, images, route):
  model = ds_mbnet.Model()
  state_dict = dict(state_dict)
  expected, _ = reference_forward(state_dict, images, route, np.random.default_rng(0))
  variables = ds_mbnet_torch.convert_state_dict(state_dict, model)
  apply = jax.jit(model.apply, static_argnames='route')
  logits = np.asarray(apply(variables, images.transpose(0, 2, 3, 1).astype(np.float32),
                            route=route))
  error = np.abs(logits - expected).max()
  spread = np.abs(expected[0] - expected[1]).max()
  print(f'route {route}: max |logit| {np.abs(expected).max():.2f}, max |logit difference '
        f'between the images| {spread:.2f}, max abs error {error:.2e}')
  assert np.abs(expected).max() < 10 and spread > 0.1  # O(1) and input-dependent
  assert error < 1e-4


def test_routing_head_matches_reference(state_dict, images):
  model = ds_mbnet.Model()
  state_dict = dict(state_dict)
  _, expected = reference_forward(state_dict, images, 0, np.random.default_rng(0))
  variables = ds_mbnet_torch.convert_state_dict(state_dict, model)
  prefix = jax.jit(functools.partial(model.apply, method=model.prefix))
  _, routing_logits = prefix(variables, images.transpose(0, 2, 3, 1).astype(np.float32))
  np.testing.assert_allclose(routing_logits, expected, atol=1e-4)


@pytest.mark.parametrize('change, key', [
    ('missing', 'blocks.3.first_block.gate.gate.0.weight'),
    ('missing', 'blocks.4.residual_blocks.0.bn2.aux_bn.7.running_var'),
    ('extra', 'blocks.5.first_block.conv_dw.weight'),
    ('wrong_shape', 'blocks.2.residual_blocks.0.conv_pw.weight'),
])
def test_rejects_mismatched_state_dict(state_dict, change, key):
  bad = dict(state_dict)
  if change == 'missing':
    del bad[key]
  elif change == 'extra':
    bad[key] = np.zeros((3, 1, 3, 3), np.float32)
  else:
    bad[key] = np.zeros((264, 263, 1, 1), np.float32)
  with pytest.raises(StateDictMismatchError) as error:
    ds_mbnet_torch.convert_state_dict(bad)
  assert isinstance(error.value, ValueError)
  assert key in str(error.value)
  if change == 'wrong_shape':
    assert 'expected (264, 264, 1, 1), got (264, 263, 1, 1)' in str(error.value)


def test_reports_every_mismatch_at_once(state_dict):
  bad = dict(state_dict)
  del bad['conv_stem.weight'], bad['classifier.bias']
  bad['classifier.weight'] = np.zeros((10, 1152), np.float32)
  bad['head.fc.weight'] = np.zeros((1,), np.float32)
  with pytest.raises(StateDictMismatchError) as error:
    ds_mbnet_torch.convert_state_dict(bad)
  assert sorted(error.value.missing) == ['classifier.bias', 'conv_stem.weight']
  assert error.value.unexpected == ['head.fc.weight']
  assert error.value.wrong_shape == {'classifier.weight': ((1000, 1152), (10, 1152))}


def with_values(state_dict, **changes):
  """A copy of `state_dict` with `changes` ({key with '.' as '__': (index, value) or array})."""
  bad = dict(state_dict)
  for name, change in changes.items():
    key = name.replace('__', '.')
    if isinstance(change, tuple):
      index, value = change
      bad[key] = bad[key].copy()
      bad[key][index] = value
    else:
      bad[key] = change
  return bad


def test_rejects_bad_values_naming_every_key(state_dict):
  bad = with_values(
      state_dict,
      blocks__3__first_block__bn2__aux_bn__2__running_var=(slice(4), [0.0, -0.0, -1.0, -1e-8]),
      bn1__aux_bn__0__running_var=(0, -np.inf),
      bn1__aux_bn__1__running_mean=(3, np.nan),
      classifier__bias=(slice(2), np.inf),
      classifier__weight=np.where(np.eye(1000, 1152, dtype=bool), 1e39, 0.0),  # float64
      conv_stem__weight=np.ones((24, 3, 3, 3), np.int32),
      bn1__aux_bn__1__weight=np.ones(24, bool),
      bn1__aux_bn__1__bias=np.zeros(24, np.complex64),
      blocks__0__first_block__bn1__aux_bn__1__weight=np.full(24, None, object),
  )
  with pytest.raises(StateDictMismatchError) as error:
    ds_mbnet_torch.convert_state_dict(bad)
  assert error.value.bad_values == {
      'blocks.3.first_block.bn2.aux_bn.2.running_var': '4 values <= 0',
      'bn1.aux_bn.0.running_var': '1 values not finite in float32, 1 values <= 0',
      'bn1.aux_bn.1.running_mean': '1 values not finite in float32',
      'classifier.bias': '2 values not finite in float32',
      'classifier.weight': '1000 values not finite in float32',
      'conv_stem.weight': 'dtype int32, not floating point',
      'bn1.aux_bn.1.weight': 'dtype bool, not floating point',
      'bn1.aux_bn.1.bias': 'dtype complex64, not floating point',
      'blocks.0.first_block.bn1.aux_bn.1.weight': 'dtype object, not floating point',
  }
  assert not (error.value.missing or error.value.unexpected or error.value.wrong_shape)
  assert ('bad values: blocks.3.first_block.bn2.aux_bn.2.running_var: 4 values <= 0'
          in str(error.value))


def test_rejects_a_0d_tensor_by_shape_and_dtype(state_dict):
  bad = with_values(state_dict, classifier__bias=np.array(3, np.int64))
  with pytest.raises(StateDictMismatchError) as error:
    ds_mbnet_torch.convert_state_dict(bad)
  assert error.value.wrong_shape == {'classifier.bias': ((1000,), ())}
  assert error.value.bad_values == {'classifier.bias': 'dtype int64, not floating point'}


@pytest.mark.parametrize('dtype', [np.float16, jax.numpy.bfloat16])
def test_half_precision_state_dict_converts_to_float32(state_dict, dtype):
  half = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in state_dict.items()}
  expected = ds_mbnet_torch.convert_state_dict(
      {k: v.astype(np.float32) if v.dtype == dtype else v for k, v in half.items()})
  converted = ds_mbnet_torch.convert_state_dict(half)
  chex.assert_trees_all_equal_dtypes(converted, expected)
  chex.assert_trees_all_equal(converted, expected)


def test_cli_writes_nothing_for_bad_values(state_dict, tmp_path):
  npz = tmp_path / 'ds_mbnet.npz'
  bad = with_values(state_dict, bn1__aux_bn__1__running_mean=(0, np.nan),
                    conv_stem__weight=np.zeros((24, 3, 3, 3), np.int64))
  np.savez(npz, **bad)
  out = tmp_path / 'checkpoint'
  with pytest.raises(StateDictMismatchError,
                     match=r'(?s)bn1\.aux_bn\.1\.running_mean: 1 values not finite.*'
                     r'conv_stem\.weight: dtype int64'):
    convert_ds_mbnet.main([f'--input={npz}', f'--out={out}'])
  assert not out.exists()


def test_select_state_dict():
  plain, ema = {'module.w': 1}, {'module.w': 2}
  checkpoint = {'epoch': 3, 'state_dict': plain, 'state_dict_ema': ema}
  assert ds_mbnet_torch.select_state_dict(checkpoint) == {'w': 2}
  assert ds_mbnet_torch.select_state_dict(checkpoint, 'ema') == {'w': 2}
  assert ds_mbnet_torch.select_state_dict(checkpoint, 'plain') == {'w': 1}
  assert ds_mbnet_torch.select_state_dict(plain, 'ema') == {'w': 1}  # a bare state dict
  with pytest.raises(ValueError, match='state_dict_ema'):
    ds_mbnet_torch.select_state_dict({'state_dict': plain}, 'ema')
  with pytest.raises(ValueError, match='weights'):
    ds_mbnet_torch.select_state_dict(checkpoint, 'best')


def test_npz_and_cli_round_trip(state_dict, variables, tmp_path, capsys):
  npz = tmp_path / 'ds_mbnet.npz'
  np.savez(npz, **{f'module.{k}': v for k, v in state_dict.items()})
  loaded = ds_mbnet_torch.load_state_dict(npz)
  chex.assert_trees_all_equal(loaded, state_dict)

  out = tmp_path / 'checkpoint'
  convert_ds_mbnet.main([f'--input={npz}', f'--out={out}', '--weights=plain'])
  assert 'converted 604 tensors (dropped 234 num_batches_tracked): 7,676,204 params' in (
      capsys.readouterr().out)
  abstract, _ = ds_mbnet_torch.model_layout(ds_mbnet.Model())
  with checkpointing.Checkpointer(out) as ckpt:
    restored, meta, _ = ckpt.restore(abstract)
  chex.assert_trees_all_equal(restored, variables)
  assert meta['variables_key'] == '' and meta['model_name'] == 'ds_mbnet'

  with pytest.raises(FileExistsError, match='not empty'):
    convert_ds_mbnet.main([f'--input={npz}', f'--out={out}'])
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(FileExistsError, match='a_file is not a directory'):
    convert_ds_mbnet.main([f'--input={npz}', f'--out={tmp_path / "a_file"}'])


def test_load_torch_checkpoint(tmp_path):
  import torch  # make test installs it (requirements-test.txt)
  path = tmp_path / 'checkpoint.pth.tar'
  torch.save({'epoch': 3, 'args': argparse.Namespace(lr=0.08),
              'state_dict': {'module.w': torch.zeros(2)},
              'state_dict_ema': {'module.w': torch.ones(2)}}, path)
  np.testing.assert_array_equal(ds_mbnet_torch.load_state_dict(path)['w'], [1, 1])
  np.testing.assert_array_equal(ds_mbnet_torch.load_state_dict(path, 'plain')['w'], [0, 0])


def test_load_torch_checkpoint_keeps_integer_dtypes_and_widens_half_floats(tmp_path):
  import torch  # make test installs it (requirements-test.txt)
  path = tmp_path / 'checkpoint.pth.tar'
  torch.save({'w': torch.ones(2, dtype=torch.int32), 'b': torch.ones(2, dtype=torch.bfloat16),
              'h': torch.ones(2, dtype=torch.float16)}, path)
  loaded = ds_mbnet_torch.load_state_dict(path)
  assert {k: v.dtype for k, v in loaded.items()} == {'w': np.int32, 'b': np.float32,
                                                     'h': np.float32}


def test_torch_checkpoint_without_torch_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # As where torch is not installed.
  (tmp_path / 'checkpoint.pth.tar').write_bytes(b'')
  with pytest.raises(ImportError, match='pip install'):
    ds_mbnet_torch.load_state_dict(tmp_path / 'checkpoint.pth.tar')
  with pytest.raises(FileNotFoundError, match='no state dict file'):
    ds_mbnet_torch.load_state_dict(tmp_path / 'missing.pth')
