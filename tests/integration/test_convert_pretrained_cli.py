"""The importer's command line without --input: it asks torchvision and timm for the released
weights, which offline come from their caches (where a download would put them), so the real
code path runs here."""
import os
import subprocess
import sys

import torch
import torchvision
import timm
from safetensors.torch import save_file

from checks import ROOT


def _cli(args, env):
  return subprocess.run([sys.executable, '-m', 'dsnet_jax.tools.convert_pretrained', *args],
                        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                        timeout=600)


def test_released_weights_are_read_from_the_libraries_caches(tmp_path):
  torch_home = tmp_path / 'torch'
  (torch_home / 'hub' / 'checkpoints').mkdir(parents=True)
  torch.save(torchvision.models.resnet50().state_dict(),
             torch_home / 'hub' / 'checkpoints' / 'resnet50-11ad3fa6.pth')  # IMAGENET1K_V2
  done = _cli(['--model=resnet50', f'--out={tmp_path / "resnet"}'], {'TORCH_HOME': str(torch_home)})
  assert done.returncode == 0, done.stderr
  assert 'converted 320 tensors: 25,' in done.stdout

  snapshot = (tmp_path / 'hf' / 'models--timm--deit_tiny_patch16_224.fb_in1k' / 'snapshots' /
              'abc')
  snapshot.mkdir(parents=True)
  save_file(timm.create_model('deit_tiny_patch16_224').state_dict(),
            snapshot / 'model.safetensors')
  (snapshot.parents[1] / 'refs').mkdir()
  (snapshot.parents[1] / 'refs' / 'main').write_text('abc')
  done = _cli(['--model=deit_tiny_patch16_224', f'--out={tmp_path / "deit"}'],
              {'HF_HUB_CACHE': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'})
  assert done.returncode == 0, done.stderr
  assert 'converted 152 tensors: 5,7' in done.stdout
