"""Evaluates a trained workdir: route table, gated result; eval.json, eval.png, routes.npy; the
command line is `dsnet_jax/tools/eval.py`.

    python eval.py --workdir=workdir/ds_mbnet_fmnist   # the config saved with its checkpoint
    python eval.py --config=configs/ds_mbnet_fmnist.py --workdir=workdir/ds_mbnet_fmnist
"""
from dsnet_jax import huge_pages

if __name__ == '__main__':
  huge_pages.relaunch()  # First: the imports below would otherwise run twice.
  from dsnet_jax.tools import eval  # pylint: disable=redefined-builtin
  eval.run()
