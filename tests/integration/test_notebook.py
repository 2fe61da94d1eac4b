"""The quickstart notebook runs top to bottom (on the tiny config), as Colab would run it."""
import pytest

from checks import ROOT

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
  notebook = nbformat.read(ROOT / 'notebooks' / 'quickstart.ipynb', as_version=4)
  (parameters,) = [c for c in notebook.cells if 'parameters' in c.metadata.get('tags', [])]
  parameters.source = (f"CONFIG = 'configs/tiny.py'\nWORKDIR = '{tmp_path / 'run'}'\n"
                       f"SUPERNET_STEPS = 4\nGATE_STEPS = 3\nFIGURES = '{tmp_path / 'figures'}'")
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': str(ROOT)}})
  client.execute()  # Raises CellExecutionError naming the failing cell.
  printed = '\n'.join(o.get('text', '') for c in notebook.cells if c.cell_type == 'code'
                      for o in c.get('outputs', []) if o.get('output_type') == 'stream')
  assert 'RouteTable: 5 routes; routing space [0, 1, 2]' in printed
  assert 'gated: accuracy' in printed
  error = float(printed.split('max |exported - supernet| =')[1].split()[0])
  assert error <= 1e-4
  for figure in ('quickstart_curve.png', 'quickstart_routes.png'):
    assert (tmp_path / 'figures' / figure).stat().st_size > 1000
