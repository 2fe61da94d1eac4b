"""MAdds and parameters of every route of a model, as a table or JSON.

    python -m dsnet_jax.tools.complexity --model=ds_mbnet [--image_size=224] [--json]
"""
import json

from absl import app, flags

from dsnet_jax.complexity import complexity_rows, format_table
from dsnet_jax.models import available_models, get_model
from dsnet_jax.tools import cli

flags.DEFINE_enum('model', 'ds_mbnet', available_models(), 'Model module under dsnet_jax/models.')
flags.DEFINE_integer('image_size', 224, 'Input height and width.')
flags.DEFINE_integer('in_channels', 3, 'Input channels.')
flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')


def main(argv):
  del argv
  f = flags.FLAGS
  model = get_model(f.model)
  rows = complexity_rows(model, (f.image_size, f.image_size, f.in_channels))
  print(json.dumps(rows, indent=1) if f.json else format_table(rows))


if __name__ == '__main__':
  app.run(cli.main_errors(main))
