"""The torchvision ResNet-50 and timm ViT/DeiT importers against the real libraries: the
imported supernet's 'largest' computes the source network's logits (random weights, BatchNorm
statistics made non-trivial by training-mode forwards), and bad state dicts are refused whole."""
import numpy as np
import pytest
import torch
import torchvision
import timm
import jax.numpy as jnp
from safetensors.torch import save_file

import dsnet_jax
from dsnet_jax import config_lib, errors
from dsnet_jax.convert import resnet_torchvision, vit_timm
from dsnet_jax.convert.state_dict import StateDictFileError, StateDictMismatchError
from dsnet_jax.tools import convert_pretrained

TOLERANCE = 1e-5  # Relative: max |ours - theirs| / max |theirs|, float32.


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def images(size: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)


def logits_error(net: torch.nn.Module, model, variables, size: int) -> tuple[float, float]:
  """Max |ours - theirs| of 'largest''s and the torch network's logits on the same two images,
  absolute and relative to max |theirs|."""
  x = images(size)
  with torch.no_grad():
    theirs = net(torch.from_numpy(x)).numpy()
  ours = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                route='largest'))
  error = float(np.abs(ours - theirs).max())
  return error, error / float(np.abs(theirs).max())


@pytest.fixture(scope='module')
def resnet():
  """torchvision's ResNet-50, random weights and affines, BatchNorm statistics from batches."""
  torch.manual_seed(0)
  net = torchvision.models.resnet50()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
    net.train()
    for _ in range(3):
      net(torch.randn(4, 3, 64, 64) * 1.5 + 0.2)
  return net.eval()


@pytest.fixture(scope='module')
def imported_resnet(resnet):
  model = resnet_torchvision.model_for()
  return model, resnet_torchvision.convert_state_dict(numpy_state_dict(resnet), model)


@pytest.mark.parametrize('size', [224, 160])
def test_resnet50_largest_is_torchvisions(resnet, imported_resnet, size):
  error, relative = logits_error(resnet, *imported_resnet, size)
  print(f'torchvision resnet50 {size}px: max abs {error:.2e}, relative {relative:.2e}')
  assert relative < TOLERANCE


def test_resnet50_every_width_starts_from_the_full_statistics_prefix(resnet, imported_resnet):
  model, variables = imported_resnet
  stats = variables['batch_stats']['groups_2_0']['bn1']
  # Rows: the distinct inner widths of group 2 over the route table.
  inner = sorted({r.widths[3][0] for r in model.routes})
  full = resnet.layer3[0].bn1
  assert stats['mean'].shape == (len(inner), 256)
  for row, w in enumerate(inner):
    np.testing.assert_array_equal(stats['mean'][row, :w], full.running_mean[:w].numpy())
    np.testing.assert_array_equal(stats['var'][row, :w], full.running_var[:w].numpy())
    np.testing.assert_array_equal(stats['var'][row, w:], 1.0)


VIT_NAMES = ['vit_tiny_patch16_224', 'deit_tiny_patch16_224', 'vit_small_patch16_224',
             'deit_small_patch16_224']


@pytest.mark.parametrize('name', VIT_NAMES)
def test_vit_largest_is_timms(name):
  torch.manual_seed(0)
  net = timm.create_model(name).eval()
  with torch.no_grad():  # Biases and LayerNorm affines off their (0, 1) init.
    for _, p in net.named_parameters():
      if p.ndim == 1:
        p.add_(torch.randn_like(p) * 0.1)
  model = vit_timm.model_for(name)
  variables = vit_timm.convert_state_dict(numpy_state_dict(net), model)
  error, relative = logits_error(net, model, variables, 224)
  print(f'timm {name} 224px: max abs {error:.2e}, relative {relative:.2e}')
  assert relative < TOLERANCE


def test_timm_names_that_map():
  assert vit_timm.model_for('deit_small_patch16_224').size.width == 384
  model = vit_timm.model_for('vit_base_patch16_384.augreg_in21k_ft_in1k')
  assert (model.variant, model.image_size, model.gate_attention) == ('B/16', 384, False)
  for name in ('deit_small_distilled_patch16_224', 'vit_relpos_small_patch16_224', 'resnet50'):
    with pytest.raises(errors.ConfigError, match='does not map onto DS-ViT'):
      vit_timm.model_for(name)


def test_a_gate_attention_head_is_refused(resnet):
  with pytest.raises(errors.ConfigError, match='gate_attention=False'):
    resnet_torchvision.convert_state_dict({}, resnet_torchvision.model_for().clone(
        gate_attention=True))
  with pytest.raises(errors.ConfigError, match='gate_attention=False'):
    vit_timm.convert_state_dict({}, vit_timm.model_for('deit_tiny_patch16_224').clone(
        gate_attention=True))


def test_bad_state_dicts_are_refused_whole(resnet):
  state_dict = numpy_state_dict(resnet)
  state_dict['layer1.0.bn1.running_var'][3] = -1.0
  state_dict['conv1.weight'] = state_dict['conv1.weight'][:, :2]
  state_dict['fc.bias'] = state_dict['fc.bias'].astype(np.int64)
  state_dict['layer4.2.conv3.weight'] = state_dict['layer4.2.conv3.weight'].copy()
  state_dict['layer4.2.conv3.weight'][0, 0, 0, 0] = np.nan
  del state_dict['layer2.0.downsample.1.running_mean']
  state_dict['head.weight'] = np.zeros((3, 3), np.float32)
  with pytest.raises(StateDictMismatchError) as raised:
    resnet_torchvision.convert_state_dict(state_dict)
  e = raised.value
  assert e.missing == {'layer2.0.downsample.1.running_mean': (512,)}
  assert e.unexpected == ['head.weight']
  assert e.wrong_shape == {'conv1.weight': ((64, 3, 7, 7), (64, 2, 7, 7))}
  assert e.bad_values == {'layer1.0.bn1.running_var': '1 values <= 0',
                          'fc.bias': 'dtype int64, not floating point',
                          'layer4.2.conv3.weight': '1 values not finite in float32'}

  vit = numpy_state_dict(timm.create_model('deit_tiny_patch16_224'))
  vit['blocks.3.attn.qkv.weight'] = vit['blocks.3.attn.qkv.weight'][:300]
  del vit['pos_embed']
  with pytest.raises(StateDictMismatchError) as raised:
    vit_timm.convert_state_dict(vit, vit_timm.model_for('deit_tiny_patch16_224'))
  assert raised.value.missing == {'pos_embed': (1, 197, 192)}
  assert raised.value.wrong_shape == {'blocks.3.attn.qkv.weight': ((576, 192), (300, 192))}


def vit_ti_config(checkpoint: str):
  config = config_lib.load_config_file(f'configs/vit_s_finetune.py:{checkpoint}')
  config.model.variant = 'Ti/16'
  return config


def test_cli_round_trip_through_load(tmp_path, capsys):
  """safetensors and a nested .pth in, a checkpoint out that `dsnet_jax.load` (the restore of
  eval, export, latency and init_checkpoint) reads with the fine-tuning config."""
  torch.manual_seed(0)
  net = timm.create_model('deit_tiny_patch16_224').eval()
  save_file(net.state_dict(), tmp_path / 'model.safetensors')
  torch.save({'model': net.state_dict(), 'epoch': 3}, tmp_path / 'nested.pth')
  for source in ('model.safetensors', 'nested.pth'):
    out = tmp_path / f'ckpt_{source}'
    convert_pretrained.main(['--model=deit_tiny_patch16_224', f'--input={tmp_path / source}',
                             f'--out={out}'])
    assert "model fields {'variant': 'Ti/16', 'image_size': 224, 'num_classes': 1000, " in (
        capsys.readouterr().out)
    loaded = dsnet_jax.load(checkpoint=out, config=vit_ti_config(str(out)))
    assert logits_error(net, loaded.model, loaded.variables, 224)[1] < TOLERANCE

  config = vit_ti_config(str(out))
  config.model.gate_attention = True
  with pytest.raises(errors.CheckpointMismatchError):
    dsnet_jax.load(checkpoint=out, config=config)
  with pytest.raises(errors.CheckpointMismatchError, match='holds a ds_vit checkpoint, the '
                     'config is for ds_mbnet'):
    dsnet_jax.load(checkpoint=out, config=config_lib.load_config_file('configs/tiny.py'))
  with pytest.raises(FileExistsError, match='not empty'):
    convert_pretrained.main(['--model=deit_tiny_patch16_224',
                             f'--input={tmp_path / "nested.pth"}', f'--out={out}'])


def test_cli_writes_nothing_for_a_bad_state_dict(tmp_path):
  state_dict = timm.create_model('deit_tiny_patch16_224').state_dict()
  state_dict['norm.weight'][0] = float('inf')
  torch.save(state_dict, tmp_path / 'bad.pth')
  with pytest.raises(StateDictMismatchError, match=r'norm\.weight: 1 values not finite'):
    convert_pretrained.main(['--model=deit_tiny_patch16_224', f'--input={tmp_path / "bad.pth"}',
                             f'--out={tmp_path / "out"}'])
  assert not (tmp_path / 'out').exists()


DEIT = 'deit_tiny_patch16_224'


def convert(tmp_path, *args):
  convert_pretrained.main([f'--out={tmp_path / "out"}', *args])


@pytest.mark.parametrize('name,content,message', [
    ('empty.npz', b'', 'cannot be read as a npz state dict'),
    ('junk.pth', b'not a pickle at all', 'cannot be read as a pth state dict'),
    ('junk.safetensors', b'\x08\x00\x00\x00\x00\x00\x00\x00{garbage', 'cannot be read as a '
     'safetensors'),
    ('weights.py', b'x = 1', r'not a state dict file this reads \(by its name'),
])
def test_unreadable_files_are_one_error(tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(StateDictFileError, match=message):
    convert(tmp_path, f'--model={DEIT}', f'--input={tmp_path / name}')
  assert not (tmp_path / 'out').exists()


def test_what_a_file_holds_is_checked(tmp_path, capsys):
  torch.save([1, 2, 3], tmp_path / 'list.pth')
  with pytest.raises(StateDictFileError, match='holds a list, not a mapping'):
    convert(tmp_path, f'--model={DEIT}', f'--input={tmp_path / "list.pth"}')
  state_dict = timm.create_model(DEIT).state_dict()
  torch.save({'state_dict': state_dict, 'state_dict_ema': state_dict}, tmp_path / 'two.pth')
  with pytest.raises(errors.ConfigError, match=r'several state dicts \(state_dict, '
                     r'state_dict_ema\): choose one with --key'):
    convert(tmp_path, f'--model={DEIT}', f'--input={tmp_path / "two.pth"}')
  with pytest.raises(errors.ConfigError, match="--key=ema: the file holds no mapping under 'ema'"):
    convert(tmp_path, f'--model={DEIT}', f'--input={tmp_path / "two.pth"}', '--key=ema')
  torch.save({f'module.{k}': v for k, v in state_dict.items()} | {'epoch': torch.tensor(5.0)},
             tmp_path / 'bare.pth')
  with pytest.raises(StateDictMismatchError, match=r'(?s)does not match.*unexpected: epoch'):
    convert(tmp_path, f'--model={DEIT}', f'--input={tmp_path / "bare.pth"}')
  convert(tmp_path, f'--model={DEIT}', f'--input={tmp_path / "two.pth"}', '--key=state_dict_ema')
  assert 'converted 152 tensors' in capsys.readouterr().out


def test_another_networks_state_dict_is_named_so_briefly(tmp_path, resnet):
  with pytest.raises(StateDictMismatchError) as raised:
    vit_timm.convert_state_dict(numpy_state_dict(resnet), vit_timm.model_for(DEIT))
  lines = str(raised.value).splitlines()
  assert lines[0].startswith('the state dict is not one of this model: 152 of its keys are '
                             'missing and 320 unknown ones')
  assert '  missing: ... and 132 more' in lines and len(lines) == 43


def test_bad_flags_are_refused_before_reading(tmp_path, monkeypatch, capsys):
  with pytest.raises(errors.ConfigError, match='image size 224 is not a positive multiple of '
                     'the patch size 0'):
    convert(tmp_path, '--model=vit_tiny_patch0_224', '--input=missing.pth')
  with pytest.raises(errors.ConfigError, match="--weights=BOGUS: torchvision's ResNet-50 "
                     'weights are IMAGENET1K_V1, IMAGENET1K_V2'):
    convert(tmp_path, '--model=resnet50', '--weights=BOGUS')
  with pytest.raises(SystemExit):
    convert(tmp_path, f'--model={DEIT}', '--seed=99999999999999999999')
  assert 'argument --seed: 99999999999999999999 is not in 0..2**32-1' in capsys.readouterr().err
  monkeypatch.chdir(tmp_path)
  with pytest.raises(errors.ConfigError, match='the output directory is empty'):
    convert_pretrained.main([f'--model={DEIT}', '--input=x.pth', '--out='])
  assert list(tmp_path.iterdir()) == []


def test_a_head_of_no_classes_and_the_vit_normalization(tmp_path, capsys):
  state_dict = timm.create_model(DEIT).state_dict()
  save_file(state_dict | {'head.weight': torch.zeros(0, 192), 'head.bias': torch.zeros(0)},
            tmp_path / 'none.safetensors')
  with pytest.raises(StateDictMismatchError, match=r'head\.weight: expected \(\'num_classes >= '):
    convert(tmp_path, f'--model={DEIT}', f'--input={tmp_path / "none.safetensors"}')
  save_file(state_dict, tmp_path / 'vit.safetensors')
  convert(tmp_path, '--model=vit_tiny_patch16_224', f'--input={tmp_path / "vit.safetensors"}')
  assert 'add --config.data.normalization=inception' in capsys.readouterr().out
