r"""Trains a spiking transformer. Intentionally thin: the logic is in train_lib.

  python train.py --workdir=/tmp/digits                       # embedded default
  python train.py --config=configs/spikformer.py:cifar10-4-384 --workdir=DIR \
      --config.data.name=npz --config.data.path=cifar10.npz --config.model.T=6

Rerunning the same command with the same --workdir resumes from the latest
intact checkpoint (a finished run is left as it is). SIGTERM (a preemption) and
SIGINT (Ctrl-C) save a checkpoint at the step reached and exit with status 143
and 130. One run at a time holds a workdir. Final metrics go to
DIR/final_metrics.json and the last line; user errors are one line and status 1
(bugs print their traceback; --traceback prints it for every error).

Installed (`pip install .`), `spikeformer-train` and `python -m spikeformer_jax.train` take
the same arguments from any directory; `--config=configs/<family>.py:VARIANT`
names the packaged config when there is no such file where it runs.
"""

import os
import sys

from absl import flags
from absl import logging

from spikeformer_jax import cli

_DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), 'configs', 'spikformer.py'
)  # packaged: any directory
_CONFIG = cli.define_config_file(
  'config', f'{_DEFAULT_CONFIG}:digits', 'Config file (path.py:VARIANT).'
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints and metrics: a local path or gs://BUCKET/PATH.'
)
_MULTIHOST = flags.DEFINE_bool(
  'multihost',
  False,
  'Call jax.distributed.initialize() (multi-host runs). On TPU '
  'pods and SLURM / Open MPI clusters it finds its peers itself.',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, '--multihost elsewhere: host:port of process 0.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, '--multihost elsewhere.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, '--multihost elsewhere: 0..n-1.')


def main(argv):
  del argv
  from spikeformer_jax import storage  # pylint: disable=import-outside-toplevel

  storage.check(str(_WORKDIR.value))  # s3:// and the like: one line, before anything starts
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel

  if _MULTIHOST.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from spikeformer_jax import checkpointing  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import train_lib  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS['verbosity'].present:  # failed saves are reported in one line
    checkpointing.quiet_orbax_logs()
  try:
    train_lib.train_and_evaluate(_CONFIG.value, str(_WORKDIR.value))  # required: never None
  except KeyboardInterrupt:  # several processes: SIGINT keeps Python's default
    print(
      'interrupted (SIGINT): stopped without saving; the last committed checkpoint '
      'is the resume point.',
      file=sys.stderr,
    )
    return 130
  return 0


def run():
  """`spikeformer-train`, `python -m spikeformer_jax.train`, `python train.py`."""
  flags.mark_flags_as_required(['workdir'])
  # Command-line mistakes: one line, exit status 2. What main raises goes
  # through errors.report: a user error one line and status 1, a SIGTERM /
  # SIGINT that saved its step (errors.Stopped) 143 / 130, a bug its traceback.
  cli.run(main)


if __name__ == '__main__':
  run()
