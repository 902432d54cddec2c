"""The benchmarks' xla / pallas comparison (model.kernels): the GPU check
keeps each setting's result or error beside the other's, and train_step.py's
side-by-side report and ratio. No compile: the planner is replaced by a fake
(the real runs: docs/performance.md's commands, tests/test_docs.py)."""

import json

import pytest

from conftest import ROOT  # noqa: F401
from benchmarks import gpu_check, train_step
from spikeformer_jax import aot


def _fake_plan(pallas_images_per_s):
  """aot.plan's report, measured; pallas_images_per_s None: pallas fails as a
  Triton lowering might."""

  def plan(config, topology, batch, steps=None):
    k = config.model.kernels
    if k == 'pallas' and pallas_images_per_s is None:
      raise RuntimeError('Triton lowering failed: block shape\nand more lines')
    return {
      'config': config.get('name', ''),
      'global_batch': batch,
      'T': config.model.T,
      'dtype': config.model.dtype,
      'kernels': k,
      'kernels_resolved': k,
      'compile_s': 1.0,
      'hbm_peak_bytes_per_chip': 2**30,
      'hbm_bytes_per_image': 1e8,
      'measured_step_s': 0.1,
      'measured_images_per_s': 100.0 if k == 'xla' else pallas_images_per_s,
    }

  return plan


@pytest.mark.parametrize('pallas', [None, 250.0], ids=['pallas fails', 'pallas runs'])
def test_gpu_check_runs_each_case_with_xla_and_pallas(pallas, tmp_path, monkeypatch):
  monkeypatch.setattr(aot, 'plan', _fake_plan(pallas))
  monkeypatch.setattr(aot, 'format_report', lambda r: 'report')
  monkeypatch.setattr(gpu_check, 'gemm_rate', lambda *a, **k: 1e12)
  assert gpu_check.main(['--quick', f'--out={tmp_path}']) == 0
  doc = json.loads((tmp_path / 'gpu_check.json').read_text())
  xla, pal = doc['results']
  assert (xla['kernels'], pal['kernels']) == ('xla', 'pallas')
  assert xla['case'] == pal['case'] and xla['measured_images_per_s'] == 100.0
  md = (tmp_path / 'gpu_check.md').read_text()
  assert "interpret mode" in md  # the CPU's pallas is no speed measure
  if pallas is None:  # its error line, the xla result kept
    assert pal['error'] == 'Triton lowering failed: block shape' and 'Traceback' in pal['traceback']
    assert pal['pallas_over_xla'] is None
    assert '| pallas | | Triton lowering failed: block shape |' in md
  else:
    assert pal['pallas_over_xla'] == 2.5 and '| 250.0 | 2.50x |' in md
  assert '| xla | 1 | 100.0 | 100.0 |  |' in md


def test_gpu_check_refuses_an_unknown_kernels_setting(capsys):
  with pytest.raises(SystemExit):
    gpu_check.main(['--quick', '--kernels=xla,triton'])
  assert '--kernels=xla,triton: a comma list of xla, pallas, auto' in capsys.readouterr().err


def test_train_step_reports_the_settings_side_by_side(capsys):
  def result(kernels, resolved, ips):
    return {
      'config': 'c',
      'device': 'cpu x1',
      'batch': 2,
      'T': 2,
      'dtype': 'float32',
      'loop': 'scan',
      'unroll': 0,
      'kernels': kernels,
      'kernels_resolved': resolved,
      'compile_s': 1.0,
      'program_memory_bytes': 2**20,
      'step_time_s': 2 / ips,
      'step_time_min_s': 2 / ips,
      'step_time_max_s': 2 / ips,
      'images_per_s': ips,
      'fraction_of_gemm': 0.1,
      'final_loss': 2.3,
      'model_flops_per_image': 1e9,
      'gemm_flops_per_s': 1e11,
      'device_peak_bytes_all_settings': None,
    }

  results = [result('auto', 'xla', 100.0), result('pallas', 'pallas', 50.0)]
  assert train_step.speed_ratio(results) == 0.5  # auto resolved to xla: the baseline
  assert train_step.speed_ratio(results[:1]) is None
  text = train_step.comparison_text(
    {'results': results, 'pallas_over_xla': 0.5, 'note': train_step.INTERPRET_NOTE}
  )
  rows = {line.split('  ')[0]: line.split()[-4:] for line in text.splitlines()}
  assert rows['kernels'] == ['auto', '->', 'xla', 'pallas']
  assert rows['throughput'] == ['100.00', 'images/s', '50.00', 'images/s']
  assert 'speed pallas / xla            0.5x' in text and 'interpret mode' in text
  with pytest.raises(SystemExit):
    train_step.main(['--kernels=xla,xla'])
  assert '--kernels=xla,xla: a comma list of distinct xla, pallas, auto' in capsys.readouterr().err
