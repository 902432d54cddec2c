r"""Checks our models, and our training, against recordings of the official
PyTorch code.

    python -m spikeformer_jax.fidelity FILE.npz [FILE.npz ...] [--json OUT.json]
        [--kernels=pallas]

Each FILE is either
* a one-step fixture (shared/fixtures/README.md): an official state_dict, an
  input batch and the official logits (eval and train mode), loss, gradients,
  BatchNorm statistics after the step and spike counts. The model is built from
  the file's own `config` (any size, depth, T or class count), run in float64,
  and compared at the README's tolerances; or
* a training trajectory (shared/fixtures/trajectory/README.md): a short run of
  an official recipe, replayed by `replay.py` through our own train step, with
  the optimizer, schedule, loss and EMA built from the official arguments the
  file stores, and compared after every iteration.

Prints the largest relative errors (and for a one-step fixture whether every
layer's spike count matches). A file that cannot be read or checked
(truncated, not an npz, not a recording) gets one line and the other files are
still checked; exits 1 if any file did not match. `--kernels=pallas` replays
every file with the fused Pallas kernels (model.kernels; interpret mode on
CPU), at the same tolerances.
"""

from __future__ import annotations

import functools
import json
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from spikeformer_jax import cli
from spikeformer_jax import convert
from spikeformer_jax import errors
from spikeformer_jax import recordings
from spikeformer_jax import replay
from spikeformer_jax import storage
from spikeformer_jax.recordings import BadRecording, model_config_from_fixture, rel_error

# Pass criteria of the fixtures' README, section 5 (float64 port).
TOL_OUTPUT = 1e-9  # logits and loss, relative to max|ref|
TOL_GRAD = 1e-9  # per-parameter gradient, relative to max|ref_p|
TOL_ZERO_GRAD = 1e-12  # zero-gradient parameters, relative to the global max
TOL_BN = 1e-12  # running statistics, relative to max|ref|
TOL_RATE = 1e-12  # spike rates (identical spike counts)


def _spike_counts(inter: nnx.State) -> dict[str, tuple[int, int]]:
  """Intermediates -> {'block.0.attn.q_lif': (nonzero, numel)}, over all calls and T."""
  totals: dict[str, dict[str, int]] = {'spike_count': {}, 'numel': {}}
  for path, var in nnx.to_flat_state(inter):
    name = '.'.join(map(str, path[:-1]))
    acc = totals[str(path[-1])]
    acc[name] = acc.get(name, 0) + sum(int(np.asarray(v).sum()) for v in var.get_value())
  return {n: (c, totals['numel'][n]) for n, c in totals['spike_count'].items()}


# The graph is static: recordings of one architecture share the compiled code.
@functools.partial(jax.jit, static_argnums=0)
def _eval_fwd(graph, params, rest, x):
  m = nnx.merge(graph, params, rest, copy=True)
  return nnx.capture(m, nnx.Intermediate)(x)


@functools.partial(jax.jit, static_argnums=0)
def _train_fwd_bwd(graph, params, rest, x, labels):
  def loss_fn(p):
    m = nnx.merge(graph, p, rest, copy=True)
    logits, inter = nnx.capture(m, nnx.Intermediate)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, inter, nnx.state(m, nnx.BatchStat))

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def check_file(path: str, kernels: str = 'auto') -> dict:
  """Checks one recording of either kind, with `kernels` as model.kernels
  ('pallas': the fused kernels, in interpret mode on CPU); a report dict with
  'ok' and the worst errors."""
  d, cfg = recordings.read_recording(path)
  if recordings.kind_of(d) == 'trajectory':
    return replay.check_trajectory(d, cfg, os.path.basename(path), kernels=kernels)
  mc = model_config_from_fixture(cfg)
  mc.kernels = kernels
  model, entries = recordings.model_holding(mc, recordings.state_dict(d))
  x = jnp.asarray(recordings.to_nhwc(d['input']))
  labels = jnp.asarray(d['labels'])
  model.set_attributes(record_spikes=True)

  model.eval()
  g_eval, params, rest = nnx.graphdef(model), *nnx.state(model, nnx.Param, ...)
  model.train()
  g_train = nnx.graphdef(model)

  logits_eval, inter_eval = _eval_fwd(g_eval, params, rest, x)
  (loss, (logits_train, inter_train, bn_after)), grads = _train_fwd_bwd(
    g_train, params, rest, x, labels
  )

  report = {'file': os.path.basename(path), 'family': cfg['family'], 'checks': {}}
  checks = report['checks']

  def add(name, err, tol):
    checks[name] = {'error': err, 'tol': tol, 'ok': bool(err <= tol)}

  for name, ours in (('logits_eval', logits_eval), ('logits_train', logits_train), ('loss', loss)):
    ref = d[name]
    add(name, rel_error(ours, ref, max(np.max(np.abs(ref)), 1e-300)), TOL_OUTPUT)

  # Gradients, compared in PyTorch layout.
  flat_grads = {p: v.get_value() for p, v in nnx.to_flat_state(grads)}
  torch_grads = convert.to_torch_layout(entries, flat_grads)
  zero_grad = set(cfg.get('params_without_grad', [])) | set(
    cfg.get('params_with_numerically_zero_grad', [])
  )
  gmax = cfg['grad_global_max_abs']
  worst, worst_zero = (0.0, ''), (0.0, '')
  for key in (k[len('grad/') :] for k in d if k.startswith('grad/')):
    ref = d['grad/' + key]
    if key not in torch_grads:
      add(f'grad/{key} (missing)', float('inf'), 0.0)
      continue
    if key in zero_grad:
      err = rel_error(torch_grads[key], ref, gmax)
      worst_zero = max(worst_zero, (err, key))
    else:
      err = rel_error(torch_grads[key], ref, max(np.max(np.abs(ref)), 1e-300))
      worst = max(worst, (err, key))
  add(f'grad (worst: {worst[1]})', worst[0], TOL_GRAD)
  add(f'grad, zero-gradient params (worst: {worst_zero[1]})', worst_zero[0], TOL_ZERO_GRAD)

  # BatchNorm statistics after the train-mode forward.
  flat_bn = {p: v.get_value() for p, v in nnx.to_flat_state(bn_after)}
  torch_bn = convert.to_torch_layout(entries, flat_bn)
  worst_bn, count_ok = (0.0, ''), True
  for key in (k[len('state_after/') :] for k in d if k.startswith('state_after/')):
    ref = d['state_after/' + key]
    if key.endswith('num_batches_tracked'):
      count_ok &= int(torch_bn[key]) == int(ref)
      continue
    worst_bn = max(worst_bn, (rel_error(torch_bn[key], ref, max(np.max(np.abs(ref)), 1e-300)), key))
  add(f'bn running stats (worst: {worst_bn[1]})', worst_bn[0], TOL_BN)
  add('bn num_batches_tracked', 0.0 if count_ok else 1.0, 0.0)

  # Spikes: exact counts per layer (train), rates (eval).
  counts = _spike_counts(inter_train)
  ref_counts = cfg['spike_counts_train']
  mismatched = []
  for name, ref in ref_counts.items():
    ours = counts.get(name)
    if ours is None or ours != (int(ref['nonzero']), int(ref['numel'])):
      mismatched.append(f'{name}: ours {ours} vs official ({ref["nonzero"]}, {ref["numel"]})')
  extra = sorted(set(counts) - set(ref_counts))
  mismatched += [f'{n}: fires here but not in the official forward' for n in extra]
  checks['spike counts (train)'] = {
    'error': len(mismatched),
    'tol': 0,
    'ok': not mismatched,
    'layers': len(ref_counts),
    'mismatched': mismatched,
  }
  counts_eval = _spike_counts(inter_eval)
  worst_rate = 0.0
  for key in (k for k in d if k.startswith('spike_rate_eval/')):
    name = key[len('spike_rate_eval/') :]
    if name not in counts_eval:  # a neuron we never ran is a mismatch, not rate 0
      worst_rate = float('inf')
      continue
    nz, numel = counts_eval[name]
    worst_rate = max(worst_rate, abs(nz / numel - float(d[key])))
  add('spike rates (eval)', worst_rate, TOL_RATE)
  report['ok'] = all(c['ok'] for c in checks.values())
  return report


def format_report(r: dict) -> str:
  if r.get('kind') == 'trajectory':
    return replay.format_report(r)
  lines = [f"{r['file']} ({r['family']}): {'MATCH' if r['ok'] else 'MISMATCH'}"]
  for name, c in r['checks'].items():
    status = 'ok ' if c['ok'] else 'BAD'
    if name.startswith('spike counts'):
      lines.append(
        f"  {status} {name}: {c['layers'] - len(c['mismatched'])}/{c['layers']} layers identical"
      )
      lines += [f'        {m}' for m in c['mismatched'][:10]]
    else:
      lines.append(f"  {status} {name}: max rel. error {c['error']:.2e} (tol {c['tol']:.0e})")
  return '\n'.join(lines)


def _unwritable(path: str) -> str:
  """Why `path` cannot be written ('' if it can). On gs:// a probe object is
  written and deleted (a directory there is only a name prefix)."""
  import tempfile  # pylint: disable=import-outside-toplevel

  if storage.isdir(path):
    return 'it is a directory'
  if storage.is_remote(path):
    probe = storage.join(storage.dirname(path), f'.fidelity-write-check-{os.getpid()}')
    try:
      storage.write_bytes(probe, b'')
      storage.remove(probe)
    except OSError as e:
      return f'{storage.dirname(path)}: {errors.one_line(e)}'
    return ''
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    return f'no such directory {directory}'
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix='.fidelity-write-check-'):
      pass
  except OSError as e:
    return f'{directory}: {e.strerror}'
  return ''


_JSON = flags.DEFINE_string('json', None, 'Also write the reports to this JSON file.')
_KERNELS = flags.DEFINE_enum(
  'kernels',
  'auto',
  ['auto', 'xla', 'pallas'],
  "model.kernels of every replay: 'pallas' runs the fused Pallas kernels "
  "(interpret mode on CPU); 'auto' is xla on CPU.",
)


def main(argv: list[str]) -> int:
  """Checks the files `argv[1:]` (absl's main: argv[0] is the program); the exit status."""
  files = argv[1:]
  if not files:
    cli.exit_usage(
      'give one or more recording files: python -m spikeformer_jax.fidelity '
      'FILE.npz [FILE.npz ...] [--json OUT.json].'
    )
  if _JSON.value:  # before the replays, which take minutes
    try:  # s3:// and the like: one line
      storage.check(_JSON.value, '--json')
    except errors.ConfigError as e:
      cli.exit_usage(errors.one_line(e))
    problem = _unwritable(_JSON.value)
    if problem:
      cli.exit_usage(f'cannot write --json {_JSON.value}: {problem}; pass another path.')
  jax.config.update('jax_enable_x64', True)  # before any array is made
  reports = []
  for f in files:
    # One line for a file that cannot be checked, then on to the next file:
    # a bad download must not hide how the other recordings compare.
    try:
      r = check_file(f, _KERNELS.value)
    except BadRecording as e:
      r = {'file': os.path.basename(f), 'ok': False, 'error': str(e)}
    except Exception as e:  # pylint: disable=broad-except  # unsupported, or our bug
      if cli.TRACEBACK.value or not isinstance(e, errors.USER_ERRORS):
        traceback.print_exc()  # a bug: where it happened
      r = {
        'file': os.path.basename(f),
        'ok': False,
        'error': f'{recordings.error_kind(e)}: {errors.one_line(e)}',
        'traceback': traceback.format_exc(),
      }  # for --json readers
    if 'error' in r:
      print(f"{f}: ERROR {r['error']}")
    else:
      print(format_report(r))
    reports.append(r)
  bad = sum('error' in r for r in reports)
  print(
    f"{sum(r['ok'] for r in reports)}/{len(reports)} fixture files match"
    + (f'; {bad} could not be checked.' if bad else '.')
  )
  if _JSON.value:
    try:
      with storage.open_file(_JSON.value, 'w') as fh:
        json.dump(reports, fh, indent=1, default=str)
    except OSError as e:
      raise OSError(f'cannot write --json {_JSON.value}: {errors.one_line(e)}') from e
  return 0 if all(r['ok'] for r in reports) else 1


def run():
  """`python -m spikeformer_jax.fidelity`: command-line mistakes are one line
  and exit status 2; errors go through errors.report."""
  cli.run(main, config_names=())


if __name__ == '__main__':
  run()
