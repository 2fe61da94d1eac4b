"""Route specs, route tables and host-side sandwich draws."""
import pytest

from dsnet_jax import errors, routes as routes_lib
from dsnet_jax.models import ds_mbnet


def table():
  return ds_mbnet.Model().routes


def test_route_is_hashable_and_immutable():
  route = table()[3]
  assert hash(route) == hash(routes_lib.Route('3', (16, 32, 48, 96, 320, 832)))
  with pytest.raises(AttributeError):
    route.name = '4'
  with pytest.raises(TypeError):
    routes_lib.Route('x', ([1, 2],))


def test_lookup_by_name_index_or_route_and_errors():
  t = table()
  assert t[3] is t['3'] is t[t[3]]
  with pytest.raises(errors.UnknownRouteError, match='valid routes: 0, 1, .*largest'):
    t['biggest']
  assert t.routing_index(2) == 2
  with pytest.raises(errors.UnknownRouteError, match=r"not in the routing space \['0'"):
    t.routing_index(7)
  assert [r.name for r in t.with_routing_space([0, 5, 9]).routing_space] == ['0', '5', '9']


def test_sandwich_draw_is_a_function_of_seed_and_step():
  t = table()
  draws = [routes_lib.sandwich_routes(t, seed=7, step=s, num_random=2) for s in range(200)]
  assert draws[5] == routes_lib.sandwich_routes(t, seed=7, step=5, num_random=2)
  assert draws != [routes_lib.sandwich_routes(t, seed=8, step=s, num_random=2) for s in range(200)]
  middles = set()
  for d in draws:
    assert len(d) == 4 and d[0].name == 'largest' and d[-1].name == '0'
    middles.update(r.name for r in d[1:-1])
  assert middles == {str(i) for i in range(1, 14)}


@pytest.mark.parametrize('family, kwargs', [
    ('ds_mbnet', {}),
    ('ds_resnet', {}),
    ('ds_vit', dict(variant='Ti/16', image_size=32, patch_size=16)),
])
def test_every_family_validates_its_routing_space(family, kwargs):
  """Routes the gate chooses from share the widths before it and run slimmest to widest."""
  from dsnet_jax.models import get_model
  with pytest.raises(ValueError, match=r"routes '0' and 'largest' of the routing space run "
                     r'different widths before the gate'):
    get_model(family, routing_space=(0, 'largest'), **kwargs).routes
  with pytest.raises(ValueError, match=r"route '1' is not wider than '2'"):
    get_model(family, routing_space=(0, 2, 1), **kwargs).routes
  with pytest.raises(ValueError, match=r"route '1' is not wider than '1'"):
    get_model(family, routing_space=(1, 1), **kwargs).routes
  assert [r.name for r in get_model(family, routing_space=(0, 3), **kwargs).routes
          .routing_space] == ['0', '3']


def test_a_route_table_prints_its_routes_widths_and_routing_indices():
  text = repr(ds_mbnet.Model(routing_space=(0, 6, 13)).routes)
  lines = text.splitlines()
  assert lines[0] == ('RouteTable: 15 routes; routing space [0, 6, 13]; 4 widths shared before '
                      'the gate')
  assert lines[2].split() == ['0', '(16,', '32,', '48,', '96,', '224,', '736)', '0']
  assert lines[8].split()[0] == '6' and lines[8].split()[-1] == '1'  # Routing index 1.
  assert lines[3].split()[0] == '1' and lines[3].rstrip().endswith(')')  # Not in the space.
  assert lines[-1].split()[0] == 'largest' and len(lines) == 2 + 15
