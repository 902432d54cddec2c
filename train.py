r"""Trains a spiking transformer. Intentionally thin: the logic is in train_lib.

  python train.py --workdir=/tmp/digits                       # embedded default
  python train.py --config=configs/spikformer.py:cifar10-4-384 --workdir=DIR \
      --config.data.name=npz --config.data.path=cifar10.npz --config.model.T=6

Rerunning the same command with the same --workdir resumes from the latest
checkpoint. SIGTERM (a preemption) saves a checkpoint at the current step and
exits with status 143. Final metrics go to DIR/final_metrics.json and the last
line.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'configs', 'spikformer.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', f'{_DEFAULT_CONFIG}:digits', 'Config file (path.py:VARIANT).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() (multi-host runs). On TPU '
                               'pods and SLURM / Open MPI clusters it finds its peers itself.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   '--multihost elsewhere: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, '--multihost elsewhere.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, '--multihost elsewhere: 0..n-1.')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  if _MULTIHOST.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from spikeformer_jax import train_lib  # pylint: disable=import-outside-toplevel
  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train_lib.Preempted as e:
    print(str(e), file=sys.stderr)
    return 143  # 128 + SIGTERM: what schedulers expect of a job stopped by it
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
