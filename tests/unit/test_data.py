"""Data: Fashion-MNIST prepared without TensorFlow, preprocessing, deterministic sharded loaders."""
import dataclasses
import gzip
import hashlib
import io

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from checks import fake_split, idx_bytes, write_split
from dsnet_jax import errors
from dsnet_jax.data import augment, fashion_mnist, imagenet, input_pipeline, preprocess
from dsnet_jax.data.in_memory import ArraySource, load_numpy
from dsnet_jax.data.loader import EvalLoader, HostShard, TrainLoader
from dsnet_jax.data.synthetic import SyntheticSource

ONE_HOST = HostShard(0, 1)


class IndexSource:
  """Record i has label i (and pixels i % 256), so batches show which records they hold."""

  def __init__(self, n, size=4):
    self.n = n
    self.size = size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((self.size, self.size, 1), i % 256, np.uint8), 'label': i}


IDENTITY = preprocess.Preprocess(4, 1, (0.0,), (1.0,))


def labels(batches):
  return [b['label'].tolist() for b in batches]


def fashion_config(data_dir, **overrides):
  config = dict(name='fashion_mnist', data_dir=str(data_dir), debian_dir=fashion_mnist.DEBIAN_DIR,
                image_size=28, num_classes=10, augment='pad_crop_flip', num_workers=0)
  return input_pipeline.DataSpec(**{**config, **overrides})


@pytest.fixture(scope='module')
def fashion_dir(tmp_path_factory):
  """Fashion-MNIST prepared once as ArrayRecord from the Debian IDX files."""
  if not fashion_mnist.has_idx_files(fashion_mnist.DEBIAN_DIR):
    pytest.skip('apt-get install dataset-fashion-mnist')
  data_dir = tmp_path_factory.mktemp('tfds')
  fashion_mnist.data_sources(str(data_dir))
  return data_dir


# --- Fashion-MNIST: preparation and reading ---------------------------------------------

def test_fashion_mnist_prepared_records_match_idx_files(fashion_dir):
  sources = fashion_mnist.data_sources(str(fashion_dir))
  assert {s: len(v) for s, v in sources.items()} == {'train': 60000, 'test': 10000}
  train_images, train_labels = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, 'train')
  first = sources['train'][0]
  assert first['image'].shape == (28, 28, 1) and first['image'].dtype == np.uint8
  assert (hashlib.sha256(first['image'].tobytes()).hexdigest()
          == hashlib.sha256(train_images[0].tobytes()).hexdigest())
  assert first['label'] == train_labels[0]
  test = load_numpy(sources['test'])
  test_images, test_labels = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, 'test')
  np.testing.assert_array_equal(test['image'], test_images)
  np.testing.assert_array_equal(test['label'], test_labels)
  assert test['label'].dtype == np.int32 and set(np.unique(test['label'])) == set(range(10))


def test_fashion_mnist_train_batches(fashion_dir):
  pipeline = input_pipeline.make(fashion_config(fashion_dir), 'train', batch_size=64, train=True,
                                 shard=ONE_HOST)
  assert (pipeline.num_examples, pipeline.num_classes, pipeline.image_shape) == (
      60000, 10, (28, 28, 1))
  assert pipeline.steps_per_epoch == 60000 // 64
  batch = next(pipeline.batches())
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (64, 28, 28, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  assert 0 <= batch['label'].min() and batch['label'].max() < 10
  lowest = (0 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
  np.testing.assert_allclose(batch['image'].min(), lowest, rtol=1e-6)  # Zero padding / background.


def test_fashion_mnist_in_memory_gives_the_same_batches(fashion_dir):
  def first_batches(in_memory):
    pipeline = input_pipeline.make(fashion_config(fashion_dir, in_memory=in_memory), 'test',
                                   batch_size=128, train=True, seed=3, shard=ONE_HOST)
    return list(pipeline.batches(5, num_steps=2))
  for a, b in zip(first_batches(False), first_batches(True), strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_fashion_mnist_eval_pass_is_in_order_and_masked(fashion_dir):
  pipeline = input_pipeline.make(fashion_config(fashion_dir), 'test', batch_size=384, train=False,
                                 shard=ONE_HOST)
  batches = list(pipeline.batches())
  assert len(batches) == pipeline.steps_per_epoch == 27  # 26 full batches, one with 16 real.
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 10000 and mask[:10000].all()
  got = np.concatenate([b['label'] for b in batches])[mask]
  np.testing.assert_array_equal(got, fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, 'test')[1])
  images = np.concatenate([b['image'] for b in batches])
  assert not images[~mask].any()


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist, '_has_tensorflow', lambda: False)
  config = fashion_config(tmp_path / 'tfds', debian_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    input_pipeline.make(config, 'train', batch_size=8, train=True, shard=ONE_HOST)


# --- Fashion-MNIST: IDX files checked before use --------------------------------------------


IMAGES = fake_split()[0]


@pytest.mark.parametrize('compress', [gzip.compress, bytes], ids=['gzipped', 'plain'])
def test_read_split_reads_idx_files(tmp_path, compress):
  images, labels = fake_split()
  write_split(tmp_path, images, labels, 'test', compress)
  got_images, got_labels = fashion_mnist.read_split(str(tmp_path), 'test')
  np.testing.assert_array_equal(got_images, images[..., None])
  np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize('data, item_shape, problem', [
    (b'', (28, 28), r"not an IDX file \(starts with b''"),
    (b'\x89PNG\r\n\x1a\n', (28, 28), 'not an IDX file'),
    (gzip.compress(idx_bytes(IMAGES))[:-12], (28, 28), 'corrupt gzip data'),
    (b'\x1f\x8b' + bytes(40), (28, 28), 'corrupt gzip data'),
    (idx_bytes(IMAGES, dtype_code=0x0D), (28, 28), r'IDX dtype code 0x0d, expected 0x08'),
    (bytes([0, 0, 8, 3, 0, 0, 0, 5]), (28, 28), 'truncated header: 3 dimensions need 16 bytes, '
     'the file has 8'),
    (idx_bytes(np.zeros((5, 32, 32))), (28, 28), r'shape \(5, 32, 32\), expected \(n, 28, 28\)'),
    (idx_bytes(IMAGES.reshape(5, 784)), (28, 28), r'shape \(5, 784\), expected \(n, 28, 28\)'),
    (idx_bytes(np.zeros((5, 1))), (), r'shape \(5, 1\), expected \(n,\)'),
    (idx_bytes(np.uint8(3)), (), r'shape \(\), expected \(n,\)'),
    (idx_bytes(IMAGES)[:-7], (28, 28),
     r'truncated: shape \(5, 28, 28\) needs 3920 bytes of data after the header, found 3913'),
    (idx_bytes(IMAGES, shape=(6, 28, 28)), (28, 28), 'truncated: .* needs 4704 bytes'),
    (idx_bytes(IMAGES) + bytes(3), (28, 28), 'oversized: .* needs 3920 bytes .* found 3923'),
    (gzip.compress(idx_bytes(np.arange(4), shape=(3,))), (), 'oversized: .* found 4'),
], ids=['empty', 'png', 'truncated_gzip', 'corrupt_gzip', 'float_dtype', 'truncated_header',
        '32x32_images', 'flat_images', '2d_labels', '0d_labels', 'truncated', 'fewer_than_declared',
        'oversized', 'oversized_gzipped'])
def test_read_idx_rejects_malformed_files_naming_them(tmp_path, data, item_shape, problem):
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  path.write_bytes(data)
  with pytest.raises(ValueError, match=problem) as error:
    fashion_mnist.read_idx(str(path), item_shape)
  assert str(error.value).startswith(f'{path}: ')


def test_read_split_rejects_different_image_and_label_counts(tmp_path):
  images, labels = fake_split(5)
  images_path, labels_path = write_split(tmp_path, images, labels[:4])
  with pytest.raises(ValueError) as error:
    fashion_mnist.read_split(str(tmp_path), 'train')
  assert str(error.value) == f'{images_path} holds 5 images but {labels_path} holds 4 labels'


def test_read_split_rejects_labels_out_of_range(tmp_path):
  _, labels_path = write_split(tmp_path, IMAGES, np.array([0, 9, 10, 255, 3]), 'test')
  with pytest.raises(ValueError) as error:
    fashion_mnist.read_split(str(tmp_path), 'test')
  assert str(error.value) == f'{labels_path}: 2 labels outside 0..9, the first 10 at index 2'


def test_bad_idx_files_fail_preparation_naming_the_file(tmp_path):
  debian_dir = tmp_path / 'debian'
  debian_dir.mkdir()
  write_split(debian_dir, *fake_split(), 'train')
  images_path, _ = write_split(debian_dir, idx_bytes(IMAGES)[:-1], fake_split()[1], 'test')
  with pytest.raises(errors.DataError, match=f'{images_path}: truncated'):
    fashion_mnist.data_sources(str(tmp_path / 'tfds'), str(debian_dir))
  builder = fashion_mnist.FashionMnistDebian(data_dir=str(tmp_path / 'tfds'))
  assert not builder.is_prepared()
  assert not (tmp_path / 'tfds').exists() or not list((tmp_path / 'tfds').rglob('*.array_record*'))


def test_prepared_data_is_refused_for_another_copy_of_the_idx_files(tmp_path):
  """A data_dir prepared from one copy is not silently used for another (the run's config
  would name the other as its source)."""
  copies = []
  for seed in (5, 6):
    debian_dir = tmp_path / f'debian{seed}'
    debian_dir.mkdir()
    write_split(debian_dir, *fake_split(seed), 'train')
    write_split(debian_dir, *fake_split(3), 'test')
    copies.append(str(debian_dir))
  data_dir = str(tmp_path / 'tfds')
  assert len(fashion_mnist.data_sources(data_dir, copies[0])['train']) == 5
  assert len(fashion_mnist.data_sources(data_dir, copies[0])['train']) == 5  # The same copy.
  with pytest.raises(errors.DataError, match=f'prepared from the IDX files in {copies[0]}, and '
                     f'debian_dir={copies[1]} holds other files'):
    fashion_mnist.data_sources(data_dir, copies[1])


def test_an_unwritable_data_dir_is_one_clear_error(tmp_path):
  debian_dir = tmp_path / 'debian'
  debian_dir.mkdir()
  write_split(debian_dir, *fake_split(), 'train')
  write_split(debian_dir, *fake_split(3), 'test')
  (tmp_path / 'a_file').write_text('')  # A data_dir under a file cannot be created (as root too).
  with pytest.raises(errors.DataError, match=r'cannot prepare Fashion-MNIST in data_dir=.*a_file'
                     r'/tfds .*set config.data.data_dir to a writable directory'):
    fashion_mnist.data_sources(str(tmp_path / 'a_file' / 'tfds'), str(debian_dir))


# --- Config errors ------------------------------------------------------------------------

def test_unknown_dataset_lists_the_valid_names():
  config = input_pipeline.DataSpec(name='cifar10', image_size=32, num_classes=10)
  with pytest.raises(ValueError, match='fashion_mnist, imagenet2012, synthetic'):
    input_pipeline.make(config, 'train', batch_size=8, train=True, shard=ONE_HOST)
  with pytest.raises(ValueError, match='valid: fashion_mnist'):
    input_pipeline.check_available(config)


def test_config_that_contradicts_the_dataset_fails(fashion_dir):
  with pytest.raises(ValueError, match='num_classes=1000 but fashion_mnist has 10'):
    input_pipeline.check_available(fashion_config(fashion_dir, num_classes=1000))
  with pytest.raises(ValueError, match="no split 'validation'"):
    input_pipeline.check_available(fashion_config(fashion_dir), 'validation')
  with pytest.raises(ValueError, match='unknown augment'):
    input_pipeline.check_available(fashion_config(fashion_dir, augment='mixup'))


# --- ImageNet through tfds's builder ------------------------------------------------------

def test_imagenet_not_prepared_fails_at_once_with_instructions(tmp_path):
  config = input_pipeline.DataSpec(name='imagenet2012', data_dir=str(tmp_path),
                                          image_size=224, num_classes=1000, augment='rrc_flip')
  with pytest.raises(FileNotFoundError,
                     match=r"pip install '\.\[tf\]'.*python -m dsnet_jax.tools.prepare_imagenet"):
    input_pipeline.check_available(config)


with tfds.core.registered.skip_registration():

  class Imagenet2012(tfds.core.GeneratorBasedBuilder):
    """A few random JPEGs stored exactly like tfds's `imagenet2012` (same name and features)."""
    VERSION = tfds.core.Version('5.1.0')
    code_path = epath.Path(__file__)  # tensorflow/datasets#11212, see fashion_mnist.py.

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=1000),
          'file_name': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(0, 12), 'validation': self._generate_examples(1, 5)}

    def _generate_examples(self, seed, n):
      rng = np.random.default_rng(seed)
      for i in range(n):
        shape = (*rng.integers(40, 90, size=2), 3)[:2 if i == 1 else 3]  # One grayscale JPEG.
        jpeg = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(jpeg, format='JPEG')
        yield i, {'image': jpeg.getvalue(), 'label': int(rng.integers(1000)),
                  'file_name': f'{i}.JPEG'}


def test_imagenet_reads_prepared_array_record_without_tensorflow(tmp_path):
  Imagenet2012(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  config = input_pipeline.DataSpec(name='imagenet2012', data_dir=str(tmp_path),
                                          image_size=32, num_classes=1000, augment='rrc_flip')
  input_pipeline.check_available(config)
  train = input_pipeline.make(config, 'train', batch_size=4, train=True, shard=ONE_HOST)
  assert (train.num_examples, train.steps_per_epoch, train.image_shape) == (12, 3, (32, 32, 3))
  batch = next(train.batches())
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
  evaluation = input_pipeline.make(config, 'validation', batch_size=4, train=False, shard=ONE_HOST)
  batches = list(evaluation.batches())
  assert [b['mask'].sum() for b in batches] == [4, 1]
  assert batches[0]['image'].shape == (4, 32, 32, 3)


# --- Loader: determinism, resumption, sharding ---------------------------------------------

def test_same_seed_same_batches_other_seed_other_batches():
  def run(seed):
    source = SyntheticSource(50, (8, 8, 3), 5)
    pre = preprocess.Preprocess(8, 3, (0.5,) * 3, (0.5,) * 3, 'pad_crop_flip')
    return list(TrainLoader(source, pre, 10, seed, ONE_HOST).batches(0, 7))
  a, b, c = run(0), run(0), run(1)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not all(np.array_equal(x['image'], z['image']) for x, z in zip(a, c))


@pytest.mark.parametrize('start_step', [1, 4, 5, 13])
def test_resuming_at_a_step_gives_the_uninterrupted_stream(start_step):
  source = SyntheticSource(27, (6, 6, 1), 3)  # 27 // 5 = 5 steps per epoch, 2 dropped.
  pre = preprocess.Preprocess(6, 1, (0.5,), (0.5,), 'pad_crop_flip')
  loader = TrainLoader(source, pre, 5, seed=7, shard=ONE_HOST)
  uninterrupted = list(loader.batches(0, 16))
  resumed = list(loader.batches(start_step, 16 - start_step))
  for x, y in zip(uninterrupted[start_step:], resumed, strict=True):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  endless = loader.batches(start_step)
  np.testing.assert_array_equal(next(endless)['image'], resumed[0]['image'])


def test_every_epoch_is_a_new_permutation_without_repeats():
  loader = TrainLoader(IndexSource(23), IDENTITY, 4, seed=0, shard=ONE_HOST)
  epochs = np.asarray(labels(loader.batches(0, 15))).reshape(3, 20)
  for epoch in epochs:
    assert len(set(epoch)) == 20
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(epochs[1], np.concatenate(
      [loader.global_indices(s) for s in range(5, 10)]))


def test_hosts_read_disjoint_slices_that_make_the_global_batch():
  source = IndexSource(41)
  single = labels(TrainLoader(source, IDENTITY, 8, seed=2, shard=ONE_HOST).batches(0, 10))
  hosts = [labels(TrainLoader(source, IDENTITY, 8, seed=2, shard=HostShard(p, 2)).batches(0, 10))
           for p in range(2)]
  for step in range(10):
    assert len(hosts[0][step]) == len(hosts[1][step]) == 4
    assert not set(hosts[0][step]) & set(hosts[1][step])
    assert hosts[0][step] + hosts[1][step] == single[step]
  first_epoch = [i for host in hosts for batch in host[:5] for i in batch]
  assert len(set(first_epoch)) == 40  # 41 // 8 = 5 steps; one record dropped.
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    TrainLoader(source, IDENTITY, 8, shard=HostShard(0, 3))


def test_eval_counts_every_example_once_across_hosts():
  source = IndexSource(103)
  seen = []
  for p in range(2):
    loader = EvalLoader(source, IDENTITY, 16, shard=HostShard(p, 2))
    batches = list(loader.batches())
    assert loader.steps_per_epoch == len(batches) == 7
    assert all(b['label'].shape == (8,) and b['mask'].dtype == bool for b in batches)
    seen += [int(l) for b in batches for l in b['label'][b['mask']]]
  assert sorted(seen) == list(range(103))


def test_workers_give_the_same_batches_as_in_process():
  source = SyntheticSource(40, (8, 8, 1), 4)
  pre = preprocess.Preprocess(8, 1, (0.5,), (0.5,), 'pad_crop_flip')
  runs = [list(TrainLoader(source, pre, 8, seed=1, shard=ONE_HOST, num_workers=w).batches(3, 4))
          for w in (0, 1)]
  for x, y in zip(*runs, strict=True):
    np.testing.assert_array_equal(x['image'], y['image'])


def test_synthetic_pipeline_and_in_memory_source():
  config = input_pipeline.DataSpec(name='synthetic', image_size=16, num_classes=7,
                                          augment='rrc_flip', synthetic_num_examples=30)
  pipeline = input_pipeline.make(config, 'train', batch_size=6, train=True, shard=ONE_HOST)
  assert (pipeline.num_examples, pipeline.num_classes, pipeline.image_shape) == (
      30, 7, (16, 16, 3))
  batch = next(pipeline.batches())
  assert batch['image'].shape == (6, 16, 16, 3) and batch['label'].max() < 7
  source = SyntheticSource(30, (16, 16, 3), 7)
  memory = ArraySource(load_numpy(source, chunk=7))
  np.testing.assert_array_equal(memory[29]['image'], source[29]['image'])
  assert source[3]['label'] == memory[3]['label']


# --- Preprocessing -------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(50, 80, 3), (300, 200, 3), (60, 61), (20, 20, 1)])
def test_rrc_flip_and_resize_crop_shapes(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  pre = preprocess.Preprocess(64, 3, imagenet.MEAN, imagenet.STD, 'rrc_flip', 'resize_crop')
  out = pre.train({'image': image, 'label': 5}, np.random.default_rng(1))
  assert out['image'].shape == (64, 64, 3) and out['image'].dtype == np.float32
  assert out['label'].dtype == np.int32 and out['label'] == 5
  first = pre.eval({'image': image, 'label': 5})['image']
  assert first.shape == (64, 64, 3)
  np.testing.assert_array_equal(first, pre.eval({'image': image, 'label': 5})['image'])


def test_random_resized_crop_box_stays_inside_the_image():
  for seed in range(200):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 400, size=2)
    left, top, right, bottom = preprocess.random_resized_crop_box(height, width, rng)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_center_crop_box_matches_resize_then_crop():
  # 256x512 -> shorter side 256/0.875 -> crop 224 keeps a 224x224 window of the original.
  assert preprocess.center_crop_box(256, 512, 224, 0.875) == (144.0, 16.0, 368.0, 240.0)


def test_pad_crop_flip_and_identity_eval_for_28x28():
  image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
  pre = preprocess.Preprocess(28, 1, fashion_mnist.MEAN, fashion_mnist.STD, 'pad_crop_flip')
  outs = [pre.train({'image': image, 'label': 1}, np.random.default_rng(s))['image']
          for s in range(4)]
  assert all(o.shape == (28, 28, 1) and o.dtype == np.float32 for o in outs)
  np.testing.assert_array_equal(outs[0], pre.train({'image': image, 'label': 1},
                                                   np.random.default_rng(0))['image'])
  assert not all(np.array_equal(outs[0], o) for o in outs[1:])
  evaluated = pre.eval({'image': image, 'label': 1})['image']
  expected = (image / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
  np.testing.assert_allclose(evaluated, expected.astype(np.float32), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="eval_resize='resize_crop'"):
    pre.eval({'image': np.zeros((30, 30, 1), np.uint8), 'label': 0})


def test_imagenet_mean_std_and_grayscale_to_rgb():
  pre = preprocess.Preprocess(8, 3, imagenet.MEAN, imagenet.STD, eval_resize='resize_crop')
  gray = np.full((10, 12), 128, np.uint8)
  out = pre.eval({'image': gray, 'label': 0})['image']
  np.testing.assert_allclose(out[0, 0], (128 / 255 - np.asarray(imagenet.MEAN))
                             / np.asarray(imagenet.STD), rtol=1e-5)


# --- Extra training augmentation: views, mixup / cutmix, RandAugment, random erasing ----------

def assert_same_batches(xs, ys):
  for x, y in zip(xs, ys, strict=True):
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_views_are_other_augmentations_of_the_same_records_and_resume():
  pre = preprocess.Preprocess(8, 1, (0.0,), (1.0,), 'pad_crop_flip')
  loader = TrainLoader(IndexSource(27, size=8), pre, 5, seed=3, shard=ONE_HOST, views=2)
  batches = list(loader.batches(0, 8))
  for batch in batches:
    assert set(batch) == {'image', 'image_view1', 'label'}
    assert batch['image_view1'].shape == batch['image'].shape == (5, 8, 8, 1)
    for view in ('image', 'image_view1'):  # Pad-cropped images keep some pixels of record `label`.
      np.testing.assert_allclose(batch[view].max(axis=(1, 2, 3)), batch['label'] / 255, rtol=1e-6)
  assert not all(np.array_equal(b['image'], b['image_view1']) for b in batches)
  assert_same_batches(batches[6:], loader.batches(6, 2))
  single = TrainLoader(IndexSource(27, size=8), pre, 5, seed=3, shard=ONE_HOST).batches(0, 8)
  for batch, one in zip(batches, single, strict=True):  # View 0 is what views=1 gives.
    np.testing.assert_array_equal(batch['image'], one['image'])


def mix_loaders(mixing, views=1):
  source = SyntheticSource(30, (8, 8, 3), 6)
  pre = preprocess.Preprocess(8, 3, (0.5,) * 3, (0.5,) * 3, 'pad_crop_flip')
  make = lambda m: TrainLoader(source, pre, 6, seed=1, shard=ONE_HOST, views=views, mixing=m)
  return make(None), make(mixing)


def test_mixup_mixes_images_and_labels_with_the_reversed_batch():
  mixing = augment.Mixing(6, seed=1, mixup_alpha=0.8)
  plain, mixed = mix_loaders(mixing, views=2)
  batches = list(mixed.batches(0, 7))
  for step, (x, y) in enumerate(zip(plain.batches(0, 7), batches, strict=True)):
    lam, box = mixing.params(step, 8, 8)
    assert box is None and 0 < lam < 1
    for key in ('image', 'image_view1'):
      expected = x[key] * np.float32(lam) + x[key][::-1] * np.float32(1 - lam)
      np.testing.assert_array_equal(y[key], expected)
    np.testing.assert_array_equal(y['label'], x['label'])
    one_hot = np.eye(6, dtype=np.float32)[x['label']]
    np.testing.assert_allclose(y['label_probs'], lam * one_hot + (1 - lam) * one_hot[::-1],
                               rtol=1e-6)
    np.testing.assert_allclose(y['label_probs'].sum(axis=1), 1, rtol=1e-6)
    assert y['label_probs'].dtype == np.float32
  assert len({mixing.params(s, 8, 8)[0] for s in range(7)}) == 7
  assert_same_batches(batches[5:], mixed.batches(5, 2))


def test_cutmix_pastes_a_box_of_the_reversed_batch_with_area_corrected_lambda():
  mixing = augment.Mixing(6, seed=1, cutmix_alpha=1.0)
  plain, mixed = mix_loaders(mixing)
  for step, (x, y) in enumerate(zip(plain.batches(0, 5), mixed.batches(0, 5), strict=True)):
    lam, (top, bottom, left, right) = mixing.params(step, 8, 8)
    assert lam == 1 - (bottom - top) * (right - left) / 64
    inside = np.zeros((8, 8), bool)
    inside[top:bottom, left:right] = True
    np.testing.assert_array_equal(y['image'][:, inside], x['image'][::-1, inside])
    np.testing.assert_array_equal(y['image'][:, ~inside], x['image'][:, ~inside])
    one_hot = np.eye(6, dtype=np.float32)[x['label']]
    np.testing.assert_allclose(y['label_probs'], lam * one_hot + (1 - lam) * one_hot[::-1],
                               rtol=1e-6)
  both = augment.Mixing(6, seed=1, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  kinds = [both.params(s, 8, 8)[1] is None for s in range(40)]
  assert any(kinds) and not all(kinds)
  assert [both.params(s, 8, 8) for s in range(40)] == [both.params(s, 8, 8) for s in range(40)]
  never = augment.Mixing(6, mixup_alpha=0.8, prob=0.0)
  x = next(plain.batches())
  y = never(x, 0)
  np.testing.assert_array_equal(y['image'], x['image'])
  np.testing.assert_array_equal(y['label_probs'], np.eye(6, dtype=np.float32)[x['label']])


@pytest.mark.parametrize('channels', [1, 3])
def test_randaugment_changes_images_deterministically_per_seed(channels):
  image = np.random.default_rng(0).integers(30, 250, (24, 24, channels), dtype=np.uint8)
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  for name, op in augment.RAND_OPS.items():
    out = np.asarray(op(pil, 0.9, np.random.default_rng(0)))
    assert out.shape == pil.size[::-1] + image.shape[2:3 if channels == 3 else 2], name
    unchanged = name == 'identity' or (name == 'color' and channels == 1)  # No colour in grey.
    assert out.dtype == np.uint8 and unchanged == np.array_equal(out, np.asarray(pil)), name
  out = augment.RandAugment(3, 9.0, prob=1.0)(image, np.random.default_rng(0))
  assert out.shape == image.shape and out.dtype == np.uint8
  mean = (0.5,) * channels
  pre = preprocess.Preprocess(24, channels, mean, mean, randaugment='rand-m9-n2-p1.0')
  plain = preprocess.Preprocess(24, channels, mean, mean)
  record = {'image': image, 'label': 2}
  outs = [pre.train(record, np.random.default_rng(s))['image'] for s in range(6)]
  assert all(o.shape == (24, 24, channels) and o.dtype == np.float32 for o in outs)
  np.testing.assert_array_equal(outs[0], pre.train(record, np.random.default_rng(0))['image'])
  base = plain.train(record, np.random.default_rng(0))['image']
  assert sum(not np.array_equal(o, base) for o in outs) >= 4
  assert len({o.tobytes() for o in outs}) >= 4
  np.testing.assert_array_equal(pre.eval(record)['image'], plain.eval(record)['image'])
  assert augment.RandAugment.parse('rand-m7-mstd0.5') == augment.RandAugment(2, 7.0, 0.5, 0.5)
  with pytest.raises(ValueError, match='rand-m9-n2'):
    preprocess.Preprocess(24, channels, mean, mean, randaugment='m9-n2')


def test_random_erasing_replaces_one_rectangle_with_noise():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  erase = preprocess.Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3, random_erasing=1.0)
  base = preprocess.Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3).eval({'image': image, 'label': 0})
  for seed in range(10):
    out = erase.train({'image': image, 'label': 0}, np.random.default_rng(seed))['image']
    np.testing.assert_array_equal(
        out, erase.train({'image': image, 'label': 0}, np.random.default_rng(seed))['image'])
    changed = (out != base['image']).any(axis=-1)
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    box = changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    assert box.all() and box.sum() == changed.sum()  # Exactly one full rectangle changed.
    assert 0.015 <= box.size / changed.size <= 0.37
  never = preprocess.Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3, random_erasing=0.0)
  np.testing.assert_array_equal(
      never.train({'image': image, 'label': 0}, np.random.default_rng(0))['image'], base['image'])


def test_pipeline_config_turns_on_the_extra_augmentation():
  config = input_pipeline.DataSpec(
      name='synthetic', image_size=16, num_classes=7, augment='rrc_flip',
      synthetic_num_examples=24, views=2, mixup_alpha=0.8, cutmix_alpha=1.0,
      randaugment='rand-m9-n2', random_erasing=0.25)
  train = input_pipeline.make(config, 'train', batch_size=6, train=True, shard=ONE_HOST)
  assert (train.views, train.mixes_labels) == (2, True)
  batch = next(train.batches())
  assert set(batch) == {'image', 'image_view1', 'label', 'label_probs'}
  assert batch['image_view1'].shape == (6, 16, 16, 3) and batch['label_probs'].shape == (6, 7)
  evaluation = input_pipeline.make(config, 'test', batch_size=6, train=False, shard=ONE_HOST)
  assert set(next(evaluation.batches())) == {'image', 'label', 'mask'}
  assert (evaluation.views, evaluation.mixes_labels) == (1, False)
  with pytest.raises(ValueError, match='randaugment'):
    input_pipeline.check_available(dataclasses.replace(config, randaugment='rand-x9'))


def test_preparing_imagenet_says_what_is_missing_before_anything_is_written(tmp_path,
                                                                             monkeypatch):
  find_spec = imagenet.importlib.util.find_spec
  monkeypatch.setattr(imagenet.importlib.util, 'find_spec',
                      lambda name: None if name == 'tensorflow' else find_spec(name))
  with pytest.raises(errors.DataError, match=r"needs TensorFlow: pip install '\.\[tf\]'"):
    imagenet.prepare(str(tmp_path), str(tmp_path / 'data'))
  monkeypatch.setattr(imagenet.importlib.util, 'find_spec', lambda name: object())
  (tmp_path / 'ILSVRC2012_img_val.tar').write_bytes(b'')
  with pytest.raises(errors.DataError, match='lacks ILSVRC2012_img_train.tar'):
    imagenet.prepare(str(tmp_path), str(tmp_path / 'data'))
  assert not (tmp_path / 'data').exists()


def test_a_split_the_data_set_lacks_is_one_data_error():
  spec = input_pipeline.DataSpec(name='synthetic', image_size=8, channels=1, num_classes=2,
                                 synthetic_num_examples=8)
  with pytest.raises(errors.DataError, match=r"synthetic has no split 'validation'; splits: "
                     r"\['test', 'train'\]"):
    input_pipeline.make(spec, 'validation', batch_size=4, train=False)


def test_normalization_inception_is_timms_vit_convention():
  spec = input_pipeline.DataSpec(name='imagenet2012')
  assert input_pipeline.preprocessing(spec).mean == imagenet.MEAN
  inception = input_pipeline.preprocessing(dataclasses.replace(spec, normalization='inception'))
  assert (inception.mean, inception.std) == ((0.5,) * 3, (0.5,) * 3)
  image = np.full((8, 8, 3), 255, np.uint8)
  np.testing.assert_allclose(inception.normalize(image), 1.0)
  with pytest.raises(errors.ConfigError, match="data.normalization='imagenet'"):
    input_pipeline.preprocessing(dataclasses.replace(spec, normalization='imagenet'))
