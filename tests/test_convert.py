"""Official state_dicts into our models: layouts, clear errors, .pth files."""

import numpy as np
import pytest

from spikeformer_jax import convert, models
from spikeformer_jax.models import spikformer


def _fixture_state(shared_dir, name='spikformer_imagenet.npz'):
  path = shared_dir / 'fixtures' / name
  if not path.exists():
    pytest.skip(f'{name} absent')
  d = np.load(path)
  return {k[len('state/'):]: d[k] for k in d.files if k.startswith('state/')}


def _imagenet_fixture_model(dead=True, num_classes=10):
  mc = spikformer.model_config('imagenet', embed_dim=64, depth=1, num_heads=4, T=4,
                               num_classes=num_classes, img_size=64)
  mc.dead_modules = dead
  return models.build_model(mc)


def test_round_trip_layouts(shared_dir):
  state = _fixture_state(shared_dir)
  model = _imagenet_fixture_model()
  entries = convert.load_state_dict(model, state)
  from flax import nnx
  flat = {p: v.get_value() for p, v in nnx.to_flat_state(
      nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))}
  back = convert.to_torch_layout(entries, flat)
  assert set(back) == set(state)
  for k, v in state.items():  # the model holds float32: compare at float32
    np.testing.assert_array_equal(np.asarray(back[k]), v.astype(np.asarray(back[k]).dtype),
                                  err_msg=k)
  # Conv2d OIHW -> HWIO, kernel-1 Conv1d -> Linear [in, out]:
  w = state['patch_embed.proj_conv1.weight']
  np.testing.assert_array_equal(model.patch_embed.proj_conv1.kernel[...],
                                w.transpose(2, 3, 1, 0).astype(np.float32))
  q = state['block.0.attn.q_conv.weight']
  np.testing.assert_array_equal(model.block[0].attn.q_linear.kernel[...],
                                q[:, :, 0].T.astype(np.float32))


def test_wrong_configuration_is_one_clear_error(shared_dir):
  state = _fixture_state(shared_dir)
  with pytest.raises(ValueError) as e:
    convert.load_state_dict(_imagenet_fixture_model(num_classes=11), state)
  assert 'head.weight' in str(e.value) and 'shape mismatch' in str(e.value)
  with pytest.raises(ValueError, match='keys the model does not have.*norm1'):
    convert.load_state_dict(_imagenet_fixture_model(dead=False), state)


def test_pth_file(shared_dir, tmp_path):
  torch = pytest.importorskip('torch', reason='torch (optional) not installed')
  state = _fixture_state(shared_dir)
  ckpt = {'epoch': 3, 'state_dict': {'module.' + k: torch.from_numpy(np.array(v))
                                     for k, v in state.items()}}
  path = tmp_path / 'model_best.pth.tar'
  torch.save(ckpt, path)
  loaded = convert.load_torch_file(str(path))
  assert set(loaded) == {'module.' + k for k in state}
  model = _imagenet_fixture_model()
  convert.load_state_dict(model, loaded)  # strips the DDP 'module.' prefix
  np.testing.assert_array_equal(model.head.bias[...], state['head.bias'].astype(np.float32))
