r"""Evaluates a checkpoint: top-1, top-5 and loss on a split.

  python eval.py --workdir=DIR [--split=test] [--step=N] [--output=FILE.json]

Uses the config saved in DIR/config.json unless --config is given. Restores
onto the devices visible now (a run trained on 8 devices evaluates on 1).
Prints one result line and writes a JSON file (default DIR/eval_SPLIT_STEP.json).
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Optional config override.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory.')
_SPLIT = flags.DEFINE_enum('split', 'test', ['train', 'test'], 'Split to evaluate.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON output path.')
_DEVICES = flags.DEFINE_integer('num_devices', None, 'Devices to use (default: all).')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  from spikeformer_jax import train_lib  # pylint: disable=import-outside-toplevel
  try:
    config = _CONFIG.value or train_lib.load_run_config(_WORKDIR.value)
    res = train_lib.evaluate_checkpoint(config, _WORKDIR.value, split=_SPLIT.value,
                                        step=_STEP.value, num_devices=_DEVICES.value)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  out = _OUTPUT.value or os.path.join(_WORKDIR.value, f'eval_{res["split"]}_{res["step"]}.json')
  with open(out, 'w', encoding='utf-8') as f:
    json.dump(res, f, indent=2)
  print(f'eval {res["split"]} step {res["step"]}: top1 {res["top1"]:.2%} | '
        f'top5 {res["top5"]:.2%} | loss {res["loss"]:.4f} | {res["count"]} examples '
        f'-> {out}')
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
