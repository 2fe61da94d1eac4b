"""Exports one route, or the routed model, as programs that run without dsnet_jax (the files:
`dsnet_jax.export`).

    python -m dsnet_jax.tools.export --config=C (--workdir=DIR | --checkpoint=CKPT) \
        (--route=R | --routed) --out=OUT [--format=jax,onnx] [--overwrite]
"""
from absl import app, flags
from ml_collections import config_flags

from dsnet_jax import config_lib, export, rundir
from dsnet_jax.data import input_pipeline
from dsnet_jax.errors import ExportError
from dsnet_jax.models import get_model
from dsnet_jax.tools import cli

config_flags.DEFINE_config_file('config', None, 'The config the checkpoint was trained with.')
flags.DEFINE_string('workdir', '', 'Training workdir: exports its latest stage checkpoint.')
flags.DEFINE_string('checkpoint', '', 'A stage checkpoint directory instead of --workdir.')
flags.DEFINE_string('route', None, "One route to export: 0, 1, ..., 'largest'.")
flags.DEFINE_bool('routed', False, 'Export the routed model: prefix + one suffix per route.')
flags.DEFINE_enum('router', 'auto', ['auto', 'gate', 'escalation'], 'With --routed, how the '
                  'bundle routes: the trained gate, or the escalation calibrated for the '
                  'checkpoint (python -m dsnet_jax.tools.escalate); auto: escalation when one is '
                  'saved, else the gate.')
flags.DEFINE_list('format', ['jax'], 'jax (jax.export, the default), onnx (needs .[export]), '
                  'or both: jax,onnx.')
flags.DEFINE_string('out', None, 'Output directory (must not exist or be empty).')
flags.DEFINE_bool('overwrite', False, 'Replace what a non-empty --out holds.')
flags.DEFINE_integer('batch_size', None, 'Export for this batch size only (default: any); '
                     "with --routed, the prefix's (a suffix takes any number).")
flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'Platforms to lower the jax.export for.')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  if (f.route is None) == (not f.routed):
    raise ExportError('pass exactly one of --route=R (one route) and --routed (the bundle)')
  if bool(f.workdir) == bool(f.checkpoint):
    raise ExportError('pass exactly one of --workdir and --checkpoint')
  config = f.config
  model = get_model(config.model_name, **config.model)
  preprocess = input_pipeline.preprocessing(config_lib.data_spec(config.data))
  image_shape = preprocess.image_shape
  if f.route is not None:
    model.routes[f.route]  # pylint: disable=pointless-statement  # Raises on an unknown route.
  kwargs = dict(formats=f.format, platforms=f.platforms, batch_size=f.batch_size,
                preprocessing=input_pipeline.describe_preprocessing(preprocess),
                overwrite=f.overwrite)
  export.Request.check(out_dir=f.out, **kwargs)  # Before restoring anything.
  loaded = rundir.load(f.workdir, f.checkpoint, config)
  restored = loaded.restored
  print(f'restored {restored.describe()}')
  if f.routed:
    escalation = loaded.escalation if f.router in ('auto', 'escalation') else None
    if f.router == 'escalation' and escalation is None:
      raise ExportError(f'{restored.directory} has no escalation calibrated for step '
                        f'{restored.step}: python -m dsnet_jax.tools.escalate first')
    if escalation is None and not restored.gated:
      raise ExportError(f'{restored.directory} holds no trained gate (stage '
                        f'{restored.meta.get("stage", "?")}): a routed bundle would route by '
                        'a random one. Export a gate-stage checkpoint, calibrate an escalation '
                        '(python -m dsnet_jax.tools.escalate), or export one route with --route')
    export.export_routed(loaded.model, loaded.variables, f.out, image_shape,
                         escalation=escalation, **kwargs)
  else:
    export.export_route(loaded.model, loaded.variables, f.route, f.out, image_shape, **kwargs)


if __name__ == '__main__':
  app.run(cli.main_errors(main))
