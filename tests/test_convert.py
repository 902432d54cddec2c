"""Official state_dicts into our models: layouts, clear errors, .pth files."""

import jax
import numpy as np
import pytest

from spikeformer_jax import convert, models
from spikeformer_jax.models import spikformer


def _fixture_state(shared_dir, name='spikformer_imagenet.npz'):
  path = shared_dir / 'fixtures' / name
  if not path.exists():
    pytest.skip(f'{name} absent')
  d = np.load(path)
  return {k[len('state/') :]: d[k] for k in d.files if k.startswith('state/')}


def _imagenet_fixture_model(dead=True, num_classes=10):
  mc = spikformer.model_config(
    'imagenet', embed_dim=64, depth=1, num_heads=4, T=4, num_classes=num_classes, img_size=64
  )
  mc.dead_modules = dead
  return models.build_model(mc)


def test_round_trip_layouts(shared_dir):
  state = _fixture_state(shared_dir)
  model = _imagenet_fixture_model()
  entries = convert.load_state_dict(model, state)
  from flax import nnx

  flat = {
    p: v.get_value()
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  }
  back = convert.to_torch_layout(entries, flat)
  assert set(back) == set(state)
  for k, v in state.items():  # the model holds float32: compare at float32
    np.testing.assert_array_equal(
      np.asarray(back[k]), v.astype(np.asarray(back[k]).dtype), err_msg=k
    )
  # Conv2d OIHW -> HWIO, kernel-1 Conv1d -> Linear [in, out]:
  w = state['patch_embed.proj_conv1.weight']
  np.testing.assert_array_equal(
    model.patch_embed.proj_conv1.kernel[...], w.transpose(2, 3, 1, 0).astype(np.float32)
  )
  q = state['block.0.attn.q_conv.weight']
  np.testing.assert_array_equal(
    model.block[0].attn.q_linear.kernel[...], q[:, :, 0].T.astype(np.float32)
  )


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
  ckpt = {
    'epoch': 3,
    'state_dict': {'module.' + k: torch.from_numpy(np.array(v)) for k, v in state.items()},
  }
  path = tmp_path / 'model_best.pth.tar'
  torch.save(ckpt, path)
  loaded = convert.load_torch_file(str(path))
  assert set(loaded) == {'module.' + k for k in state}
  model = _imagenet_fixture_model()
  convert.load_state_dict(model, loaded)  # strips the DDP 'module.' prefix
  np.testing.assert_array_equal(model.head.bias[...], state['head.bias'].astype(np.float32))


def test_an_array_of_another_layout_or_unusable_values_is_named(shared_dir):
  """Each array is checked against its official shape, not its size: fc1 as
  [in, out] has as many elements as PyTorch's [out, in]. Integers, NaN and
  values float32 cannot hold are named too, all in one message, before
  anything is copied."""
  state = _fixture_state(shared_dir)
  fc1 = 'block.0.mlp.fc1_conv.weight'  # (256, 64, 1, 1): a kernel-1 Conv2d
  conv = 'patch_embed.proj_conv1.weight'  # (O, I, 3, 3)
  bad = dict(state)
  bad[fc1] = state[fc1][:, :, 0, 0].T  # (64, 256): [in, out]
  bad[conv] = state[conv].transpose(2, 3, 1, 0)  # TensorFlow's HWIO
  bad['head.bias'] = np.where(np.arange(10) == 3, np.nan, state['head.bias'])
  bad['block.0.mlp.fc1_bn.weight'] = state['block.0.mlp.fc1_bn.weight'].astype(np.int64)
  bad['block.0.mlp.fc2_bn.bias'] = np.full_like(state['block.0.mlp.fc2_bn.bias'], 1e39)
  bad['block.0.mlp.fc2_bn.num_batches_tracked'] = np.float64(3.0)
  model = _imagenet_fixture_model()
  from flax import nnx  # pylint: disable=import-outside-toplevel

  before = nnx.state(model)
  with pytest.raises(ValueError) as e:
    convert.load_state_dict(model, bad)
  msg = str(e.value)
  assert f'{fc1} is (64, 256), the official layout (256, 64)' in msg, msg
  assert f'{conv} is (3, 3, ' in msg, msg
  assert 'head.bias has 1 of 10 values NaN or infinite' in msg, msg
  assert 'block.0.mlp.fc1_bn.weight holds int64, not floats' in msg, msg
  assert 'block.0.mlp.fc2_bn.bias has 64 of 64 values NaN or infinite (as float32)' in msg, msg
  assert 'block.0.mlp.fc2_bn.num_batches_tracked holds float64, not integers' in msg, msg
  assert jax.tree.all(
    jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True), before, nnx.state(model))
  )  # nothing copied
  convert.load_state_dict(model, state)  # the official layout loads


def test_only_kernels_change_layout():
  """A bare 3-d parameter (Spikformer DVS's pos_embed, [1, N, C]) is copied as
  it is; a 3-d kernel is a Conv1d's (OIK -> KIO)."""
  x = np.arange(16.0).reshape(1, 4, 4)
  np.testing.assert_array_equal(
    convert.Entry(('pos_embed',), 'pos_embed', (1, 4, 4), (1, 4, 4)).to_ours(x), x
  )
  e = convert.Entry(('p_conv', 'kernel'), 'p_conv.weight', (3, 2, 4), (4, 2, 3))
  w = np.arange(24.0).reshape(4, 2, 3)
  np.testing.assert_array_equal(e.to_ours(w), w.transpose(2, 1, 0))
  np.testing.assert_array_equal(e.to_torch(e.to_ours(w)), w)
  assert convert.official_shapes(('pos_embed',), (1, 4, 4)) == ((1, 4, 4),)
  # A transposed square matrix or a square kernel's swapped kh / kw has the
  # official shape: that is beyond a shape check.
  assert (3, 3) in convert.official_shapes(('q_linear', 'kernel'), (3, 3))
