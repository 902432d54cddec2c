r"""MSViT (Hua et al., 2025) and QKFormer: every MSViT and QKFormer row of the MSViT
paper's Tables 1-3 (its Spikformer, SDT and Transformer-4-384 rows are
configs/spikformer.py's and configs/sdt.py's; the other methods' rows, DeiT,
ViT, Swin, Spikformer V2, SDT v2, CML, ResNet-19, are not built).

  python train.py --config=configs/msvit.py:VARIANT --workdir=/tmp/run

Table 1 (ImageNet-1K, 224 x 224, T=4) and Table 2 (CIFAR, DVS); params are
our counts, equal to the official code's (tested):

| VARIANT                    | graph, stages             | T  | params      | paper params / top-1 |
|----------------------------|---------------------------|----|-------------|----------------------|
| imagenet-10-384            | imagenet, 192/192/384, h6 | 4  | 17,686,216  | 17.69M / 80.09 |
| imagenet-10-512            | imagenet, 256/256/512, h8 | 4  | 31,232,616  | 30.23M (a mismatch, see below) / 82.96 |
| imagenet-10-768            | imagenet, 384/384/768, h12| 4  | 69,802,408  | 69.80M / 85.06 |
| cifar10-4-384              | cifar, 192/192/384, h8    | 4  | 7,558,762   | 7.59M (CIFAR-100's count; this one is 7.56M) / 96.53 |
| cifar100-4-384             | cifar, 100 classes        | 4  | 7,593,412   | 7.59M / 81.98 |
| dvs128gesture-16 / -10     | dvs rebuild, 128/256, h16 | 16 / 10 | 2,334,219 | 1.67M / 98.80 / 98.37 |
| cifar10dvs-16 / -10        | dvs rebuild, mlp ratio 1  | 16 / 10 | 1,558,474 | 1.67M / 84.30 / 83.80 |
| qkformer-imagenet-10-384 / -512 / -768 | QKFormer, 96/192/384 ... | 4 | 16,473,688 / 29,079,336 / 64,962,760 | 16.47 / 29.08 / 64.96M; 78.80 / 82.04 / 84.22 |
| qkformer-cifar10-4-384 / qkformer-cifar100-4-384 | QKFormer CIFAR | 4 | 6,706,234 / 6,740,884 | 6.74M (CIFAR-100's count; CIFAR-10: 6.71M) / 96.08 / 81.12 |
| qkformer-dvs128gesture-16  | QKFormer DVS, 128/256, h16, mlp 4 | 16 | 1,999,371 | 1.50M / 98.6 |
| qkformer-cifar10dvs-16     | QKFormer DVS, mlp ratio 1 | 16 | 1,504,138 | 1.50M / 84.0 |
| cifar10-4-384-h4 / cifar100-4-384-h4 | cifar, the paper's H/4 grid | 4 | 7,558,762 / 7,593,412 | 7.59M (CIFAR-100's) / 96.53 / 81.98 |
| imagenet-10-{384,512,768}-paper | as imagenet-10-*, stochastic depth 0.1 | 4 | as imagenet-10-* | as imagenet-10-* |
| dvs128gesture-{16,10}-paper | as dvs128gesture-*, frames by time, 3 channels, 200 epochs | 16 / 10 | 2,334,795 | 1.67M / 98.80 / 98.37 |
| cifar10dvs-{16,10}-paper | as cifar10dvs-*, frames by time, 3 channels | 16 / 10 | 1,558,762 | 1.67M / 84.30 / 83.80 |

Table 2 prints one count for both CIFAR datasets, 7.59M for MSViT and 6.74M
for QKFormer: the CIFAR-100 models' (7,593,412 and 6,740,884); the CIFAR-10
ones have 34,650 fewer (the head), 7.56M and 6.71M. The paper gives 30.23M
for MSViT-10-512 three times (Table 1 and twice in section 4.2), against
the 31,232,616 (31.23M) that the released code builds: a mismatch we do not
resolve (the model is the code's; 10-384 and 10-768 match it exactly).

The -paper rows add what the paper states and the released code lacks (each
also one field on any row, below): stochastic depth on ImageNet
(model.drop_path_rate=0.1, section 4.2), and on the DVS rows section 4.3's
input: "We aggregate events over specific time intervals [...] to construct
frames" (data.split_by='time', T frames of equal duration, SpikingJelly's
split_by='time'; prepare them with `prepare.py --dataset=... --frames=T
--split_by=time`; the default rows split by event count, as MSViT's deleted
DVS trainers do, spec 4.4) and "The RGB channels are replaced
with positive, negative, and the sum of events" (model.event_sum_channel).
Gesture's -paper rows train the paper's 200 epochs (190 + 10; the default
rows keep the trainers' 192 + 10, README: epoch counts); CIFAR10-DVS's 106 is
both (96 + 10).

Table 3 (CIFAR-100 ablation of the feature fusion; Q = kernel-1, P = kernel-3
token conv; stages 1-2 / stage 3):

| VARIANT                       | stages 1-2 | stage 3    | our params | paper params / top-1 |
|-------------------------------|------------|------------|------------|----------------------|
| cifar100-4-384 (MSViT)        | MSSA(P+Q)  | SSA        | 7,593,412  | 7.59 / 81.98 |
| cifar100-ablation-pp          | MSSA(P+P)  | SSA        | 7,740,868  | 7.74 / 81.36 |
| cifar100-ablation-qq          | MSSA(Q+Q)  | SSA        | 7,445,956  | 7.45 / 81.56 |
| cifar100-ablation-p           | MSSA(P)    | SSA        | 7,518,916  | 7.52 / 81.35 |
| cifar100-ablation-q           | MSSA(Q)    | SSA        | 7,371,460  | 7.37 / 81.44 |
| cifar100-ablation-mssa-pp     | MSSA(P+Q)  | MSSA(P+P)  | 8,773,060  | 9.04 / 81.25 |
| cifar100-ablation-mssa-qq     | MSSA(P+Q)  | MSSA(Q+Q)  | 7,593,412  | 7.89 / 81.15 |
| cifar100-ablation-mssa-pq     | MSSA(P+Q)  | MSSA(P+Q)  | 8,183,236  | 8.48 / 81.65 |

The QKFormer DVS rows are Table 2's QKFormer entries (msvit-2025.txt line
190: 1.50M, T=16, 98.6 / 84.0), built as QKFormer's own DVS files, which run
(`qkformer_dvs` stem: widths D/16..D/2, residual from the first pooled layer;
one Q-K block at D/2, one SSA block at D, heads 16, thresholds 0.5, and the
SSA's batch-as-time proj_lif, which those files share). 1,504,138 is the count
in QKFormer's cifar10-dvs_origin_log.txt; Gesture's MLP ratio 4 gives
1,999,371, not the 1.50M the table repeats. Recipes as their train.py:
batch 16, AdamW wd 0.06, lr 1e-3 / 5e-3, 192 / 96 + 10 epochs, warmup 10 from
1e-5, min lr 2e-5 / 1e-5, flip + SNNAugmentWide (on Gesture too, as the code,
although a flip swaps some of its classes), mixup 0.5 with probability 0.5
until epoch 75. The T=10 rows the MSViT text implies (QKFormer 0.3 below
MSViT's 83.80) are one override away (model.T and data.shape).

The -h4 rows are the paper's CIFAR token grid: "N = H/4 x W/4", then H/8 and
H/16 (section 3.1.1, line 79): 8x8 / 4x4 / 2x2 tokens at 32 x 32. The
released cifar10/model.py (and QKFormer's) keeps 32x32 / 16x16 / 8x8 (no pool
in the stem), which the default rows and the fidelity recordings follow.
`model.stem='cifar_h4'` pools the stem's two convs as the ImageNet stem does
(stride-2 residual from the first); no parameter changes.

No code exists for Table 3. Stages 1-2 match the paper's counts exactly; the
stage-3 MSSA rows are the same MSSA block as stages 1-2 (Q, P, K, proj) and
fall 0.27M (P+P) and 0.30M (Q+Q, P+Q) below the paper's figures: about 2 D^2 =
294,912, one extra D x D projection per stage-3 block that the paper does not
describe; we do not invent one.

Code vs intent (spec 4.1, 4.4), each one field:
  * model.attn_v_threshold: 1.0 as the released code fires. 0.5 is not from
    the paper, which states no threshold (Appendix A only names V_th): it is
    what the code's attn_lif call sites request (`lif_node_builder(..., 0.5)`,
    a value its factory drops), what QKFormer's and Spikformer's code set,
    and the default of the DVS rebuild and of the QKFormer rows.
  * model.ssa_proj_lif_batch_as_time: True as released (the SSA's proj_lif runs
    over batch and time as one sequence); False is the per-sample neuron.
  * model.mssa_kernels / mssa_p_sum: ((1, 1),) * 3 and False is the released
    cifar100/model.py (kernel-1 P, per-channel mask), which its own train.py
    cannot build; these rows use the cifar10/model.py graph, whose 100-class
    count is the paper's 7.59M.
  * data.norm_from of the CIFAR-100 rows: 'cifar10', the statistics
    cifar100.yml uses; --config.data.norm_from=cifar100 for the correct ones.

The paper's options the code lacks, each off by default:
  * model.drop_path_rate (0.0; 0.1 in the imagenet -paper rows): stochastic
    depth. Section 4.2 (line 204):
    "We employ several data augmentation techniques, including RandAugment,
    random erasing, and stochastic depth", with no rate. imagenet/train.py's
    `--drop_path` defaults to 0.1 but is never passed to the model, whose
    blocks build a DropPath they never call (cifar10.yml's 0.2 is as inert). So
    the ImageNet recipe with it is `--config.model.drop_path_rate=0.1`: timm's
    rule, linear from 0 at the first block to the rate at the last, each
    example's attention and MLP branch dropped alone and the kept ones scaled
    by 1 / (1 - p), in training only (it turns model.compact_spikes off). The
    masks come from the train state's RNG stream: other seeds, other masks.
  * model.stem='cifar_h4': the paper's CIFAR grid (the -h4 rows, above).
  * model.event_sum_channel (False): section 4.3 (line 214): "The RGB
    channels are replaced with positive, negative, and the sum of events as
    input features". True appends positive + negative to the two polarity
    frames before the stem (data unchanged, in_channels stays 2; the first
    conv gets 3 input channels: +9 x its width parameters, +576 / +288 /
    +144 for the Gesture / CIFAR10-DVS rebuilds / QKFormer DVS). The deleted
    DVS code fed the 2 polarities, so the DVS rows keep them; the -paper
    rows set it.
  * data.split_by='time' (the DVS -paper rows): frames over equal time
    intervals, section 4.3's aggregation; default 'number', the code's.

Where the paper contradicts itself (msvit-2025.txt line numbers):
  * Time steps: section 3.1.1 (line 77): "When training MSViT on static RGB
    image datasets, T is 1"; Tables 1 and 2 (lines 181-183, 193) give T=4
    for the same rows. The ImageNet code's constructors default to T=1
    (MSFormer_10_*(T=1)) and its train.py passes --time_step 4; the rows
    use 4.
  * Table 3 vs its text: the text (line 231) says "Line 1 shows that MSSA
    (P+P) performs 81.25 ... Line 2 shows MSSA(Q+Q) obtains only 81.15", the
    numbers of Table 3's rows 5-6 (MSSA + MSSA(P+P) / (Q+Q), lines 223-224);
    rows 1-2 read 81.36 and 81.56 (lines 219-220), and the text's own "almost
    the same as ... MSSA (P) (Line 3)" (81.35) fits 81.36. The rows use the
    table.
  * Section 4.3 (line 212): CIFAR-10 "outperforming ... QKFormer by 0.35%";
    Table 2 gives 96.53 - 96.08 = 0.45.

Recipes (spec 4.6): CIFAR: AdamW lr 1e-3, wd 0.06, batch 64 (the paper says
128), 400 + 10 epochs (cifar10.yml's; the paper says 400, which by the
README's epoch rule would be 390 + 10: `--config.epochs=390`), warmup 20
from 1e-5, timm cosine per epoch. ImageNet:
MAE's loop: AdamW base lr 6e-4 x effective batch / 256 (lr_scale_batch), wd
0.05, 200 epochs, a per-update linear warmup of 5 epochs from 0 and a
half-cosine to 1e-7 (schedule mae_cosine); the paper's batch 512 as 256 x 2
accumulation steps (the official values were not published; QKFormer's logs
show 8 GPUs x 32 x 2). DVS (deleted trainers): batch 16, AdamW wd 0.06, warmup
10, lr 5e-3 / 96 + 10 epochs (CIFAR10-DVS), 1e-3 / 192 + 10 (Gesture; the
paper: 200, the -paper rows' 190 + 10).
Augmentation: CIFAR: flip, timm's standard RandAugment rand-m9-n1-mstd0.4-inc1,
random erasing 0.25, mixup 0.5 until epoch 200. ImageNet: RandomResizedCrop
(0.08, 1), flip, rand-m9-mstd0.5-inc1, random erasing 0.25 ('pixel'), no
mixup, eval resize 256 / crop 224. DVS: mixup 0.5 with probability 0.5 until
epoch 75.
Data: `python prepare.py` (see the README, "Datasets"), then
`--config.data.data_dir=DIR`.

Suffix ',runlocal' shrinks any variant (last stage 32 wide, one block per
stage, T 2, synthetic data) for smoke tests.

Sweep `table3` (`python sweep.py run --config=configs/msvit.py --sweep=table3
--workdir=DIR`): the 8 rows of Table 3 as overrides of cifar100-4-384, each
with the paper's number.
"""

from typing import Any

from spikeformer_jax import config_lib
from spikeformer_jax import errors
from spikeformer_jax.models import msvit

# name -> (variant, depth, D, heads, paper top-1)
_IMAGENET = {
    'imagenet-10-384': ('msvit', 10, 384, 6, 80.09),
    'imagenet-10-512': ('msvit', 10, 512, 8, 82.96),
    'imagenet-10-768': ('msvit', 10, 768, 12, 85.06),
    'qkformer-imagenet-10-384': ('qkformer', 10, 384, 6, 78.80),
    'qkformer-imagenet-10-512': ('qkformer', 10, 512, 8, 82.04),
    'qkformer-imagenet-10-768': ('qkformer', 10, 768, 12, 84.22),
}
# name -> (variant, classes, paper top-1)
_CIFAR = {
    'cifar10-4-384': ('msvit', 10, 96.53),
    'cifar100-4-384': ('msvit', 100, 81.98),
    'qkformer-cifar10-4-384': ('qkformer', 10, 96.08),
    'qkformer-cifar100-4-384': ('qkformer', 100, 81.12),
}
# Table 3: name -> ((Q, P) kernels of stages 1-2, stage-3 attention and kernels, top-1)
_ABLATION = {
    'cifar100-ablation-pp': ((3, 3), ('ssa', (1, 3)), 81.36),
    'cifar100-ablation-qq': ((1, 1), ('ssa', (1, 3)), 81.56),
    'cifar100-ablation-p': ((0, 3), ('ssa', (1, 3)), 81.35),
    'cifar100-ablation-q': ((1, 0), ('ssa', (1, 3)), 81.44),
    'cifar100-ablation-mssa-pp': ((1, 3), ('mssa', (3, 3)), 81.25),
    'cifar100-ablation-mssa-qq': ((1, 3), ('mssa', (1, 1)), 81.15),
    'cifar100-ablation-mssa-pq': ((1, 3), ('mssa', (1, 3)), 81.65),
}
# QKFormer's DVS files: name -> (dataset, classes, T, mlp ratio, lr, min lr,
# epochs, paper top-1: MSViT's Table 2, line 190)
_QKFORMER_DVS = {
    'qkformer-dvs128gesture-16': ('dvs128_gesture', 11, 16, 4, 1e-3, 2e-5, 192, 98.6),
    'qkformer-cifar10dvs-16': ('cifar10_dvs', 10, 16, 1, 5e-3, 1e-5, 96, 84.0),
}
# The paper's H/4 CIFAR token grid: name -> the row it regrids
_GRID_H4 = {'cifar10-4-384-h4': 'cifar10-4-384', 'cifar100-4-384-h4': 'cifar100-4-384'}
# What the paper states and the code lacks: name -> (the row it changes, its fields).
# ImageNet: "stochastic depth" (section 4.2), at imagenet/train.py's unused
# --drop_path default. DVS (section 4.3): frames over time intervals, the
# event sum as a third channel; Gesture's 200 epochs are 190 + 10 cooldown.
_DVS_PAPER = {'data.split_by': 'time', 'model.event_sum_channel': True}
_PAPER: dict[str, tuple[str, dict[str, Any]]] = {
    **{f'{v}-paper': (v, {'model.drop_path_rate': 0.1})
       for v in ('imagenet-10-384', 'imagenet-10-512', 'imagenet-10-768')},
    'dvs128gesture-16-paper': ('dvs128gesture-16', {**_DVS_PAPER, 'epochs': 190}),
    'dvs128gesture-10-paper': ('dvs128gesture-10', {**_DVS_PAPER, 'epochs': 190}),
    'cifar10dvs-16-paper': ('cifar10dvs-16', _DVS_PAPER),
    'cifar10dvs-10-paper': ('cifar10dvs-10', _DVS_PAPER),
}
# name -> (dataset, stem, classes, T, mlp ratio, lr, epochs, paper top-1)
_DVS = {
    'dvs128gesture-16': ('dvs128_gesture', 'dvs_gesture', 11, 16, 4, 1e-3, 192, 98.80),
    'dvs128gesture-10': ('dvs128_gesture', 'dvs_gesture', 11, 10, 4, 1e-3, 192, 98.37),
    'cifar10dvs-16': ('cifar10_dvs', 'dvs_cifar10', 10, 16, 1, 5e-3, 96, 84.30),
    'cifar10dvs-10': ('cifar10_dvs', 'dvs_cifar10', 10, 10, 1, 5e-3, 96, 83.80),
}
VARIANTS = [*_IMAGENET, *_CIFAR, *_ABLATION, *_DVS, *_QKFORMER_DVS, *_GRID_H4, *_PAPER]


def _cifar(variant: str, classes: int):
  model = msvit.model_config('cifar', embed_dim=384, depth=4, num_heads=8, T=4,
                             num_classes=classes, img_size=32, variant=variant)
  data = config_lib.image_data(f'cifar{classes}', classes, 32)
  # MSViT's cifar100.yml keeps CIFAR-10's statistics: the default follows the
  # code; --config.data.norm_from=cifar100 uses CIFAR-100's own.
  data.norm_from = 'cifar10'
  c = config_lib.base_config(model, data, batch=64, epochs=400, lr=1e-3, wd=0.06, warmup=20,
                             warmup_lr=1e-5, min_lr=1e-5)
  # timm create_loader: the standard RandAugment set, not Spikformer's.
  c.data.augment.update(hflip=0.5, rand_augment='rand-m9-n1-mstd0.4-inc1', reprob=0.25)
  c.mixup.update(mixup_alpha=0.5, off_epoch=200)
  return c


def paper_row(name: str):
  """The config of row `name` (see the module docstring)."""
  if name in _PAPER:
    base, changes = _PAPER[name]
    return config_lib.apply_overrides(paper_row(base), changes, f'variant {name!r}: ')
  if name in _IMAGENET:
    variant, depth, dim, heads, paper = _IMAGENET[name]
    model = msvit.model_config('imagenet', embed_dim=dim, depth=depth, num_heads=heads, T=4,
                               num_classes=1000, img_size=224, variant=variant)
    c = config_lib.base_config(model, config_lib.image_data('imagenet2012', 1000, 224), batch=256,
                               epochs=200, lr=6e-4, wd=0.05, warmup=5, warmup_lr=0.0, min_lr=1e-7)
    c.cooldown_epochs = 0
    c.optimizer.update(schedule='mae_cosine', lr_scale_batch=True, accum_steps=2)
    # MAE's timm create_transform: no mixup; eval resizes to 256, crops 224.
    c.data.augment.update(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5,
                          rand_augment='rand-m9-mstd0.5-inc1', reprob=0.25, remode='pixel',
                          eval_crop_pct=224 / 256)
  elif name in _CIFAR:
    variant, classes, paper = _CIFAR[name]
    c = _cifar(variant, classes)
  elif name in _GRID_H4:
    variant, classes, paper = _CIFAR[_GRID_H4[name]]
    c = _cifar(variant, classes)
    c.model.stem = 'cifar_h4'
  elif name in _QKFORMER_DVS:
    dataset, classes, T, ratio, lr, min_lr, epochs, paper = _QKFORMER_DVS[name]
    model = msvit.model_config('dvs', embed_dim=256, num_heads=16, T=T, num_classes=classes,
                               img_size=128, mlp_ratio=ratio, stem='qkformer_dvs',
                               variant='qkformer')
    model.ssa_proj_lif_batch_as_time = True  # its SSA hands proj_lif [T*B, C, N], as MSViT's
    data = config_lib.data_config(dataset, classes, (T, 128, 128, 2), mean=(), std=())
    c = config_lib.base_config(model, data, batch=16, epochs=epochs, lr=lr, wd=0.06, warmup=10,
                               warmup_lr=1e-5, min_lr=min_lr)
    # train.py: flip and SNNAugmentWide per example (Gesture too), then mixup.
    c.data.augment.update(hflip=0.5, dvs_policy='snn_augment_wide')
    c.mixup.update(mixup_alpha=0.5, prob=0.5, off_epoch=75)
  elif name in _ABLATION:
    early, (kind3, kernels3), paper = _ABLATION[name]
    c = _cifar('msvit', 100)
    c.model.attention = ('mssa', 'mssa', kind3)
    c.model.mssa_kernels = (early, early, kernels3)
  else:
    dataset, stem, classes, T, ratio, lr, epochs, paper = _DVS[name]
    model = msvit.model_config('dvs', embed_dim=256, num_heads=16, T=T, num_classes=classes,
                               img_size=128, mlp_ratio=ratio, stem=stem)
    data = config_lib.data_config(dataset, classes, (T, 128, 128, 2), mean=(), std=())
    c = config_lib.base_config(model, data, batch=16, epochs=epochs, lr=lr, wd=0.06, warmup=10,
                               warmup_lr=1e-5)
    c.mixup.update(mixup_alpha=0.5, prob=0.5, off_epoch=75)  # the deleted trainers' defaults
  c.paper_top1 = paper
  return c


def get_config(arg: str = 'cifar10-4-384'):
  """`arg` = VARIANT[,runlocal]; see the module docstring."""
  name, local = config_lib.parse_arg(arg, 'cifar10-4-384', VARIANTS)
  c = paper_row(name)
  if local:
    c = config_lib.runlocal(c)
  c.name = f'msvit:{arg}'
  return c


SWEEPS = ('table3',)


def get_sweep(name: str):
  """Table 3 as overrides of the MSViT CIFAR-100 row (attention and the (Q, P)
  kernels per stage), named as the paper's rows."""
  if name == 'table3':
    rows = {'msvit': ((1, 3), ('ssa', (1, 3)), _CIFAR['cifar100-4-384'][2]),
            **{k.removeprefix('cifar100-ablation-'): v for k, v in _ABLATION.items()}}
    return [{'name': row, 'config': 'cifar100-4-384',
             'model.attention': ('mssa', 'mssa', kind3),
             'model.mssa_kernels': (early, early, kernels3), 'paper_top1': acc}
            for row, (early, (kind3, kernels3), acc) in rows.items()]
  raise errors.ConfigError(f'unknown sweep {name!r}; declared: {", ".join(SWEEPS)}.')
