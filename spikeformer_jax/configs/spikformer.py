r"""Spikformer (Zhou et al., ICLR 2023): the paper's own models and its ANN
Transformer baselines. The rows of Tables 2-4 are variants (one argument);
those of Tables 1, 5, 6 and appendix C.1 are sweeps or overrides (below); Table
7 needs the ImageNet run it fine-tunes. The other methods' rows of Tables 2-4
(ResNets, SEW-ResNets, Spikingformer, ...) are not built here.

  python train.py --config=configs/spikformer.py:VARIANT --workdir=/tmp/run

| VARIANT              | model (flavour)            | T  | params (no dead / official) | paper top-1 |
|----------------------|----------------------------|----|-----------------------------|-------------|
| digits (default)     | 1-64 cifar flavour, 8x8    | 4  | 113,026                     | (target >= 97%; our result: README quickstart) |
| cifar10-4-256        | 4-256, heads 8 (cifar)     | 4  | 4,155,178 / 4,159,274       | 93.94       |
| cifar10-2-384        | 2-384, heads 12 (cifar)    | 4  | 5,765,050 / 5,768,122       | 94.80       |
| cifar10-4-384        | 4-384, heads 12 (cifar)    | 4  | 9,324,730 / 9,330,874       | 95.19       |
| cifar10-4-384-400e   | as above, 400 epochs (390 + 10) | 4 | 9,324,730 / 9,330,874  | 95.51       |
| cifar100-4-256 / -2-384 / -4-384 / -4-384-400e | as CIFAR-10, 100 classes | 4 | +23,130 (4-256) / +34,650 (384) | 75.96 / 76.95 / 77.86 / 78.21 |
| imagenet-4-384       | 4-384, heads 6: Table 7's pretraining (see below) | 4 | 9,701,272 / 9,707,416 | (no row) |
| imagenet-8-384       | 8-384, heads 6 (imagenet)  | 4  | 16,816,024 / 16,828,312     | 70.24       |
| imagenet-6-512       | 6-512, heads 8             | 4  | 23,373,352 / 23,385,640     | 72.46       |
| imagenet-8-512       | 8-512, heads 8             | 4  | 29,689,384 / 29,705,768     | 73.38       |
| imagenet-10-512      | 10-512, heads 8            | 4  | 36,005,416 / 36,025,896     | 73.68       |
| imagenet-8-768       | 8-768, heads 12            | 4  | 66,338,632 / 66,363,208     | 74.81       |
| cifar10dvs-2-256     | 2-256, heads 16 (dvs)      | 16 | 2,566,666 / 2,585,610       | 80.9        |
| dvs128gesture-2-256  | 2-256, heads 16 (dvs), 11 classes | 16 | 2,566,923 / 2,585,867 | 98.3 (see below) |
| cifar10dvs-2-256-t10 | Table 4: as cifar10dvs-2-256, 10 frames | 10 | 2,566,666 / 2,585,610 | 78.9 |
| dvs128gesture-2-256-paper | the paper's Gesture model: heads 8, `qk_pool=4`, learnable scale, 200 epochs (see below) | 16 | 2,566,925 / 2,585,869 | 98.3 |
| dvs128gesture-2-256-paper-t10 | Table 4: as above, 10 frames | 10 | 2,566,925 / 2,585,869 | 96.9 |
| cifar10dvs-2-256-paper | the paper's CIFAR10-DVS model: as cifar10dvs-2-256, learnable scale (see below) | 16 | 2,566,668 / 2,585,612 | 80.9 |
| cifar10dvs-2-256-paper-t10 | Table 4: as above, 10 frames | 10 | 2,566,668 / 2,585,612 | 78.9 |
| cifar10-transfer-4-384 / -8-384 / -8-512 | Table 7: ImageNet models (imagenet flavour, heads D/64) fine-tuned 60 epochs (50 + 10) on CIFAR-10 at 224x224, `--config.init_from=` the ImageNet run (required, see below); head fresh (`init_skip`) | 4 | as ImageNet, 10 classes | 95.54 / 96.64 / 97.03 |
| cifar100-transfer-4-384 / -8-384 / -8-512 | the same on CIFAR-100 | 4 | as ImageNet, 100 classes | 79.96 / 82.09 / 83.83 |
| imagenet-transformer-8-512 | Table 2's ANN "Transformer-8-512": imagenet-8-512 without spikes (below) | 1 | 29,689,384 (paper 29.68M) | 80.80 |
| cifar10-transformer-4-384 / cifar100-transformer-4-384 | Table 3's ANN "Transformer-4-384" (also MSViT's Table 2 row) | 1 | 9,324,730 / 9,359,380 (paper 9.32M) | 96.73 / 81.02 |
| nmnist-1-128         | 1-128, heads 8 (dvs), 32x32, 64 tokens | 8 | (not a paper row: the N-MNIST check) | |

"official" counts include the official code's unused modules (LayerNorms, the
DVS pos_embed); build them with `--config.model.dead_modules=True`.

Recipes are the official ones (spec section 1.5): AdamW without weight decay on
1-D parameters, timm cosine schedule stepped per epoch with a non-prefixed
warmup and 10 cooldown epochs, label smoothing 0.1, batch 128 (CIFAR), 192
(ImageNet: 24 per GPU x 8), 16 (DVS). BatchNorm statistics are global over the
batch by default; the official ImageNet runs had per-GPU statistics (8 x 24):
add `--config.bn_scope=device` on 8 devices for that. Epoch counts follow the
README's rule ("Configs", epoch counts): the paper's count is the total
trained, cooldown included (its ImageNet 310 = the yml's 300 + 10, its
CIFAR10-DVS 106 = 96 + 10), so the rows without official code train the
paper's count as epochs + 10: the 400E rows 390 + 10, Table 7 50 + 10, the
Gesture paper model 190 + 10.

Where the code and the paper differ, the rows follow the code:
  * ImageNet batch: 192, the official launch (24 per GPU x 8 GPUs); the
    paper says "128 or 256" (section 4.1). `--config.batch_size=256` (or
    128) for the paper's; the learning rate stays 5e-4 as in both.
  * DVS learning rate: 1e-3, the official CIFAR10-DVS code's for AdamW; the
    paper's "The learning rate is initialized to 0.1" (section 4.2, both DVS
    datasets, also with AdamW) is not taken, in the -paper rows either: it
    is 100x the rate of the authors' own DVS code and 200x their static
    rows' 5e-4 with the same optimizer (untested here;
    `--config.optimizer.lr=0.1` runs it).
  * DVS attention scale: the constant 0.25 of the code; the paper (section
    4.2, both DVS datasets): "We use a learnable parameter as the scaling
    factor", the -paper rows.
  * Gesture epochs: `dvs128gesture-2-256` trains the CIFAR10-DVS code's
    96 + 10 = 106 (the repository has no Gesture code); the paper's "The
    training epoch is 200 for DVS128 Gesture" (section 4.2) is the -paper
    rows' 190 + 10.

Augmentation (config.data.augment, config.mixup), as the official code:
  CIFAR:    flip, RandAugment rand-m9-n1-mstd0.4-inc1 over Spikformer's
            restricted op set (cifar10/aa_snn.py), random erasing 0.25 (const),
            mixup 0.5 until epoch 200; no crop.
  ImageNet: RandomResizedCrop scale (1, 1) with the default ratio, flip,
            rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / CutMix 1.0.
  CIFAR10-DVS: flip, SNNAugmentWide, mixup 0.5 with probability 0.5 until
            epoch 75. Gesture: none.
Data: `python prepare.py --dataset=cifar10` (see the README) once, then
`--config.data.data_dir=DIR`; the DVS rows read frames integrated by
`prepare.py --dataset=cifar10_dvs --frames=16` (the T=10 rows: `--frames=10`).

DVS128 Gesture: the official repository never released a Gesture model
(spikformer issue #7); `dvs128gesture-2-256` follows its CIFAR10-DVS flavour
with 11 classes. `dvs128gesture-2-256-paper` is the model the paper describes
(sections 4.2 and C.1): 8 heads, a 1-D max-pool after Q and K
(`model.qk_pool=4`: kernel and stride 4 over the channels, see
attention/ssa.py `qk_max_pool` for why), the attention scale a learnable
parameter (`model.attn_scale_learnable`, one per block, from 0.25: +2
parameters) and 200 epochs (190 + the 10 cooldown ones, as the paper counts
CIFAR10-DVS's 96 + 10 as 106); everything else the paper leaves unstated
follows the official CIFAR10-DVS code. The paper's "2.59M model" is the count
with the dead modules. Its "learning rate [...] 0.1" is not taken (the code:
1e-3 for AdamW).

CIFAR10-DVS: `cifar10dvs-2-256` is the official code; `cifar10dvs-2-256-paper`
(and `-paper-t10`, Table 4's T=10) adds what section 4.2 states beyond it for
both DVS datasets, the learnable attention scale (+2 parameters). Its other
statements match the code (16 heads, 106 epochs = 96 + 10, batch 16, AdamW,
cosine decay, the augmentation of Li et al. 2022: SNNAugmentWide), but for
the learning rate 0.1, not taken (above).

Table 7 (appendix D.5) fine-tunes "the pre-trained Spikformer-4-384 and
Spikformer-8-384/512 on ImageNet". Table 2 has no ImageNet 4-384 row (its
smallest is 8-384); `imagenet-4-384` is that model (the ImageNet recipe,
heads 6 as the other 384-wide ImageNet rows) to pretrain from: no paper
accuracy. The transfer rows set `init_required`: a run without
`--config.init_from` stops with one line before anything is written;
`--config.init_from=none` trains them from scratch on purpose.
The ANN baselines: the paper describes them by their rows alone (T=1, float
activations, "OPs refers to [...] FLOPs in ANN-ViT"; "ANN-ViT-8-512" in
section 4.1) and gives no architecture. Their parameter counts are
Spikformer's own (29.68M, 9.32M), which a ViT with LayerNorms and a patchify
stem would not have: so they are read as the Spikformer network without
spikes, each variant its Spikformer row with model.neuron.kind='relu' (every
neuron replaced by ReLU, the activation that ANN-to-SNN conversion swaps for
spiking neurons, section 2; 'gelu' is offered too), the BatchNorms kept,
softmax attention of float Q, K and V (model.attention='vsa_float_v',
Softmax(Q K^T / sqrt(d)) V, then the ReLU in attn_lif's place), T=1 and the
Spikformer recipe. All of that beyond the counts and T is inferred. The
parameter trees equal the Spikformer rows'. FLOPs: ours 8.57 G MACs for
8-512 (39.4 mJ by eq. 23), the paper's 8.33 G (38.340 mJ).

Sweeps (`python sweep.py run --config=configs/spikformer.py --sweep=NAME
--workdir=DIR`, see sweep.py), each point carrying the paper's number:
`timesteps` (Table 5: T in {1, 2, 4, 6} on CIFAR-10/100 4-384 and ImageNet
8-512, 12 points), `attention` (Table 1: A_I, A_LeakyReLU, A_ReLU, A_softmax
and SSA on CIFAR10-DVS 2-256 and CIFAR-10/100 4-384, 15 points),
`attention-imagenet` (Table 5's ImageNet 8-512 rows: I, ReLU, LeakyReLU, VSA,
VSA with float V, 5 points), `attention-float-v` (Table 5: VSA with float V on
CIFAR-10/100 4-384, 95.17 / 78.37, 2 points), `table6` (appendix D.3: A_I,
A_ReLU, A_LeakyReLU and VSA at T=1, and the IF neuron `model.neuron.kind='if'`
at T=4, on CIFAR-10/100 4-384, 10 points), `gesture-qk-pool` (appendix C.1:
the paper's Gesture model without / with the max-pool after Q and K, 97.9 /
98.3, 2 points), `digits-small` (T x surrogate on the embedded digits, minutes
on a CPU; table in the README).

Suffix ',runlocal' shrinks any variant (depth 1, width 32, T 2, a few steps on
synthetic data) for smoke tests: `--config=configs/spikformer.py:cifar10-4-384,runlocal`.
"""

from spikeformer_jax import config_lib
from spikeformer_jax import errors
from spikeformer_jax import sweeps
from spikeformer_jax.models import spikformer

# name -> (dataset, flavour, depth, dim, heads, T, classes, image size, paper top-1)
_ROWS = {
    'cifar10-4-256': ('cifar10', 'cifar', 4, 256, 8, 4, 10, 32, 93.94),
    'cifar10-2-384': ('cifar10', 'cifar', 2, 384, 12, 4, 10, 32, 94.80),
    'cifar10-4-384': ('cifar10', 'cifar', 4, 384, 12, 4, 10, 32, 95.19),
    'cifar10-4-384-400e': ('cifar10', 'cifar', 4, 384, 12, 4, 10, 32, 95.51),
    'cifar100-4-256': ('cifar100', 'cifar', 4, 256, 8, 4, 100, 32, 75.96),
    'cifar100-2-384': ('cifar100', 'cifar', 2, 384, 12, 4, 100, 32, 76.95),
    'cifar100-4-384': ('cifar100', 'cifar', 4, 384, 12, 4, 100, 32, 77.86),
    'cifar100-4-384-400e': ('cifar100', 'cifar', 4, 384, 12, 4, 100, 32, 78.21),
    # Table 7's pretraining for its 4-384 rows: Table 2 has no such row (paper 0.0).
    'imagenet-4-384': ('imagenet2012', 'imagenet', 4, 384, 6, 4, 1000, 224, 0.0),
    'imagenet-8-384': ('imagenet2012', 'imagenet', 8, 384, 6, 4, 1000, 224, 70.24),
    'imagenet-6-512': ('imagenet2012', 'imagenet', 6, 512, 8, 4, 1000, 224, 72.46),
    'imagenet-8-512': ('imagenet2012', 'imagenet', 8, 512, 8, 4, 1000, 224, 73.38),
    'imagenet-10-512': ('imagenet2012', 'imagenet', 10, 512, 8, 4, 1000, 224, 73.68),
    'imagenet-8-768': ('imagenet2012', 'imagenet', 8, 768, 12, 4, 1000, 224, 74.81),
    # Table 7 (appendix D.5): ImageNet models fine-tuned on CIFAR at 224x224
    # for 60 epochs (50 + 10), the rest of the CIFAR recipe; heads as our ImageNet rows.
    'cifar10-transfer-4-384': ('cifar10', 'imagenet', 4, 384, 6, 4, 10, 224, 95.54),
    'cifar10-transfer-8-384': ('cifar10', 'imagenet', 8, 384, 6, 4, 10, 224, 96.64),
    'cifar10-transfer-8-512': ('cifar10', 'imagenet', 8, 512, 8, 4, 10, 224, 97.03),
    'cifar100-transfer-4-384': ('cifar100', 'imagenet', 4, 384, 6, 4, 100, 224, 79.96),
    'cifar100-transfer-8-384': ('cifar100', 'imagenet', 8, 384, 6, 4, 100, 224, 82.09),
    'cifar100-transfer-8-512': ('cifar100', 'imagenet', 8, 512, 8, 4, 100, 224, 83.83),
    'cifar10dvs-2-256': ('cifar10_dvs', 'dvs', 2, 256, 16, 16, 10, 128, 80.9),
    'dvs128gesture-2-256': ('dvs128_gesture', 'dvs', 2, 256, 16, 16, 11, 128, 98.3),
}
# The paper's DVS128 Gesture model (sections 4.2 and C.1), which the released
# code never had: "The SSA contains 8 [...] heads for DVS128 Gesture", "we place
# a 1D max-pooling layer after Q and K", "We use a learnable parameter as the
# scaling factor", "The training epoch is 200 for DVS128 Gesture" (the paper's
# counts include the 10 cooldown epochs: its 106 for CIFAR10-DVS is the code's
# 96 + 10; README, epoch counts). The rest as the official CIFAR10-DVS code (the
# paper's learning rate "0.1" for AdamW is not taken: the code's 1e-3).
_GESTURE_PAPER = {'heads': 8, 'model.qk_pool': 4, 'model.attn_scale_learnable': True,
                  'epochs': 190}
_CIFAR10DVS_PAPER = {'model.attn_scale_learnable': True}
# Paper rows beyond the released code: name -> (the row it changes, changes, paper top-1).
_PAPER_ROWS: dict[str, tuple[str, dict, float]] = {
    # Table 4 at T=10: the official CIFAR10-DVS model, frames integrated into 10.
    'cifar10dvs-2-256-t10': ('cifar10dvs-2-256', {'T': 10}, 78.9),
    'dvs128gesture-2-256-paper': ('dvs128gesture-2-256', _GESTURE_PAPER, 98.3),
    'dvs128gesture-2-256-paper-t10': ('dvs128gesture-2-256', {**_GESTURE_PAPER, 'T': 10}, 96.9),
    # Section 4.2's learnable scale, stated for both DVS datasets; the rest of
    # what it states for CIFAR10-DVS is the official code's (but the lr 0.1).
    'cifar10dvs-2-256-paper': ('cifar10dvs-2-256', _CIFAR10DVS_PAPER, 80.9),
    'cifar10dvs-2-256-paper-t10': ('cifar10dvs-2-256', {**_CIFAR10DVS_PAPER, 'T': 10}, 78.9),
}
# The ANN baselines of Tables 2 and 3 ("Transformer-8-512", "Transformer-4-384",
# T=1, float activations; ANN-ViT-8-512 in the text): the paper gives their
# parameters (29.68M, 9.32M: Spikformer's own counts), FLOPs and accuracy, no
# architecture. Read as Spikformer's network without spikes: every neuron a
# ReLU (model.neuron.kind='relu'), softmax attention of float Q, K, V
# (Table 5's 'VSA with float V'), one pass (T=1), the Spikformer recipe.
_ANN = {'model.neuron.kind': 'relu', 'model.attention': 'vsa_float_v', 'T': 1,
        'model.compact_spikes': False}
_PAPER_ROWS.update({
    'cifar10-transformer-4-384': ('cifar10-4-384', _ANN, 96.73),
    'cifar100-transformer-4-384': ('cifar100-4-384', _ANN, 81.02),
    'imagenet-transformer-8-512': ('imagenet-8-512', _ANN, 80.80),
})
VARIANTS = ['digits', 'nmnist-1-128', *_ROWS, *_PAPER_ROWS]


def _changed_row(name):
  """A row of _PAPER_ROWS: its base row with new heads / T, then its fields."""
  base, changes, paper = _PAPER_ROWS[name]
  changes = dict(changes)
  dataset, flavour, depth, dim, heads, T, classes, img, _ = _ROWS[base]
  row = (dataset, flavour, depth, dim, changes.pop('heads', heads), changes.pop('T', T),
         classes, img, paper)
  return config_lib.apply_overrides(_paper_row(name, row), changes, f'variant {name!r}: ')


def _paper_row(name, row=None):
  dataset, flavour, depth, dim, heads, T, classes, img, paper = row or _ROWS[name]
  model = spikformer.model_config(flavour, embed_dim=dim, depth=depth, num_heads=heads,
                                  T=T, num_classes=classes, img_size=img)
  if flavour == 'dvs':  # raw event counts, as the official code feeds them
    data = config_lib.data_config(dataset, classes, (T, img, img, 2), mean=(), std=())
    c = config_lib.base_config(model, data, batch=16, epochs=96, lr=1e-3, wd=0.06, warmup=10,
                               warmup_lr=1e-5)
    if dataset == 'cifar10_dvs':  # cifar10dvs/train.py; Gesture: none (a flip changes its class)
      c.data.augment.update(hflip=0.5, dvs_policy='snn_augment_wide')
      c.mixup.update(mixup_alpha=0.5, prob=0.5, off_epoch=75)
  elif flavour == 'imagenet' and dataset != 'imagenet2012':  # Table 7: fine-tuning
    c = config_lib.base_config(model, config_lib.image_data(dataset, classes, img), batch=128,
                               epochs=50, lr=5e-4, wd=0.06, warmup=20, warmup_lr=1e-5)
    c.data.augment.update(hflip=0.5, rand_augment='rand-m9-n1-mstd0.4-inc1',
                          rand_augment_ops='spikformer_cifar', reprob=0.25)
    c.mixup.update(mixup_alpha=0.5, off_epoch=200)
    c.init_skip = ('head',)  # --config.init_from=the ImageNet run (1000 classes)
    c.init_required = True  # else it would silently train from scratch
  elif flavour == 'imagenet':
    c = config_lib.base_config(model, config_lib.image_data(dataset, classes, img), batch=192,
                               epochs=300, lr=5e-4, wd=0.05, warmup=20, warmup_lr=1e-6)
    c.data.augment.update(crop_ratio=(3 / 4, 4 / 3), hflip=0.5,
                          rand_augment='rand-m9-mstd0.5-inc1', reprob=0.25)
    c.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  else:
    c = config_lib.base_config(model, config_lib.image_data(dataset, classes, img), batch=128,
                               epochs=390 if name.endswith('400e') else 300, lr=5e-4, wd=0.06,
                               warmup=20, warmup_lr=1e-5)
    c.data.augment.update(hflip=0.5, rand_augment='rand-m9-n1-mstd0.4-inc1',
                          rand_augment_ops='spikformer_cifar', reprob=0.25)
    c.mixup.update(mixup_alpha=0.5, off_epoch=200)
  c.paper_top1 = paper
  return c


def _digits():
  """A small Spikformer on scikit-learn's handwritten digits: real data, no download."""
  model = spikformer.model_config('cifar', embed_dim=64, depth=1, num_heads=4, T=4,
                                  num_classes=10, img_size=8)
  model.pooling = '0001'  # 8x8 -> 4x4 = 16 tokens
  c = config_lib.base_config(model, config_lib.data_config('digits', 10, (8, 8, 1)), batch=64,
                             epochs=20, lr=2e-3, wd=0.01, warmup=2, warmup_lr=1e-4)
  c.model.in_channels = 1
  c.cooldown_epochs = 0
  c.label_smoothing = 0.0
  c.optimizer.schedule_per_epoch = False
  c.eval_batch_size = 128
  c.log_every_steps = 22
  c.ckpt_every_steps = 110
  c.target_top1 = 0.97
  return c


def _nmnist():
  """A small DVS-flavour Spikformer on N-MNIST (not a paper row: the DVS check
  a CPU affords). 34x34 events resized to 32, T=8 frames by event count,
  two pooling stages (8x8 = 64 tokens), the CIFAR10-DVS recipe's flip-free
  settings."""
  model = spikformer.model_config('dvs', embed_dim=128, depth=1, num_heads=8, T=8,
                                  num_classes=10, img_size=32)
  model.pooling = '0011'
  data = config_lib.data_config('nmnist', 10, (8, 32, 32, 2), mean=(), std=())
  c = config_lib.base_config(model, data, batch=32, epochs=8, lr=2e-3, wd=0.01, warmup=1,
                             warmup_lr=1e-4)
  c.cooldown_epochs = 0
  c.optimizer.schedule_per_epoch = False
  c.log_every_steps = 10
  return c


def get_config(arg: str = 'digits'):
  """`arg` = VARIANT[,runlocal]; see the module docstring for the variants."""
  name, local = config_lib.parse_arg(arg, 'digits', VARIANTS)
  if name in _PAPER_ROWS:
    c = _changed_row(name)
  else:
    c = {'digits': _digits, 'nmnist-1-128': _nmnist}.get(name, lambda: _paper_row(name))()
  if local:
    c = config_lib.runlocal(c)
  c.name = f'spikformer:{arg}'
  return c


SWEEPS = ('timesteps', 'attention', 'attention-imagenet', 'attention-float-v', 'table6',
          'gesture-qk-pool', 'digits-small')

# Table 5, time steps: (variant, T) -> top-1.
_TABLE5_T = {
    ('cifar10-4-384', 1): 93.51, ('cifar10-4-384', 2): 93.59,
    ('cifar10-4-384', 4): 95.19, ('cifar10-4-384', 6): 95.34,
    ('cifar100-4-384', 1): 74.36, ('cifar100-4-384', 2): 76.28,
    ('cifar100-4-384', 4): 77.86, ('cifar100-4-384', 6): 78.61,
    ('imagenet-8-512', 1): 70.14, ('imagenet-8-512', 2): 71.09,
    ('imagenet-8-512', 4): 73.38, ('imagenet-8-512', 6): 73.70,
}
# Table 1, attention kinds: (variant, kind) -> top-1 (A_softmax is `vsa`).
_TABLE1 = {
    (v, k): acc
    for v, accs in (('cifar10dvs-2-256', (79.40, 79.80, 79.40, 80.00, 80.90)),
                    ('cifar10-4-384', (93.96, 93.85, 94.34, 94.97, 95.19)),
                    ('cifar100-4-384', (76.94, 76.73, 77.00, 77.92, 77.86)))
    for k, acc in zip(('a_i', 'a_leakyrelu', 'a_relu', 'vsa', 'ssa'), accs)
}
# Table 5, ImageNet 8-512 attention kinds (I, ReLU, LeakyReLU: "did not converge").
_TABLE5_ATTN = {'a_i': 0.0, 'a_relu': 0.0, 'a_leakyrelu': 0.0, 'vsa': 72.70,
                'vsa_float_v': 73.96}
# Table 5, VSA with float V on CIFAR-10/100 4-384, T=4 (the cells as in the
# paper's under-review version; our text copy of the final one lost them).
_TABLE5_FLOAT_V = {'cifar10-4-384': 95.17, 'cifar100-4-384': 78.37}
# Table 6 (appendix D.3): (variant, attention kind at T=1 | 'if') -> top-1; 'if':
# the Integrate-and-Fire neuron (SpikingJelly IFNode) everywhere, SSA, T=4.
_TABLE6 = {
    (v, k): acc
    for v, accs in (('cifar10-4-384', (92.39, 92.98, 92.88, 93.11, 95.33)),
                    ('cifar100-4-384', (74.28, 74.32, 74.31, 74.37, 78.14)))
    for k, acc in zip(('a_i', 'a_relu', 'a_leakyrelu', 'vsa', 'if'), accs)
}
# Appendix C.1: the paper's Gesture model without / with the 1-D max-pool after Q and K.
_GESTURE_POOL = {0: 97.9, 4: 98.3}


def get_sweep(name: str):
  """The points of sweep `name` (see the module docstring)."""
  if name == 'timesteps':
    return [{'config': v, 'model.T': t, 'paper_top1': acc} for (v, t), acc in _TABLE5_T.items()]
  if name == 'attention':  # the official code of the variants was not released
    return [{'config': v, 'model.attention': k, 'paper_top1': acc}
            for (v, k), acc in _TABLE1.items()]
  if name == 'attention-imagenet':
    return [{'config': 'imagenet-8-512', 'model.attention': k, 'paper_top1': acc}
            for k, acc in _TABLE5_ATTN.items()]
  if name == 'attention-float-v':
    return [{'config': v, 'model.attention': 'vsa_float_v', 'paper_top1': acc}
            for v, acc in _TABLE5_FLOAT_V.items()]
  if name == 'table6':
    return [{'config': v, **({'model.neuron.kind': 'if'} if k == 'if' else
                             {'model.T': 1, 'model.attention': k}), 'paper_top1': acc}
            for (v, k), acc in _TABLE6.items()]
  if name == 'gesture-qk-pool':
    return [{'config': 'dvs128gesture-2-256-paper', 'model.qk_pool': p, 'paper_top1': acc}
            for p, acc in _GESTURE_POOL.items()]
  if name == 'digits-small':  # 6 points of 8 epochs on the embedded digits
    return sweeps.product(
        sweeps.grid(**{'model.T': [1, 2, 4], 'model.neuron.surrogate': ['sigmoid', 'atan']}),
        [{'epochs': 8, 'ckpt_every_steps': 0}])
  raise errors.ConfigError(f'unknown sweep {name!r}; declared: {", ".join(SWEEPS)}.')
