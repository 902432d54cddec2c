"""Parameter paths of every config variant: the record that refactors keep.

`python tests/param_paths.py` rewrites tests/param_paths.json (only when a
change of the parameter tree is intended: checkpoints of older runs restore
only into the same paths). `python tests/param_paths.py --new` adds the
variants the record lacks and leaves every recorded one as it is (a new
variant changes no old tree). test_param_paths.py asserts it.
"""

import hashlib
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
JSON = os.path.join(ROOT, 'tests', 'param_paths.json')
MODULES = ('spikformer', 'sdt', 'a2os2a', 'msvit')


def variants():
  import importlib  # pylint: disable=import-outside-toplevel

  for name in MODULES:
    module = importlib.import_module(f'spikeformer_jax.configs.{name}')
    vs = getattr(module, 'VARIANTS', None) or list(module._ROWS) + ['digits', 'nmnist-1-128']  # pylint: disable=protected-access
    for v in vs:
      yield f'{name}:{v}', module.get_config(v).model


def record(model_cfg) -> dict:
  """{'params': count, 'sha256': of the sorted 'path shape' lines, 'paths':
  the path templates with block / stage indices as '*'}."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from spikeformer_jax import models  # pylint: disable=import-outside-toplevel

  model = nnx.eval_shape(lambda: models.build_model(model_cfg))
  lines = sorted(
    f'{".".join(map(str, p))} {tuple(v.shape)}'
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  )
  templates = sorted({re.sub(r'\.\d+\.', '.*.', line.split()[0]) for line in lines})
  return {
    'params': models.count_params(model),
    'sha256': hashlib.sha256('\n'.join(lines).encode()).hexdigest(),
    'paths': templates,
  }


def compact(records: dict) -> dict:
  """Variants share path templates: store each list once, by its hash."""
  tables, out = {}, {}
  for key, r in records.items():
    tid = hashlib.sha256('\n'.join(r['paths']).encode()).hexdigest()[:12]
    tables[tid] = r['paths']
    out[key] = {'params': r['params'], 'sha256': r['sha256'], 'paths': tid}
  return {'variants': out, 'templates': tables}


def add_new(old: dict, configs: dict) -> dict:
  """`old` (the JSON's content) plus the records of `configs` it lacks."""
  new = compact({key: record(cfg) for key, cfg in configs.items() if key not in old['variants']})
  return {
    'variants': {**old['variants'], **new['variants']},
    'templates': {**old['templates'], **new['templates']},
  }


if __name__ == '__main__':
  if '--new' in sys.argv[1:]:
    with open(JSON, encoding='utf-8') as f:
      recorded = json.load(f)
    out = add_new(recorded, dict(variants()))
    print(f'added {sorted(set(out["variants"]) - set(recorded["variants"]))}')
  else:
    out = compact({key: record(cfg) for key, cfg in variants()})
  with open(JSON, 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=1, sort_keys=True)
  print(f'{len(out["variants"])} variants -> {JSON}')
