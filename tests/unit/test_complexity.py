"""MAdds/params per route against the reference figures and hand-computed counts."""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsnet_jax import complexity
from dsnet_jax.models import ds_mbnet

REFERENCE_MADDS_M = [132.89, 152.92, 175.15, 199.59, 226.24, 255.10, 286.17, 319.44, 354.92,
                     392.61, 432.51, 474.61, 518.93, 565.45]
KEYS_FILE = pathlib.Path(__file__).parent / 'testdata/ds_mbnet_state_dict_keys.txt'


def hand_madds(widths, image, depths=(1, 2, 2, 6, 2), strides=(1, 2, 2, 2, 2), stem_stride=2,
               in_channels=3, full=(24, 88, 168, 264, 640, 1152), classes=1000):
  """The reference convention written out layer by layer (no gate)."""
  h = image // stem_stride
  total = in_channels * widths[0] * 9 * h * h
  c_in, c_in_full = widths[0], full[0]
  for s in range(5):
    for b in range(depths[s]):
      h //= strides[s] if b == 0 else 1
      reduced = round(0.25 * c_in_full)
      total += c_in * 9 * h * h            # depthwise 3x3
      total += c_in * h * h + 2 * c_in * reduced  # SE: pool, reduce, expand
      total += c_in * widths[s + 1] * h * h       # pointwise
      c_in, c_in_full = widths[s + 1], full[s + 1]
  return total + c_in * h * h + c_in * classes    # pool + classifier


def test_madds_table_matches_reference():
  model = ds_mbnet.Model()
  rows = {r['route']: r for r in complexity.complexity_rows(model, (224, 224, 3))}
  got = [round(rows[str(i)]['madds'] / 1e6, 2) for i in range(14)]
  np.testing.assert_allclose(got, REFERENCE_MADDS_M, atol=0.0051)
  assert round(rows['largest']['madds'] / 1e6, 1) == 819.9
  for route in model.routes:
    assert rows[route.name]['madds'] == hand_madds(route.widths, 224)


def test_params_of_largest_route_match_the_released_checkpoint():
  total = 0
  for line in KEYS_FILE.read_text().splitlines():
    if line.startswith('#') or ' (' not in line:
      continue
    name, shape = line.split(' ', 1)
    if 'running' in name or 'num_batches' in name or '.gate.gate.' in name:
      continue  # Buffers, and the routing head (not read by a static route).
    total += math.prod(eval(shape))  # noqa: S307 - a tuple literal from our spec file.
  model = ds_mbnet.Model()
  largest = complexity.route_complexity(model, 'largest', (224, 224, 3))
  assert largest.params == total == 7_676_204 - 4 * 66
  route0 = complexity.route_complexity(model, 0, (224, 224, 3))
  with_gate = complexity.route_complexity(model, 0, (224, 224, 3), with_gate=True)
  assert with_gate.madds - route0.madds == 66 * 4  # Routing head on the 66-wide SE vector.
  assert with_gate.params - route0.params == 66 * 4


def test_small_model_counts_by_hand():
  model = ds_mbnet.Model(num_classes=10, stem_widths=(4, 8), stem_stride=1,
                         group_widths=((8, 16), (8, 16), (16, 24), (16, 24, 32), (32, 40, 48)),
                         group_depths=(1, 1, 1, 2, 1), group_strides=(1, 2, 1, 2, 1),
                         in_channels=1, routing_space=(0, 2))
  full = (8, 16, 16, 24, 32, 48)
  for route in model.routes:
    got = complexity.route_complexity(model, route, (28, 28, 1)).madds
    assert got == hand_madds(route.widths, 28, depths=(1, 1, 1, 2, 1), strides=(1, 2, 1, 2, 1),
                             stem_stride=1, in_channels=1, full=full, classes=10)


@pytest.mark.parametrize('route', [0, 'largest'])
def test_xla_cost_analysis_agrees_roughly(route):
  model = ds_mbnet.Model()
  variables = model.abstract_variables((224, 224, 3))
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  flops = complexity.xla_flops(lambda v, x: model.apply(v, x, route=route), variables, images)
  madds = complexity.route_complexity(model, route, (224, 224, 3)).madds
  ratio = flops / (2 * madds)
  print(f'route {route}: XLA flops / (2 * MAdds) = {ratio:.3f}')
  # XLA also counts BN, activations and elementwise ops, so it lands a little above 1.
  assert 0.95 < ratio < 1.5
