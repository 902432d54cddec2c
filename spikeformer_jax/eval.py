r"""Evaluates a checkpoint: top-1, top-5 and loss on a split; or analyses it.

  python eval.py --workdir=DIR [--split=test] [--step=N] [--ema] [--output=FILE.json]
  python eval.py --workdir=DIR --analyze [--analyze_examples=256] [--integer_inputs=mac]
      [--first_layer_mj=1.596 --nocount_head]   # Spikformer Table 2's Power

--analyze writes firing rates (per layer and timestep), operations, SOPs and
energy estimates per layer (analysis.json, layers.csv, neurons.csv,
analysis.md) and pictures (firing_rates.png, attention.png,
learning_curves.png) to DIR/analysis_SPLIT_STEP (see spikeformer_jax/analysis.py
for the counting conventions).

Uses the config saved in DIR/config.json unless --config is given; a --config
whose model fields differ from the run's (e.g. --config.model.T=2 on a T=4
run: a timestep study) is used, with one warning line naming those fields. Restores
onto the devices visible now (a run trained on 8 devices evaluates on 1).
Prints one result line and writes a JSON file (default DIR/eval_SPLIT_STEP.json).

Installed (`pip install .`), `spikeformer-eval` and `python -m spikeformer_jax.eval` take
the same arguments from any directory; `--config=configs/<family>.py:VARIANT`
names the packaged config when there is no such file where it runs.
"""

import json
import math
import os
import signal
import sys

from absl import flags
from absl import logging

from spikeformer_jax import cli
from spikeformer_jax import storage

_CONFIG = cli.define_config_file('config', None, 'Optional config override.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory.')
_SPLIT = flags.DEFINE_enum('split', 'test', ['train', 'test'], 'Split to evaluate.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON output path (--analyze: directory).')
_DEVICES = flags.DEFINE_integer('num_devices', None, 'Devices to use (default: all).')
_EMA = flags.DEFINE_bool('ema', False, 'Evaluate the EMA of the weights (runs with ema_decay).')
_ANALYZE = flags.DEFINE_bool('analyze', False, 'Firing rates, SOPs, energy and pictures.')
_EXAMPLES = flags.DEFINE_integer('analyze_examples', 256, 'Examples analysed.')
_INTEGER = flags.DEFINE_enum(
  'integer_inputs',
  'mac',
  ['mac', 'ac'],
  'Non-binary integer inputs (spike sums, event counts): MAC layers, or one AC per unit.',
)
_FIRST_MJ = flags.DEFINE_float(
  'first_layer_mj',
  0.0,
  "The first layer's energy as a constant, mJ per example (0: "
  'E_MAC x its MACs over T; Spikformer Table 2: 1.596).',
)
_COUNT_HEAD = flags.DEFINE_bool(
  'count_head',
  True,
  '--nocount_head: leave the classifier head out of the energy '
  '(Spikformer eq. 22 and MSViT eq. 18 have no head term).',
)
_ATTN_BLOCK = flags.DEFINE_integer('attention_block', 0, 'Attention module to draw.')
_ATTN_HEADS = flags.DEFINE_list('attention_heads', ['0'], 'Heads to draw.')


def _workdir() -> str:
  return str(_WORKDIR.value)  # not None: run() marks --workdir required


def analyze(config) -> int:
  from spikeformer_jax import analysis, errors  # pylint: disable=import-outside-toplevel

  try:
    report, paths = analysis.analyze_checkpoint(
      config,
      _workdir(),
      split=_SPLIT.value,
      step=_STEP.value,
      examples=_EXAMPLES.value,
      out_dir=_OUTPUT.value,
      conventions=analysis.Conventions(
        integer_inputs=_INTEGER.value, first_layer_mj=_FIRST_MJ.value, count_head=_COUNT_HEAD.value
      ),
      attention_block=_ATTN_BLOCK.value,
      attention_heads=tuple(map(int, _ATTN_HEADS.value)),
    )
  except IndexError as e:  # drawn before the analysis: name the flag
    flag = 'attention_block' if str(e).startswith('block=') else 'attention_heads'
    raise errors.ConfigError(
      f'--{flag}={flags.FLAGS[flag].serialize().split("=", 1)[-1]}: {errors.one_line(e)}'
    ) from e
  t = report['totals']
  print(
    f'analysis {report["split"]} step {report["step"]}, {report["examples"]} examples: '
    f'{t["macs"] / 1e9:.4f} GMAC dense, {t["sops"] / 1e9:.4f} G SOPs, '
    f'{t["energy_mj"]:.4f} mJ (non-spiking: {t["ann_energy_mj"]:.4f} mJ), mean '
    f'firing rate {t["mean_firing_rate"]:.4f} -> {storage.dirname(paths["json"])}'
  )
  return 0


def _check_writable(out: str | None):
  """Fails before evaluating, not after, when the result cannot be written:
  `out` is --output (a JSON file; with --analyze a directory) or None (the
  workdir's default). On gs:// a probe object is written and deleted (a
  directory there is only a name prefix: nothing to find missing)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import errors  # pylint: disable=import-outside-toplevel

  if out and not _ANALYZE.value and storage.isdir(out):
    raise errors.ConfigError(
      f'--output={out} is a directory; give a file path, e.g. {storage.join(out, "eval.json")}.'
    )
  if out and _ANALYZE.value:
    directory = out if storage.isdir(out) else storage.dirname(storage.abspath(out))
  else:
    directory = storage.dirname(storage.abspath(out)) if out else _workdir()
  if storage.is_remote(directory):
    probe = storage.join(directory, f'.eval-write-check-{os.getpid()}')
    try:
      storage.write_bytes(probe, b'')
      storage.remove(probe)
    except OSError as e:
      raise OSError(
        f'cannot write the result to {directory}: {errors.one_line(e)}; '
        'pass --output with a writable path.'
      ) from e
    return
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f'cannot write the result to {directory}: no such directory; '
      'create it or pass another --output.'
    )
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix='.eval-write-check-'):
      pass
  except OSError as e:
    raise OSError(
      f'cannot write the result to {directory}: {e.strerror}; pass --output with a writable path.'
    ) from e


def _sigterm(signum, frame):
  del signum, frame
  raise KeyboardInterrupt('SIGTERM')


def main(argv):
  del argv
  storage.check(_workdir())  # s3:// and the like: one line, before anything is read
  if _OUTPUT.value:
    storage.check(_OUTPUT.value, '--output')
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    from spikeformer_jax import checkpointing, compile_cache  # pylint: disable=import-outside-toplevel
    from spikeformer_jax import restore, workdir as workdir_lib  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS['verbosity'].present:  # unreadable checkpoints: one line
      checkpointing.quiet_orbax_logs()
    signal.signal(signal.SIGTERM, _sigterm)  # stopped like Ctrl-C: one line, nothing half-written
    config = _CONFIG.value or workdir_lib.load_run_config(_workdir())
    if _CONFIG.value:
      warning = workdir_lib.model_differences(config, _workdir())
      if warning:
        print(warning, file=sys.stderr)
    out = _OUTPUT.value
    _check_writable(out)
    compile_cache.setup(config, _workdir())  # the run's cache: its eval step may be there
    if _ANALYZE.value:
      return analyze(config)
    res = restore.evaluate_checkpoint(
      config,
      _workdir(),
      split=_SPLIT.value,
      step=_STEP.value,
      num_devices=_DEVICES.value,
      ema=_EMA.value,
    )
    # Only files of its own (eval_*.json, analysis_*/), written whole: the run's
    # files stay its trainer's, which may hold the workdir meanwhile.
    ema = '_ema' if _EMA.value else ''
    out = out or storage.join(_workdir(), f'eval_{res["split"]}{ema}_{res["step"]}.json')
    storage.write_text(out, json.dumps(res, indent=2))  # whole: a kill leaves no half a file
  except KeyboardInterrupt as e:  # other errors: errors.report (cli.run)
    term = 'SIGTERM' in str(e)
    print(
      f'{"stopped (SIGTERM)" if term else "interrupted (SIGINT)"}: nothing written.',
      file=sys.stderr,
    )
    return 143 if term else 130
  print(
    f'eval {res["split"]}{" (EMA)" if _EMA.value else ""} step {res["step"]}: top1 {res["top1"]:.2%} | '
    f'top5 {res["top5"]:.2%} | loss {res["loss"]:.4f} | {res["count"]} examples '
    f'-> {out}'
  )
  return 0


def run():
  """`spikeformer-eval`, `python -m spikeformer_jax.eval`, `python eval.py`."""
  flags.mark_flags_as_required(['workdir'])
  flags.register_validator('step', lambda s: s is None or s >= 0, 'a checkpoint step is >= 0')
  flags.register_validator(
    'num_devices', lambda n: n is None or n >= 1, 'a device count is >= 1 (default: all)'
  )
  flags.register_validator(
    'analyze_examples', lambda n: n >= 1, 'the number of examples analysed must be >= 1.'
  )
  flags.register_validator('attention_block', lambda b: b >= 0, 'must be >= 0')
  flags.register_validator(
    'first_layer_mj',
    lambda e: math.isfinite(e) and e >= 0,
    'a finite energy >= 0 in mJ (0: counted from the MACs)',
  )
  flags.register_validator(
    'attention_heads', lambda h: all(x.isdigit() for x in h), 'expected head indices, e.g. 0,1'
  )
  cli.run(main)  # command-line mistakes: one line, exit status 2


if __name__ == '__main__':
  run()
