"""paths.check_output: an output path that cannot be written is refused by name, up front."""
import os

import pytest

from dsnet_jax import errors, paths


def test_an_output_path_is_checked_before_any_work(tmp_path):
  file = tmp_path / 'file'
  file.write_text('x')
  paths.check_output(tmp_path / 'new' / 'deeper', 'dir', '--out')  # Created later: fine.
  paths.check_output(tmp_path / 'new.json', 'file', '--out')
  paths.check_output('gs://bucket/dir', 'dir', '--out')  # Remote: the write says.
  for path, kind, message in ((file, 'dir', 'is a file: name a directory'),
                              (tmp_path, 'file', 'is a directory: name a file'),
                              (file / 'sub', 'dir', f'lies under {file}, which is a file'),
                              (file / 'a' / 'b.json', 'file', f'lies under {file}, which is')):
    with pytest.raises(errors.ConfigError, match=f'--out={path} {message}'):
      paths.check_output(path, kind, '--out')
  locked = tmp_path / 'locked'
  locked.mkdir()
  os.chmod(locked, 0o500)
  try:
    if os.access(locked, os.W_OK):  # Root writes anywhere: nothing to refuse.
      return
    with pytest.raises(errors.ConfigError, match='is not writable'):
      paths.check_output(locked / 'out', 'dir', '--out')
  finally:
    os.chmod(locked, 0o700)
