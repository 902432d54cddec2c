"""Figures as PNG files: firing rates per layer and timestep (Spikformer's
Fig. 4), learning curves of a run's metrics.jsonl, and attention maps
(Spikformer's Fig. 3).

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing
depends on (or changes) the session's backend and no figure stays open.
"""

from __future__ import annotations

import io
import json
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from spikeformer_jax import attention
from spikeformer_jax import blocks
from spikeformer_jax import errors
from spikeformer_jax import extras
from spikeformer_jax import norm
from spikeformer_jax import storage

try:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
except ModuleNotFoundError as e:
  raise extras.missing(
    e, module='matplotlib', extra='plots', package='matplotlib', needed_for='drawing figures'
  ) from e

DPI = 120


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  """Writes `fig` to `path` (on gs:// drawn in memory, then uploaded whole)."""
  if storage.is_remote(path):
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format='png')
    storage.write_bytes(path, buf.getvalue())
    return path
  storage.makedirs(storage.dirname(storage.abspath(path)))
  fig.savefig(path, dpi=DPI, format='png')
  return path


# --------------------------------------------------------------------------
# Firing rates.
# --------------------------------------------------------------------------


def firing_rate_figure(rates: dict[str, list[float]], path: str, title: str = '') -> str:
  """Spikformer's Fig. 4: a heatmap of the firing rate of each spiking layer
  (rows, network order from the top) at each timestep (columns), and beside
  it the layer's mean rate over timesteps as a bar. rates: {layer: T rates}.
  Returns `path`."""
  if not rates:
    raise ValueError('firing_rate_figure: `rates` has no layers.')
  if len({len(v) for v in rates.values()}) != 1 or not len(next(iter(rates.values()))):
    raise ValueError(
      'firing_rate_figure: every layer needs the same number (> 0) of '
      f'timesteps; got {sorted({len(v) for v in rates.values()})}.'
    )
  names = list(rates)
  r = np.asarray([rates[n] for n in names], np.float64)  # [layers, T]
  n, T = r.shape
  # ~0.16 in a row keeps 7 pt labels readable from 20 to 80+ layers.
  height = max(3.0, 1.6 + 0.16 * n)
  heat_w = max(2.0, 0.45 * T)
  fig = _figure(heat_w + 4.5, height)
  ax, bar_ax = fig.subplots(1, 2, sharey=True, width_ratios=(heat_w, 2.2))
  im = ax.imshow(
    r, aspect='auto', cmap='viridis', vmin=0.0, vmax=max(r.max(), 1e-6), interpolation='nearest'
  )
  ax.set_yticks(range(n), names, fontsize=7)
  ax.set_xticks(range(T), [str(t) for t in range(T)], fontsize=7)
  ax.set_xlabel('timestep')
  # A thin bar on top: a side colour bar would be as tall as the figure.
  fig.colorbar(
    im,
    ax=ax,
    location='top',
    label='firing rate',
    fraction=0.35 / height,
    pad=0.1 / height,
    aspect=15,
  )
  mean = r.mean(axis=1)
  bar_ax.barh(range(n), mean, height=0.8, color='tab:blue')
  bar_ax.axvline(mean.mean(), color='k', ls='--', lw=0.8)
  bar_ax.set_xlim(0, max(mean.max() * 1.1, 1e-6))
  bar_ax.set_xlabel(f'mean rate (dashed: all layers, {mean.mean():.3f})')
  bar_ax.tick_params(labelleft=False, labelsize=7)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


# --------------------------------------------------------------------------
# Learning curves.
# --------------------------------------------------------------------------


def read_metrics(metrics_jsonl: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{key: (steps, values)} of every numeric key of a metrics.jsonl, steps
  ascending. A step written more than once (a resumed run) keeps the last
  value of each key; train and test lines of one step merge."""
  if not storage.isfile(metrics_jsonl):
    raise FileNotFoundError(f'{metrics_jsonl}: no such metrics file.')
  with storage.open_file(metrics_jsonl, encoding='utf-8') as f:
    lines = f.read().split('\n')
  series: dict[str, dict[int, float]] = {}
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines):  # a live run's half-written last line
        continue
      raise errors.DataError(f'{metrics_jsonl}:{i}: not a JSON line ({e}).') from e
    if not isinstance(row, dict) or 'step' not in row:
      raise errors.DataError(f'{metrics_jsonl}:{i}: expected a JSON object with a "step".')
    for k, v in row.items():
      if k not in ('step', 'time') and isinstance(v, (int, float)) and not isinstance(v, bool):
        series.setdefault(k, {})[int(row['step'])] = float(v)
  if not series:
    raise errors.DataError(f'{metrics_jsonl}: no metrics (no line with a step and a value).')
  out = {}
  for k, by_step in series.items():
    steps = np.asarray(sorted(by_step))
    out[k] = steps, np.asarray([by_step[s] for s in steps])
  return out


def learning_curves(metrics_jsonl: str, path: str) -> str:
  """Loss and top-1 (train and test) against step in two panels, the
  learning rate in a small third one, from a run's metrics.jsonl (see
  metrics.MetricWriter). Test curves are drawn once a test entry exists.
  Returns `path`."""
  m = read_metrics(metrics_jsonl)
  panels = [('loss', ('train_loss', 'test_loss')), ('top-1', ('train_top1', 'test_top1'))]
  lr_key = next((k for k in ('train_lr', 'lr') if k in m), None)
  if not any(k in m for _, keys in panels for k in keys):
    raise errors.DataError(
      f'{metrics_jsonl}: no train/test loss or top-1 to plot (keys: {sorted(m)}).'
    )
  ratios = (3, 3) + ((1.2,) if lr_key else ())
  fig = _figure(7, sum(ratios) + 0.8)
  axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)
  for ax, (label, keys) in zip(axes, panels):
    for key in keys:
      if key in m:
        steps, values = m[key]
        test = key.startswith('test_')  # sparse evaluations: markers
        ax.plot(
          steps,
          values,
          'o-' if test else '-',
          ms=3,
          lw=1.2,
          label=f'{key.split("_")[0]} ({values[-1]:.4g} at {steps[-1]})',
        )
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if lr_key:
    steps, values = m[lr_key]
    axes[-1].plot(steps, values, color='tab:gray', lw=1.2)
    axes[-1].set_ylabel('lr')
    axes[-1].ticklabel_format(axis='y', style='sci', scilimits=(-2, 3))
    axes[-1].grid(alpha=0.3)
  axes[-1].set_xlabel('step')
  run = storage.basename(storage.dirname(storage.abspath(metrics_jsonl)))
  fig.suptitle(run)
  return _save(fig, path)


# --------------------------------------------------------------------------
# Attention maps.
# --------------------------------------------------------------------------

# One compiled forward per model structure and input shape.
_capture = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x))


def _natural_key(name: str) -> list:
  # 'block.10' after 'block.9', 'stage2' after 'stage1'; int/str alternate
  # in the same positions, so the lists compare.
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def attention_modules(model: nnx.Module) -> list[tuple[str, blocks.SpikingAttention]]:
  """('block.0.attn', module) for every SpikingAttention of `model`, in
  network order: paths in natural order (block.2 < block.10, stage1 <
  stage2), the order in which all three families run their blocks."""
  found = [
    ('.'.join(map(str, p)), m)
    for p, m in nnx.iter_modules(model)
    if isinstance(m, blocks.SpikingAttention)
  ]
  return sorted(found, key=lambda nm: _natural_key(nm[0]))


def _input_panels(x: np.ndarray, T: int) -> dict[int, tuple[np.ndarray, str | None]]:
  """{timestep: (image, cmap)} to show of one example: an image [H, W, C]
  (C 1 or 3) at t = 0, event frames [T, H, W, 2] as the polarity sum per t."""

  def unit(a):  # inputs are normalised: stretch to [0, 1] for display
    return (a - a.min()) / max(float(a.max() - a.min()), 1e-12)

  if x.ndim == 3 and x.shape[-1] in (1, 3):
    return {0: (unit(x[..., 0]), 'gray') if x.shape[-1] == 1 else (unit(x), None)}
  if x.ndim == 4 and x.shape[0] == T:
    return {t: (x[t].sum(-1), 'gray') for t in range(T)}
  return {}


def attention_maps(
  model: nnx.Module, x, path: str, *, block: int = 0, heads=(0,), timesteps=None, example: int = 0
) -> str:
  """Spikformer's Fig. 3: the attention map of one block, per timestep (rows)
  and head (columns), for example `example` of the batch `x`.

  `model` (from models.build_model, in eval mode) runs once on `x` with its
  attention recording on (SpikingAttention.record_attention; restored after).
  `block` indexes attention_modules(model) (network order, over all stages of
  MSViT). Maps are N x N, or a per-token / per-channel gate for mssa / sdsa.
  A first column shows the input: the image, or the polarity sum of each
  timestep's event frame. Returns `path`.
  """
  if any(
    not m.use_running_average for _, m in nnx.iter_modules(model) if isinstance(m, norm.BatchNorm)
  ):
    raise ValueError(
      'attention_maps needs an eval-mode model (call model.eval()): a '
      'train-mode forward normalises by the batch and updates BatchNorm.'
    )
  mods = attention_modules(model)
  if not -len(mods) <= block < len(mods):
    raise IndexError(
      f'block={block}: the model has {len(mods)} attention modules ({[n for n, _ in mods]}).'
    )
  name, attn = mods[block]
  before = attn.record_attention
  attn.record_attention = True  # this module only: the others need not sow
  try:
    _, inter = _capture(model, jnp.asarray(x))
  finally:
    attn.record_attention = before
  sown = {'.'.join(map(str, p)): v for p, v in nnx.to_flat_state(inter)}
  (amap,) = sown[f'{name}.attention_map'].get_value()  # one call per forward
  amap = np.asarray(jnp.asarray(amap, jnp.float32))  # [B*T, heads, rows, cols]
  batch = x.shape[0]
  T, n_heads = amap.shape[0] // batch, amap.shape[1]
  ts = list(range(T)) if timesteps is None else list(timesteps)
  heads = list(heads)
  if not 0 <= example < batch:
    raise IndexError(f'example={example} of a batch of {batch}.')
  if any(not 0 <= t < T for t in ts) or any(not 0 <= h < n_heads for h in heads):
    raise IndexError(f'timesteps {ts} / heads {heads}: the model has T={T}, {n_heads} heads.')
  maps = amap[example * T + np.asarray(ts)][:, heads]  # [len(ts), len(heads), rows, cols]
  inputs = _input_panels(np.asarray(x[example], np.float32), T)

  rows, cols = maps.shape[-2:]
  kind = attention.get(attn.kind)
  ylabel, xlabel, square = kind.map_axes(rows, cols)
  n_in = 1 if inputs else 0
  fig = _figure(2.0 * (len(heads) + n_in) + 1.0, 1.9 * len(ts) + 0.7)
  grid = np.asarray(fig.subplots(len(ts), len(heads) + n_in, squeeze=False))
  vmin, vmax = float(maps.min()), float(maps.max())
  for i, t in enumerate(ts):
    if n_in:
      ax = grid[i, 0]
      ax.set_axis_off()
      if t in inputs:
        img, cmap = inputs[t]
        ax.imshow(img, cmap=cmap)
        ax.set_title('input' if x.ndim == 4 else f'events, t = {t}', fontsize=8)
    for j, h in enumerate(heads):
      ax = grid[i, n_in + j]
      im = ax.imshow(
        maps[i, j],
        cmap='viridis',
        vmin=vmin,
        vmax=max(vmax, vmin + 1e-6),
        aspect='equal' if square else 'auto',
        interpolation='nearest',
      )
      ax.tick_params(labelsize=6)
      if rows == 1:
        ax.set_yticks([])
      if cols == 1:
        ax.set_xticks([])
      if i == 0:
        ax.set_title(f'head {h}', fontsize=9)
      if j == 0:
        ax.set_ylabel(f't = {t}\n{ylabel}'.rstrip(), fontsize=8)
      if i == len(ts) - 1:
        ax.set_xlabel(xlabel, fontsize=8)
  fig.colorbar(im, ax=grid[:, n_in:].ravel().tolist(), shrink=0.8)
  fig.suptitle(
    f'{attn.kind}: {kind.picture}\n{name} (attention block {block}), example {example}', fontsize=10
  )
  return _save(fig, path)
