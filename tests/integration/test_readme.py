"""Every Python block of the README runs as written, in order, in one namespace (ImageNet
shapes shrunk to 32 px; the README's demo workdir is the suite's tiny trained run)."""
import contextlib
import io
import os
import re

import numpy as np

from checks import ROOT
from dsnet_jax import config_lib, export
from dsnet_jax.data import input_pipeline


def readme_python_blocks() -> list[str]:
  return re.findall(r'```python\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)


def test_every_python_block_of_the_readme_runs(trained, tmp_path, monkeypatch):
  blocks = readme_python_blocks()
  assert len(blocks) == 6, 'a new README block: check what this test should assert about it'
  # blocks[5], plain orbax, runs where dsnet_jax is not imported (test_rundir.py).
  (tmp_path / 'workdir').mkdir()
  os.symlink(trained.workdir, tmp_path / 'workdir' / 'ds_mbnet_fmnist')
  monkeypatch.chdir(tmp_path)
  namespace = {}
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(blocks[0].replace('224', '32'), namespace)  # pylint: disable=exec-used
    assert namespace['logits'].shape == (2, 1000)
    assert namespace['weights'].shape == (2, len(namespace['model'].routes.routing_space))
    exec(blocks[1], namespace)  # pylint: disable=exec-used
    loaded = namespace['loaded']
    assert 'routing index' in printed.getvalue() and namespace['logits'].shape == (4, 4)
    exec(blocks[2], namespace)  # pylint: disable=exec-used
    images, indices = namespace['images'], np.asarray(namespace['routing_indices'])
    for image, logits, index in zip(images, namespace['logits'], indices):
      route = loaded.routes.routing_space[index]
      want = loaded.model.apply(loaded.variables, image[None], route=route)[0]
      np.testing.assert_allclose(logits, want, atol=1e-5)
    assert namespace['routes'] == [loaded.routes.routing_space[i] for i in indices]
    preprocessing = input_pipeline.describe_preprocessing(  # As the export tool writes it.
        input_pipeline.preprocessing(config_lib.data_spec(loaded.config.data)))
    export.export_routed(loaded.model, loaded.variables, 'routed', loaded.image_shape,
                         platforms=('cpu',), preprocessing=preprocessing, verbose=False)
    exec(blocks[3], namespace)  # pylint: disable=exec-used
    exec(blocks[4], namespace)  # pylint: disable=exec-used
  raw, images = namespace['raw'], namespace['images']
  assert raw.shape == (8, 28, 28) and images.shape == (8, 28, 28, 1)
  pre = export.load_manifest('routed')['input']['preprocessing']
  np.testing.assert_allclose(images[..., 0] * pre['std'][0] + pre['mean'][0], raw / 255,
                             atol=1e-6)
