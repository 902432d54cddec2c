r"""See inside a spiking transformer: firing rates, operations, SOPs, energy.

`analyze(model, batches)` runs eval-mode forwards over the batches and counts,
per example:
  * every spiking neuron's firing rate, overall and per timestep (the
    `spike_count` that `SpikingNeuron` records);
  * every synaptic layer (each Linear and Conv call): its MACs (from shapes;
    time is folded into the batch, so the count covers all T), its input's
    firing rate (non-zero fraction) and value domain (binary, ternary, integer,
    real: the row's `input`), whether it is a MAC or an AC layer, its SOPs and energy;
  * the attention products of every SpikingAttention (Q K^T, (Q K^T) V or
    K^T V, Q (K^T V), SDSA's masked token sums, MSSA's channel sums), counted
    analytically in the association the model computes, from its shapes and
    the recorded Q/K/V rates (below).
The model's code and classes are not changed: the analysis runs a copy of the
model whose Linear, Conv, neuron and attention modules call a `Recorder`
through explicit hooks (flax's `promote_dtype` / `dot_general` /
`conv_general_dilated`, the project modules' `recorder`), which keeps what
each saw in the order they are called.

Conventions (`Conventions`, each a field):
  * An input in {0, 1} (spikes) or {-1, 0, 1} (ternary spikes) makes an AC
    layer: SOPs = firing rate (non-zero fraction) x MACs, each SOP an
    accumulate (E_AC). A real-valued input (the first, image layer) makes a
    MAC layer: every MAC counts (E_MAC).
  * `integer_inputs`: non-negative integer inputs that are not binary (the
    Spikformer / MSViT residual stream, a sum of spike maps; DVS event
    counts) count as 'mac' (default: Spikingformer's energy tool, Nspks_max=1)
    or 'ac' (each unit of the integer is one accumulate: SOPs = mean|x| x MACs,
    Spikingformer's appendix G "calculation 1").
  * A product of two activations: both binary/ternary -> min of their rates x
    MACs ACs (an AND, then accumulate: Spikingformer's
    T heads N d^2 (fr_q + min(fr_k, fr_v)) for SSA); one spiking operand -> its
    rate x MACs ACs (it selects what the other accumulates: A2OS2A's real K
    with binary Q or ternary V); none -> MACs as MAC. SDSA's K*V token sum
    counts min(fr_k, fr_v) N C ACs and its Q mask none; MSSA's channel sums
    count fr_q N C + fr_p N C ACs and its K mask none.
  * E_MAC = 4.6 pJ and E_AC = 0.9 pJ (45 nm, Horowitz 2014), as Spikformer
    and MSViT state (A2OS2A gives no energy formula).
  * The first layer: its MACs over all T timesteps (the image is fed at every
    step). Spikformer's eq. 22 and MSViT's eq. 18 write its term without T;
    Spikformer's Table 2 adds one constant, 1.596 mJ, to every row (its Power
    = 0.9 pJ x OPs + 1.596 mJ), which is the first conv x T at width 512
    only (1.595 mJ there; 1.197 at 384, 2.393 at 768). `first_layer_mj` > 0 puts such a
    constant (mJ per example) in place of the first layer's E_MAC x MACs;
    `count_head=False` leaves out the classifier head (the last synaptic
    layer), which has no MAC term in either equation (MSViT's eq. 18 has no
    FC term at all; Spikformer's eq. 22 could count it among its FC SOPs):
    both together reproduce Table 2's Power from its OPs.
  * The non-spiking comparison: the same graph with one pass instead of T,
    every operation a MAC (not the papers' ANN, whose softmax attention takes
    another order of Q K^T V: the ANN rows are configs of their own):
    E = E_MAC x (MACs / T) (a head that runs after the mean over time counts
    once).
  * Memory (beyond the papers, whose operation counts leave it out): bytes
    moved per inference, weights read once from DRAM at their stored width,
    every synaptic layer's input read and output written once on chip, spikes
    at 1 bit (ternary 2), other values at the compute width;
    `dram_pj_per_byte` 160 (1.3 nJ per 64-bit DRAM access) and
    `sram_pj_per_byte` 12.5 (100 pJ per 64-bit read of a 1 MB SRAM), Horowitz
    2014, 45 nm. Order-of-magnitude costs, stated so they can be changed.
Softmax, BatchNorm, pooling and the neurons' own updates are not counted
(elementwise, as in the papers).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spikeformer_jax import attention
from spikeformer_jax import blocks
from spikeformer_jax import errors
from spikeformer_jax import layers
from spikeformer_jax import storage

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


@dataclasses.dataclass(frozen=True)
class Conventions:
  integer_inputs: str = 'mac'  # 'mac' or 'ac' (see the module docstring)
  e_mac_pj: float = E_MAC_PJ
  e_ac_pj: float = E_AC_PJ
  dram_pj_per_byte: float = 160.0
  sram_pj_per_byte: float = 12.5
  first_layer_mj: float = 0.0  # > 0: the first layer's energy, mJ per example
  count_head: bool = True  # False: the head (last synaptic layer) costs nothing

  def __post_init__(self):
    if self.integer_inputs not in ('mac', 'ac'):
      raise errors.ConfigError(f"integer_inputs={self.integer_inputs!r}; valid: 'mac', 'ac'.")
    if not (math.isfinite(self.first_layer_mj) and self.first_layer_mj >= 0):
      raise errors.ConfigError(
        f'first_layer_mj={self.first_layer_mj}: a finite energy >= 0 in mJ '
        "per example (0: E_MAC x the first layer's MACs; Spikformer "
        'Table 2: 1.596).'
      )


# --------------------------------------------------------------------------
# Recording: a recorder that the modules of a copy of the model call.
# --------------------------------------------------------------------------


class Recorder:
  """What the recorded modules see while one forward is traced, in call order.

  `tapped(model)` returns a copy of the model (sharing its arrays) whose
  modules call this recorder through explicit attributes: each Linear's and
  Conv's `promote_dtype` (flax's hook that sees the layer's input before any
  cast) and `dot_general` / `conv_general_dilated` (the one that sees its
  output), each SpikingNeuron's and SpikingAttention's `recorder`. The model
  itself, its classes and this module's state are left as they were.
  """

  def __init__(self, T: int):
    self.T = T
    self.batch = 0  # of the forward being traced (time-folded inputs have batch*T rows)
    self.calls: list[tuple[str, dict]] = []  # (module name, what it saw) per call

  def tapped(self, model: nnx.Module) -> nnx.Module:
    """A copy of `model` (sharing its arrays) whose recorded modules call this."""
    view = nnx.merge(*nnx.split(model))
    for path, m in nnx.iter_modules(view):
      name = _name(path)
      if isinstance(m, nnx.Linear):
        tap = _SynapseTap(self, name, m.promote_dtype, m.dot_general)
        m.promote_dtype, m.dot_general = tap.promote_dtype, tap.op
      elif isinstance(m, nnx.Conv):
        tap = _SynapseTap(self, name, m.promote_dtype, m.conv_general_dilated)
        m.promote_dtype, m.conv_general_dilated = tap.promote_dtype, tap.op
      elif isinstance(m, layers.SpikingNeuron):
        m.recorder = _NeuronTap(self, name)
      elif isinstance(m, blocks.SpikingAttention):
        m.recorder = _AttentionTap(self, name)
    return view

  @contextlib.contextmanager
  def tracing(self, batch: int):
    """Around the trace of a forward on `batch` examples; yields the calls it
    records (traced values: return them from the traced function)."""
    self.batch, self.calls = batch, []
    try:
      yield self.calls
    finally:
      self.batch, self.calls = 0, []  # no tracer outlives its trace


@dataclasses.dataclass(frozen=True, eq=False)
class _SynapseTap:
  """A Linear's or Conv's hooks: its input's statistics, then its MACs."""

  recorder: Recorder
  name: str
  layer_promote_dtype: Callable
  layer_op: Callable  # the layer's dot_general / conv_general_dilated

  def promote_dtype(self, args, **kwargs):
    x = args[0]  # the layer's input, as the layer was called with it
    stats = _input_stats(x, self.recorder.batch, self.recorder.T)
    stats.update(in_shape=jnp.asarray(x.shape[1:]), in_itemsize=jnp.asarray(x.dtype.itemsize))
    self.recorder.calls.append((self.name, stats))
    return self.layer_promote_dtype(args, **kwargs)

  def op(self, x, kernel, *args, **kwargs):
    y = self.layer_op(x, kernel, *args, **kwargs)
    name, stats = self.recorder.calls[-1]  # recorded by promote_dtype, just before
    assert name == self.name, (name, self.name)
    dt = layers.count_dtype()
    stats.update(
      macs=jnp.asarray(y.size * math.prod(kernel.shape[:-1]), dt), out_numel=jnp.asarray(y.size, dt)
    )
    return y


@dataclasses.dataclass(frozen=True, eq=False)
class _NeuronTap:
  recorder: Recorder
  name: str

  def __call__(self, spikes, T: int):
    self.recorder.calls.append((self.name, layers.spike_counts(spikes, T)))


@dataclasses.dataclass(frozen=True, eq=False)
class _AttentionTap:
  recorder: Recorder
  name: str

  def __call__(self, x):
    self.recorder.calls.append((self.name, {'tokens': jnp.asarray(x.shape[1:])}))


def _input_stats(x, batch: int, T: int) -> dict:
  """Non-zero count per timestep, sum |x|, numel and the value domain of x."""
  dt = layers.count_dtype()
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  folded = xf.shape[0] == batch * T  # else no time axis (a head after the mean)
  per_t = xf.reshape(xf.shape[0] // T, T, -1) if folded else xf.reshape(xf.shape[0], 1, -1)
  integer = jnp.all(xf == jnp.round(xf))
  return {
    'in_nonzero': jnp.sum(per_t != 0, axis=(0, 2), dtype=dt),
    'in_abs_sum': jnp.sum(jnp.abs(xf)),
    'in_numel': jnp.asarray(x.size, dt),
    'in_binary': jnp.all((xf == 0) | (xf == 1)),
    'in_ternary': jnp.all((xf == 0) | (jnp.abs(xf) == 1)),
    'in_integer': integer & jnp.all(xf >= 0),
  }


# --------------------------------------------------------------------------
# Running and summing.
# --------------------------------------------------------------------------


def _name(path) -> str:
  return '.'.join(map(str, path))


def collect(model: nnx.Module, batches: Iterable, T: int) -> dict:
  """Sums of every recorded quantity over the batches (numpy float64), the
  modules' call order and the number of examples. Sets `model` to eval mode
  and runs a copy of it that records (`Recorder`)."""
  model.eval()
  recorder = Recorder(T)
  graphdef, state = nnx.split(recorder.tapped(model))
  names: list[str] = []  # the recorded calls' modules, in trace (= network) order

  @jax.jit
  def forward(state, x):
    with recorder.tracing(x.shape[0]) as calls:
      nnx.merge(graphdef, state, copy=True)(x)
      names[:] = [name for name, _ in calls]
      return [stats for _, stats in calls]

  sums: dict[tuple[str, str], Any] = {}
  flags: dict[tuple[str, str], bool] = {}
  examples = 0
  for x in batches:
    per_call = jax.device_get(forward(state, jnp.asarray(x)))
    examples += x.shape[0]
    seen: dict[tuple[str, str], list] = {}  # (module, quantity) -> this batch's values, per call
    for name, stats in zip(names, per_call):
      for quantity, v in stats.items():
        seen.setdefault((name, quantity), []).append(np.asarray(v))
    for key, values in seen.items():
      if key[1] in ('in_binary', 'in_ternary', 'in_integer'):
        flags[key] = flags.get(key, True) and all(bool(v) for v in values)
      elif key[1] in ('in_shape', 'tokens', 'in_itemsize'):
        sums[key] = values[0]
      else:
        total = sum(v.astype(np.float64) for v in values)
        sums[key] = sums.get(key, 0.0) + total
  return {'sums': sums, 'flags': flags, 'examples': examples, 'order': list(dict.fromkeys(names))}


def _attention_products(attn: blocks.SpikingAttention, name: str, T: int, tokens, rate):
  """Rows for the activation products of one attention module, per example:
  the products its kind computes (attention.Kind.products), as AC when an
  operand spikes (at the lowest rate of the spiking ones), else MAC.

  `rate(neuron)` is the firing rate of that neuron under `name` (None if absent).
  """
  n, c = (int(v) for v in tokens)
  rows = []
  for label, macs, *operands in attention.get(attn.kind).products(attn, T=T, n=n, c=c, rate=rate):
    spiking = [r for r in operands if r is not None]
    if spiking:
      rows.append((label, macs, 'AC', min(spiking) * macs))
    else:
      rows.append((label, macs, 'MAC', float(macs)))
  return [(f'{name}.{label}', macs, op, sops) for label, macs, op, sops in rows]


def _input_domain(flags: dict, name: str) -> str:
  """The values a layer's input took over every batch: 'binary' {0, 1},
  'ternary' {-1, 0, 1}, 'integer' (non-negative) or 'real' (a row's `input`)."""
  for domain in ('binary', 'ternary', 'integer'):
    if flags[(name, f'in_{domain}')]:
      return domain
  return 'real'


def analyze(
  model: nnx.Module, batches: Iterable, *, T: int, conventions: Conventions = Conventions()
) -> dict:
  """The report (a JSON-able dict) for `model` on `batches` of inputs."""
  cv = conventions
  rec = collect(model, batches, T)
  sums, flags, n_ex = rec['sums'], rec['flags'], max(rec['examples'], 1)
  modules = {_name(p): m for p, m in nnx.iter_modules(model)}

  neurons: dict[str, dict[str, Any]] = {}
  for name in rec['order']:
    if (name, 'spike_count') in sums:
      counts = sums[(name, 'spike_count')]
      per_t_numel = sums[(name, 'numel')] / T
      neurons[name] = {
        'rate': float(counts.sum() / sums[(name, 'numel')]),
        'rate_per_t': [float(c / per_t_numel) for c in counts],
        'units_per_example': int(round(per_t_numel / n_ex)),
      }

  def rate(prefix):
    return lambda neuron: neurons.get(f'{prefix}.{neuron}', {}).get('rate')

  rows, first, pending = [], True, None  # pending: (attention name, its product rows)
  for name in rec['order'] + ['']:
    if pending and not (name.startswith(pending[0] + '.') and not name.endswith('.proj_linear')):
      rows += pending[1]  # the products go after Q/K/V, before the projection
      pending = None
    m = modules.get(name)
    if isinstance(m, blocks.SpikingAttention):
      pending = (
        name,
        [
          {
            'layer': lname,
            'type': 'attention',
            'input': 'activations',
            'macs': macs,
            'op': op,
            'sops': sops if op == 'AC' else 0.0,
            'input_rate': None,
          }
          for lname, macs, op, sops in _attention_products(
            m, name, T, sums[(name, 'tokens')], rate(name)
          )
        ],
      )
      continue
    if (name, 'macs') not in sums:
      continue
    macs = sums[(name, 'macs')] / n_ex
    numel = sums[(name, 'in_numel')]
    fr = float(sums[(name, 'in_nonzero')].sum() / numel)
    domain = _input_domain(flags, name)
    if domain in ('binary', 'ternary'):
      op, sops = 'AC', fr * macs
    elif domain == 'integer' and cv.integer_inputs == 'ac':
      op, sops = 'AC', float(sums[(name, 'in_abs_sum')] / numel) * macs
    else:
      op, sops = 'MAC', 0.0
    rows.append(
      {
        'layer': name,
        'type': type(m).__name__,
        'input': domain,
        'first': first,
        'macs': macs,
        'op': op,
        'sops': sops,
        'input_rate': fr,
        'time_folded': len(sums[(name, 'in_nonzero')]) == T,
        'in_shape': [int(v) for v in sums[(name, 'in_shape')]],
        'in_numel': numel / n_ex,
        'out_numel': sums[(name, 'out_numel')] / n_ex,
        'in_itemsize': int(sums[(name, 'in_itemsize')]),
        'params': int(sum(np.size(v) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))),
      }
    )
    first = False

  synaptic = [r for r in rows if r['type'] != 'attention']
  if synaptic:
    synaptic[-1]['last'] = True  # the classifier head
  energy = energy_mj(rows, cv)
  total_macs = sum(r['macs'] for r in rows)
  # Without spikes the network runs once instead of T times (a head applied
  # after the mean over time already runs once).
  ann_macs = sum(r['macs'] / T if r.get('time_folded', True) else r['macs'] for r in rows)
  mac_ops = sum(r['macs'] for r in rows if r['op'] == 'MAC')
  sops = sum(r['sops'] for r in rows)
  totals = {
    'macs': total_macs,
    'mac_ops': mac_ops,
    'sops': sops,
    'energy_mj': energy,
    'ann_macs': ann_macs,
    'ann_energy_mj': ann_macs * cv.e_mac_pj * 1e-9,
    'mean_firing_rate': (
      sum(v['rate'] * v['units_per_example'] for v in neurons.values())
      / max(sum(v['units_per_example'] for v in neurons.values()), 1)
    ),
  }
  totals['memory'] = _memory(rows, model, cv)
  totals['energy_with_memory_mj'] = energy + totals['memory']['energy_mj']
  return {
    'T': T,
    'examples': rec['examples'],
    'conventions': dataclasses.asdict(cv),
    'neurons': neurons,
    'layers': rows,
    'totals': totals,
  }


def energy_mj(rows: list[dict], cv: Conventions = Conventions()) -> float:
  """Sets each row's `energy_mj` (E_MAC x MACs for a MAC row, E_AC x SOPs for
  an AC row; the row marked `first` at `cv.first_layer_mj` where that is set,
  the row marked `last` at 0 without `cv.count_head`) and returns their sum,
  in mJ per example."""
  for r in rows:
    if r.get('first') and cv.first_layer_mj > 0:
      r['energy_mj'] = cv.first_layer_mj
    elif r.get('last') and not cv.count_head:
      r['energy_mj'] = 0.0
    else:
      r['energy_mj'] = (
        r['macs'] * cv.e_mac_pj if r['op'] == 'MAC' else r['sops'] * cv.e_ac_pj
      ) * 1e-9
  return sum(r['energy_mj'] for r in rows)


def _memory(rows, model, cv) -> dict:
  """Bytes moved per inference and their energy (see the module docstring)."""
  params = nnx.state(model, nnx.Param)
  weight_bytes = sum(np.size(v) * np.dtype(v.dtype).itemsize for v in jax.tree.leaves(params))
  act_bytes = 0.0
  for r in rows:
    if r['type'] == 'attention':
      continue
    bits = {'binary': 1, 'ternary': 2}.get(r['input'], 8 * r['in_itemsize'])
    # Outputs are real-valued (they go to a BatchNorm) at the compute width.
    act_bytes += r['in_numel'] * bits / 8 + r['out_numel'] * r['in_itemsize']
  energy = (weight_bytes * cv.dram_pj_per_byte + act_bytes * cv.sram_pj_per_byte) * 1e-9
  return {'weight_bytes': int(weight_bytes), 'activation_bytes': act_bytes, 'energy_mj': energy}


# --------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------


def _g(x: float) -> str:
  return f'{x / 1e9:.4f}G' if x >= 1e7 else f'{x / 1e6:.4f}M'


def format_table(report: dict) -> str:
  """A readable per-layer table and the totals (markdown)."""
  lines = [
    '| layer | input | rate | op | MACs | SOPs | energy (mJ) |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in report['layers']:
    rate = '' if r['input_rate'] is None else f'{r["input_rate"]:.4f}'
    lines.append(
      f'| {r["layer"]} | {r["input"]} | {rate} | {r["op"]} | {_g(r["macs"])} | '
      f'{_g(r["sops"])} | {r["energy_mj"]:.5f} |'
    )
  t, cv = report['totals'], report['conventions']
  extra = (f', first layer {cv["first_layer_mj"]} mJ' if cv.get('first_layer_mj') else '') + (
    ', head not counted' if not cv.get('count_head', True) else ''
  )
  lines += [
    '',
    f'T={report["T"]}, {report["examples"]} examples, per example: '
    f'{_g(t["macs"])} MACs (dense), {_g(t["mac_ops"])} of them in MAC layers, '
    f'{_g(t["sops"])} SOPs; energy {t["energy_mj"]:.4f} mJ '
    f'(E_MAC {cv["e_mac_pj"]} pJ, E_AC {cv["e_ac_pj"]} pJ{extra}); the same network '
    'without spikes '
    f'(one pass, all MAC): {_g(t["ann_macs"])} MACs, {t["ann_energy_mj"]:.4f} mJ; '
    f'with memory traffic ({t["memory"]["weight_bytes"] / 2**20:.1f} MiB weights, '
    f'{t["memory"]["activation_bytes"] / 2**20:.2f} MiB activations): '
    f'{t["energy_with_memory_mj"]:.4f} mJ; mean firing rate '
    f'{t["mean_firing_rate"]:.4f}.',
  ]
  lines += [
    '',
    '| neuron | rate | ' + ' | '.join(f't{i}' for i in range(report['T'])) + ' |',
    '|---|---|' + '---|' * report['T'],
  ]
  for name, v in report['neurons'].items():
    lines.append(
      f'| {name} | {v["rate"]:.4f} | ' + ' | '.join(f'{r:.4f}' for r in v['rate_per_t']) + ' |'
    )
  return '\n'.join(lines) + '\n'


def write(report: dict, directory: str) -> dict:
  """analysis.json, layers.csv, neurons.csv and analysis.md in `directory`
  (local or gs://)."""
  storage.makedirs(directory)
  paths = {
    k: storage.join(directory, f)
    for k, f in (
      ('json', 'analysis.json'),
      ('layers', 'layers.csv'),
      ('neurons', 'neurons.csv'),
      ('table', 'analysis.md'),
    )
  }
  with storage.open_file(paths['json'], 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  cols = ['layer', 'type', 'input', 'input_rate', 'op', 'macs', 'sops', 'energy_mj']
  with storage.open_file(paths['layers'], 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in report['layers']:
      w.writerow([r.get(c) for c in cols])
  with storage.open_file(paths['neurons'], 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['neuron', 'rate'] + [f't{i}' for i in range(report['T'])])
    for name, v in report['neurons'].items():
      w.writerow([name, v['rate'], *v['rate_per_t']])
  with storage.open_file(paths['table'], 'w', encoding='utf-8') as f:
    f.write(format_table(report))
  return paths


# --------------------------------------------------------------------------
# A trained checkpoint, end to end (eval.py --analyze).
# --------------------------------------------------------------------------


def analyze_checkpoint(
  config,
  workdir: str,
  *,
  split: str = 'test',
  step: int | None = None,
  examples: int = 256,
  conventions: Conventions = Conventions(),
  out_dir: str | None = None,
  attention_block: int = 0,
  attention_heads: tuple = (0,),
) -> tuple[dict, dict]:
  """Analyses `examples` examples of `split` with a checkpoint of `workdir` and
  writes the tables and pictures to `out_dir` (default
  WORKDIR/analysis_SPLIT_STEP). Returns (report, {output: path})."""
  from spikeformer_jax import data as data_lib, plots, restore, validation  # pylint: disable=import-outside-toplevel

  if examples < 1:
    raise errors.ConfigError(f'examples={examples} must be >= 1.')
  source = data_lib.get_source(config.data, split)
  validation.validate_config(config)
  validation.validate_split(config, source, split)
  model, step = restore.restore_model(config, workdir, step)
  n = min(examples, len(source))
  batch = min(config.eval_batch_size, n)
  batches: list = []  # the first n examples (the last batch smaller: no padding)
  transform = data_lib.make_transform(config.data, source, train=False)
  for b in data_lib.eval_batches(source, global_batch=batch, transform=transform):
    batches.append(b['image'][b['mask']][: n - batch * len(batches)])
    if batch * len(batches) >= n:
      break
  out_dir = out_dir or storage.join(workdir, f'analysis_{split}_{step}')
  # Written aside and moved in at the end: a kill (SIGTERM) or a failure
  # leaves nothing of this analysis in out_dir. On gs:// the aside is a local
  # temporary directory, uploaded file by file at the end.
  remote = storage.is_remote(out_dir)
  if remote:
    tmp = tempfile.mkdtemp(prefix='spikeformer-analysis-')
  else:
    parent, name = os.path.split(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{name}.partial-')
  try:
    # The attention picture first: out-of-range heads / block fail before the analysis.
    plots.attention_maps(
      model,
      batches[0][:1],
      os.path.join(tmp, 'attention.png'),
      block=attention_block,
      heads=tuple(attention_heads),
    )
    report = analyze(model, batches, T=config.model.T, conventions=conventions)
    report.update(workdir=workdir, split=split, step=step, model=config.get('name', ''))
    paths = write(report, tmp)
    paths['attention'] = os.path.join(tmp, 'attention.png')
    title = f'{config.get("name", "")} step {step}, {split} ({report["examples"]} examples)'
    paths['firing_rates'] = plots.firing_rate_figure(
      {k: v['rate_per_t'] for k, v in report['neurons'].items()},
      os.path.join(tmp, 'firing_rates.png'),
      title=title,
    )
    metrics = storage.join(workdir, 'metrics.jsonl')
    if storage.exists(metrics):
      paths['learning_curves'] = plots.learning_curves(
        metrics, os.path.join(tmp, 'learning_curves.png')
      )
    storage.makedirs(out_dir)
    for key, path in paths.items():
      paths[key] = storage.join(out_dir, os.path.basename(path))
      if remote:
        storage.write_bytes(paths[key], storage.read_bytes(path))
      else:
        os.replace(path, paths[key])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return report, paths
