"""tfds's real `imagenet2012` builder on a tiny fake ILSVRC2012 (the exact archive layout: 3
classes of 4 JPEGs, 6 validation JPEGs), end to end: prepared as ArrayRecord by
`dsnet_jax.tools.prepare_imagenet`, prepared as TFRecord by tfds and converted by its
`--convert`, each read by the input pipeline in a Python without TensorFlow.

Not in the suite: it needs the `[tf]` extra (TensorFlow is a 570 MB wheel that nothing else in
the suite needs). Run it with a Python that has it, naming the project's own (TensorFlow-free):

    python tests/imagenet_tf_check.py --tf_python=/path/to/tf-venv/bin/python \
        --python=.venv/bin/python
"""
import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('n01440764', 'n01443537', 'n01484850')  # The first three of tfds's label list.
READ = '''
import importlib.util, json, sys
from dsnet_jax.data import input_pipeline
assert importlib.util.find_spec('tensorflow') is None, 'this reader must not have TensorFlow'
spec = input_pipeline.DataSpec(name='imagenet2012', data_dir=sys.argv[1], image_size=32,
                               num_classes=1000, augment='rrc_flip')
out = {}
for split in ('train', 'validation'):
  pipeline = input_pipeline.make(spec, split, batch_size=2, train=False)
  labels = [int(l) for b in pipeline.batches() for l, m in zip(b['label'], b['mask']) if m]
  out[split] = labels
print(json.dumps(out))
'''


def fake_archives(directory: str) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)

  def jpeg() -> bytes:
    buffer = io.BytesIO()
    pixels = rng.integers(0, 256, (*rng.integers(40, 80, 2), 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, 'JPEG')
    return buffer.getvalue()

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  with tarfile.open(os.path.join(directory, 'ILSVRC2012_img_train.tar'), 'w') as train:
    for synset in CLASSES:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as per_class:
        for i in range(4):
          add(per_class, f'{synset}_{i}.JPEG', jpeg())
      add(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(directory, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i in range(1, 7):
      add(val, f'ILSVRC2012_val_{i:08d}.JPEG', jpeg())


def run(python: str, *args: str) -> str:
  env = {**os.environ, 'PYTHONPATH': ROOT}
  done = subprocess.run([python, *args], cwd=ROOT, env=env, capture_output=True, text=True)
  if done.returncode:
    sys.exit(f'{" ".join(args)} failed:\n{done.stderr[-3000:]}')
  return done.stdout


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tf_python', required=True, help='A Python with the [tf] extra.')
  parser.add_argument('--python', default=sys.executable, help='A Python without TensorFlow.')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    manual, direct, tfrecord = (os.path.join(tmp, d) for d in ('manual', 'direct', 'tfrecord'))
    os.makedirs(manual)
    fake_archives(manual)
    print(run(args.tf_python, '-m', 'dsnet_jax.tools.prepare_imagenet',
              f'--manual_dir={manual}', f'--data_dir={direct}').strip().splitlines()[-1])
    run(args.tf_python, '-c', 'import sys, tensorflow_datasets as tfds; '
        'tfds.builder("imagenet2012", data_dir=sys.argv[2]).download_and_prepare('
        'download_config=tfds.download.DownloadConfig(manual_dir=sys.argv[1]))', manual, tfrecord)
    version = os.path.join(tfrecord, 'imagenet2012', '5.1.0')
    print(run(args.tf_python, '-m', 'dsnet_jax.tools.prepare_imagenet',
              f'--convert={version}').strip().splitlines()[-1])
    read = [run(args.python, '-c', READ, d).strip().splitlines()[-1] for d in (direct, tfrecord)]
    print('read without TensorFlow:', read[0])
    if read[0] != read[1]:
      sys.exit(f'the converted data reads differently: {read[1]}')
    import json  # pylint: disable=import-outside-toplevel
    labels = json.loads(read[0])
    if sorted(labels['train']) != [0] * 4 + [1] * 4 + [2] * 4 or len(labels['validation']) != 6:
      sys.exit(f'unexpected labels {labels}')
    print('ok: prepared, converted and read; train labels 3 classes x 4 images')


if __name__ == '__main__':
  main()
