"""Firing rates from `analysis.analyze` on official recordings (float64).

  JAX_ENABLE_X64=1 python tests/analysis_fixture_check.py FIXTURE.npz ... --json OUT

For each fixture: builds the model its config describes, loads the official
weights, analyses the recorded input in eval mode and writes, per file, the
worst |our rate - official rate| over the recorded `spike_rate_eval/*` layers,
the layers on one side only, and whether the logits equal those of the plain
(unrecorded) model. Run by tests/test_analysis.py (a subprocess: 64-bit JAX).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spikeformer_jax import analysis, recordings


def check(path: str) -> dict:
  d = np.load(path, allow_pickle=False)
  cfg = json.loads(str(d['config']))
  mc = recordings.model_config_from_fixture(cfg)
  model, _ = recordings.model_holding(mc, recordings.state_dict(dict(d)))
  x = recordings.to_nhwc(d['input'])
  model.eval()
  forward = nnx.jit(lambda m, x: m(x))  # retraced if analyze left the graph changed
  plain = np.asarray(forward(model, jnp.asarray(x)))
  report = analysis.analyze(model, [x], T=mc.T)
  after = np.asarray(forward(model, jnp.asarray(x)))  # the model is unchanged: same function
  ref = {
    k[len('spike_rate_eval/') :]: float(d[k]) for k in d.files if k.startswith('spike_rate_eval/')
  }
  ours = {k: v['rate'] for k, v in report['neurons'].items()}
  both = sorted(set(ref) & set(ours))
  return {
    'file': path.rsplit('/', 1)[-1],
    'layers': len(ref),
    'worst': max((abs(ours[k] - ref[k]) for k in both), default=float('inf')),
    'only_official': sorted(set(ref) - set(ours)),
    'only_ours': sorted(set(ours) - set(ref)),
    'logits_unchanged': bool(np.array_equal(plain, after)),
    'macs': report['totals']['macs'],
  }


def main(argv):
  assert jax.config.jax_enable_x64, 'run with JAX_ENABLE_X64=1'
  out = argv[argv.index('--json') + 1]
  files = [a for a in argv if a.endswith('.npz')]
  with open(out, 'w', encoding='utf-8') as f:
    json.dump([check(p) for p in files], f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1:])
