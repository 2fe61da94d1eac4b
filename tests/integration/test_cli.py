"""The command lines and what they guarantee as processes: config printing and overrides, one
error line before any work, data prepared once by concurrent processes, checkpoint saves that
fail or are killed."""
import fcntl
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checks import ROOT, fake_split, write_split
from dsnet_jax import checkpointing, config_lib, huge_pages, train_lib


@pytest.mark.parametrize('name', ['vit_s', 'resnet50', 'ds_mbnet_imagenet'])
def test_imagenet_missing_fails_at_once_with_instructions(name, tmp_path):
  config = config_lib.load_config_file(str(ROOT / f'configs/{name}.py'))
  config.data.data_dir = str(tmp_path / 'no_data')
  start = time.perf_counter()
  with pytest.raises(Exception, match='imagenet2012') as error:
    train_lib.train_and_evaluate(config, str(tmp_path / 'work'))
  assert 'tfds build' in str(error.value) or 'prepare' in str(error.value).lower()
  assert time.perf_counter() - start < 10
  assert not (tmp_path / 'work').exists()


def test_print_config_shows_the_overrides_and_exits_without_a_workdir():
  for script in ('train.py', 'eval.py'):
    done = subprocess.run([sys.executable, script, '--config=configs/tiny.py',
                           '--config.batch_size=4', '--print_config'], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert 'batch_size: 4\n' in done.stdout and 'model_name: ds_mbnet' in done.stdout
    missing = subprocess.run([sys.executable, script, '--config=configs/tiny.py'], cwd=ROOT,
                             capture_output=True, text=True)
    required = '--workdir is required' if script == 'train.py' else (
        '--workdir or --checkpoint is required')
    assert missing.returncode == 1 and required in missing.stderr


def test_print_config_resolves_epochs_into_steps():
  done = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/tiny.py', '--config.batch_size=16',
       '--config.supernet.steps=0', '--config.supernet.epochs=2', '--print_config'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  supernet = done.stdout.split('supernet:')[1]
  assert '  steps: 8\n' in supernet  # 2 epochs of 64 synthetic examples at batch 16.


def test_a_misspelt_override_is_one_error_line():
  done = subprocess.run([sys.executable, 'train.py', '--config=configs/tiny.py',
                         '--config.model.bogus=1', '--print_config'], cwd=ROOT,
                        capture_output=True, text=True)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      'error: --config.model.bogus: no such config key ("\'bogus\'"); --print_config lists them']


def test_print_config_scales_the_learning_rate_without_the_data(tmp_path):
  """ImageNet absent: epochs stay epochs (said on stderr), the learning rate still scales,
  and nothing is written into the data directory."""
  data_dir = tmp_path / 'no_imagenet'
  done = subprocess.run([sys.executable, 'train.py', '--config=configs/resnet50.py',
                         f'--config.data.data_dir={data_dir}', '--config.batch_size=512',
                         '--print_config'], cwd=ROOT, capture_output=True, text=True, check=True)
  supernet = done.stdout.split('supernet:')[1]
  assert '    lr: 0.2\n' in supernet and '  epochs: 150.0\n' in supernet  # 0.1 per 256 images.
  assert '# epochs not resolved into steps' in done.stderr
  assert not data_dir.exists()


def test_cluster_flags_are_checked_before_any_work(tmp_path):
  for flags, message in ((['--num_processes=2'], '--num_processes need --distributed'),
                         (['--distributed', '--num_processes=2', '--process_id=2'],
                          'need 0 <= process_id < num_processes')):
    done = subprocess.run([sys.executable, 'train.py', '--config=configs/tiny.py',
                           f'--workdir={tmp_path}', *flags], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 1 and done.stderr.strip().endswith(message)
    assert list(tmp_path.iterdir()) == []


_KILLED_SAVE = textwrap.dedent('''
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from dsnet_jax import checkpointing

    ckpt = checkpointing.Checkpointer(sys.argv[1])
    ckpt.save(1, {'w': jnp.ones(4)}, {'step': 1})

    async def die(self):  # The process dies after writing step 2, before orbax commits it.
      os._exit(9)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, {'w': jnp.full(4, 2.0)}, {'step': 2})
''')


def test_a_killed_save_leaves_the_previous_step_latest(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-c', _KILLED_SAVE, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 9, run.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2.orbax-checkpoint-tmp']
  target = {'w': jax.ShapeDtypeStruct((4,), jnp.float32)}
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    state, meta, _ = ckpt.restore(target)
    np.testing.assert_array_equal(state['w'], np.ones(4))
    assert meta == {'step': 1}
    assert ckpt.save(2, {'w': jnp.full(4, 3.0)}, {'step': 2})  # The resumed run redoes step 2.
    assert ckpt.restore(target)[1] == {'step': 2}


_FAILED_SAVE = textwrap.dedent('''
    import sys
    import jax.numpy as jnp
    from dsnet_jax import checkpointing
    from dsnet_jax.tools import cli

    def main():
      checkpointing.Checkpointer(sys.argv[1]).save(1, {'w': jnp.ones(4)})
    cli.main_errors(main)()
''')


def test_a_failed_save_exits_at_once_with_the_os_error_last(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-c', _FAILED_SAVE, str(blocker)], env=env,
                       capture_output=True, text=True, timeout=60)
  assert run.returncode == 1
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('error: saving step 1 to ') and 'FileExistsError' in last, run.stderr


def test_concurrent_first_use_prepares_once_and_every_process_reads_it(tmp_path):
  """Trainings started at once on a fresh machine: tfds's preparation is not safe for concurrent
  writers (the second rename failed with FileExistsError); one prepares, the others say they
  wait, then read its files."""
  debian_dir, data_dir = tmp_path / 'debian', tmp_path / 'tfds'
  debian_dir.mkdir()
  data_dir.mkdir()
  train_images, train_labels = fake_split(5)
  write_split(debian_dir, train_images, train_labels, 'train')
  write_split(debian_dir, *fake_split(3), 'test')
  script = ('import sys; from dsnet_jax.data import fashion_mnist; '
            's = fashion_mnist.data_sources(sys.argv[1], sys.argv[2]); '
            "print('read', len(s['train']), len(s['test']), int(s['train'][4]['label']))")
  logs = [tmp_path / f'process{i}.log' for i in range(3)]
  with open(data_dir / 'fashion_mnist_debian.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # As a process preparing it would: all three must wait.
    streams = [open(log, 'w') for log in logs]
    processes = [subprocess.Popen([sys.executable, '-c', script, str(data_dir), str(debian_dir)],
                                  stdout=stream, stderr=subprocess.STDOUT) for stream in streams]
    try:
      deadline = time.time() + 120
      while not all('Waiting for another process to prepare' in log.read_text() for log in logs):
        assert time.time() < deadline and all(p.poll() is None for p in processes), [
            log.read_text()[-2000:] for log in logs]
        time.sleep(0.2)
      fcntl.flock(lock, fcntl.LOCK_UN)  # All three race for it now.
      for p in processes:
        p.wait(timeout=300)
    finally:
      for p, stream in zip(processes, streams):
        p.kill()
        stream.close()
  outputs = [log.read_text() for log in logs]
  assert [p.returncode for p in processes] == [0, 0, 0], [out[-2000:] for out in outputs]
  assert sum('Downloading and preparing' in out for out in outputs) == 1, outputs
  for out in outputs:
    assert f'read 5 3 {train_labels[4]}' in out.splitlines(), out[-2000:]


# Run by the child: the host looks like glibc 2.36 with THP in 'madvise' mode on any machine
# (an unknown tunable is ignored), so the exec path always runs.
CHILD = '''
import os, platform, sys
from dsnet_jax import huge_pages
huge_pages.thp_mode = lambda *_: 'madvise'
platform.libc_ver = lambda *_, **__: ('glibc', '2.36')
print('start', os.getpid(), flush=True)
huge_pages.relaunch()
print('argv', sys.argv[1:], 'optimize', sys.flags.optimize)
print('tunables', os.environ.get('GLIBC_TUNABLES'))
'''


def _child(cmd, tunables=None, stdin=None):
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', huge_pages.RELAUNCHED)}
  if tunables is not None:
    env['GLIBC_TUNABLES'] = tunables
  done = subprocess.run(cmd, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                        check=True)
  return done.stdout.splitlines()


@pytest.mark.parametrize('tunables, expected', [
    (None, 'glibc.malloc.hugetlb=1'),
    ('glibc.malloc.arena_max=4', 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1')])
def test_relaunch_runs_the_same_command_again_with_the_tunable(tunables, expected):
  lines = _child([sys.executable, '-O', '-c', CHILD, 'an-argument', '-x'], tunables)
  starts = [line for line in lines if line.startswith('start')]
  assert len(starts) == 2 and starts[0] == starts[1]  # The same process, started twice.
  assert lines[2:] == ["argv ['an-argument', '-x'] optimize 1", f'tunables {expected}']


def test_relaunch_leaves_a_set_tunable_and_a_script_from_stdin_alone():
  lines = _child([sys.executable, '-c', CHILD], 'glibc.malloc.hugetlb=0')
  assert len(lines) == 3 and lines[-1] == 'tunables glibc.malloc.hugetlb=0'
  lines = _child([sys.executable, '-', 'an-argument'], stdin=CHILD)
  assert len(lines) == 3 and lines[-1] == 'tunables None'


def test_eval_refuses_an_output_dir_that_is_a_file_before_any_work(tmp_path):
  target = tmp_path / 'report'
  target.write_text('not a directory')
  start = time.perf_counter()
  done = subprocess.run([sys.executable, 'eval.py', f'--workdir={tmp_path / "none"}',
                         f'--output_dir={target}'], cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 1
  assert done.stderr.strip() == f'error: --output_dir={target} is a file: name a directory'
  assert time.perf_counter() - start < 30 and target.read_text() == 'not a directory'


@pytest.mark.parametrize('command, message', [
    (['eval.py', '--workdir={none}', '--output_dir={file}/sub'],
     '--output_dir={file}/sub lies under {file}, which is a file'),
    (['-m', 'dsnet_jax.tools.escalate', '--workdir={none}', '--chain=0,2', '--budget=0.5',
      '--output_dir={file}'], '--output_dir={file} is a file: name a directory'),
    (['-m', 'dsnet_jax.tools.latency', '--model=ds_mbnet', '--image_size=32',
      '--output={file}/sub/x.json'], '--output={file}/sub/x.json lies under {file}, which is'),
    (['-m', 'dsnet_jax.tools.latency', '--model=ds_mbnet', '--image_size=32', '--rounds=0'],
     'batch sizes, --rounds and --singles must be positive'),
    (['-m', 'dsnet_jax.tools.latency', '--model=ds_mbnet', '--image_size=32',
      '--escalation_chain=0,3', '--escalation_share=nan'], '--escalation_share=nan: a fraction'),
    (['-m', 'dsnet_jax.tools.latency', '--model=ds_mbnet', '--image_size=32',
      '--escalation_chain=0,3', '--escalation_share=-0.1'], '--escalation_share=-0.1: a fraction'),
    (['train.py', '--config=configs/tiny.py', '--workdir={none}',
      '--config.data.synthetic_num_examples=4'],
     'global batch size 8 exceeds the 4 training examples'),
    (['train.py', '--config=configs/tiny.py', '--workdir={none}',
      '--config.model.routing_space=auto', '--config.gate.budget=0.5',
      "--config.escalation.chain=('0', 'bogus')", '--config.escalation.budget=0.5'],
     "unknown route 'bogus'"),
    (['train.py', '--config=configs/tiny.py', '--workdir={none}',
      '--config.init_checkpoint={none}/nothing'],
     'config key init_checkpoint={none}/nothing: no such checkpoint directory'),
    (['train.py', '--config=configs/vit_s_finetune.py', '--workdir={none}'],
     'a fine-tuning config needs the imported checkpoint after a colon'),
])
def test_a_bad_output_path_or_flag_is_one_error_line_before_any_work(tmp_path, command, message):
  file = tmp_path / 'a_file'
  file.write_text('kept')
  fill = lambda s: s.format(file=file, none=tmp_path / 'none')
  done = subprocess.run([sys.executable, *map(fill, command)], cwd=ROOT, capture_output=True,
                        text=True)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith(f'error: {fill(message)}'), done.stderr
  assert 'Traceback' not in done.stderr and 'USAGE' not in done.stderr.upper()
  assert 'restored' not in done.stdout and 'step' not in done.stdout
  assert file.read_text() == 'kept' and not (tmp_path / 'none').exists()  # Not even a lock.
