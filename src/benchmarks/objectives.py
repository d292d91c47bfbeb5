"""Benchmark sections on what a training step costs: each objective against the hardware (``objectives``: images/s,
memory, FLOPs, MFU) and the toolkit's steps against their peers (``peers``: timm's supervised ViT-B/16 step, a
plain MAE written from the paper). Pale-T against timm's Swin-T is ``pale_vs_swin`` (src/benchmarks/pale.py).

Every step is the library's own: the method's class built directly (as its ``from_config`` builds it, from the
repository's conf/ and recipe files), its ``compute_loss``, backward and AdamW, on random data. Frozen parts are
randomly initialised: their weights do not change the work.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import numpy as np
import timm
import torch
from omegaconf import DictConfig, OmegaConf

from src.benchmarks.core import (
    StepSetup,
    Table,
    config,
    counted,
    format_mib,
    format_ratio,
    measure_interleaved,
    median,
    memory_kind,
    optimizer_step,
    paired_ratio,
    precision,
    round_ratios,
    section,
    timing_note,
    train_step,
)
from src.benchmarks.mae import mae_step
from src.benchmarks.pale_profile import kinds_table
from src.benchmarks.plain_mae import plain_mae_step
from src.encoders import create_encoder
from src.methods.beit import BEiT
from src.methods.deit import DeiT, student_encoder_config
from src.methods.grid import target_layout
from src.methods.masking import BlockwiseMaskGenerator, beit_mask_counts
from src.methods.teacher import FrozenTeacher, InputSpec
from src.tokenizers import VQTokenizer

NUM_CLASSES = 1000
DEIT_RECIPE = config("recipes/pretrain/deit_vit_b_in1k_300ep_hard.yaml")
TEACHER = DEIT_RECIPE.objective.teacher.arch  # regnety_160: the DeiT paper's RegNetY-16GF
PALE_T = config("conf/encoder/pale_t.yaml")
# objective -> encoder label -> encoder config: the ViT-B/16 of each paper's recipe, and Pale-T
ENCODERS: dict[str, dict[str, DictConfig]] = {
    "MAE": {"ViT-B/16": config("conf/encoder/vit_b.yaml"), "Pale-T": PALE_T},
    "BEiT": {"ViT-B/16": config("conf/encoder/beit_b.yaml"), "Pale-T": PALE_T},
    "DeiT": {"ViT-B/16": config("conf/encoder/vit_b.yaml", kwargs=DEIT_RECIPE.encoder.kwargs), "Pale-T": PALE_T},
}
TIMM_VIT = "vit_base_patch16_224"  # timm's own ViT-B/16, the supervised peer
PLAIN_VIT = {"patch_size": 16, "dim": 768, "depth": 12, "heads": 12}  # the plain MAE's encoder: ViT-B/16, as vit_b
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets. The first key found in
# torch.cuda.get_device_name wins, so a name that contains another comes before it.
PEAK_BF16_TFLOPS = {
    "H200 NVL": 835.0,
    "H200": 989.0,  # SXM
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
}


def beit_step(encoder: DictConfig, batch: int, img_size: int, device: torch.device) -> Callable[[], None]:
    """BEiT's step as ``BEiT.from_config`` builds it (conf/pretrain/objective/beit.yaml: drop path, 16 px targets),
    with this toolkit's VQ tokenizer (conf/tokenizer/tokenizer.yaml, random, frozen) on the view at (target grid) x its
    downsampling, and blockwise masks drawn here, as the data workers draw them outside the step."""
    objective = config("conf/pretrain/objective/beit.yaml")
    model_encoder = create_encoder(encoder, img_size, drop_path_rate=objective.drop_path_rate)
    layout = target_layout(model_encoder, img_size, objective.target_patch)
    tokenizer_conf = OmegaConf.to_container(config("conf/tokenizer/tokenizer.yaml").objective)
    kwargs = {k: v for k, v in tokenizer_conf.items() if k not in ("kind", "optim")}
    view = layout.target_grid[0] * kwargs["downsample"]
    tokenizer = VQTokenizer(**{**kwargs, "img_size": view})
    optim = OmegaConf.to_container(objective.optim)
    model = BEiT(model_encoder, tokenizer, img_size, optim, batch, 1, target_patch=objective.target_patch).to(device)
    masks = BlockwiseMaskGenerator(
        layout.target_grid,
        *beit_mask_counts(layout.num_targets),
        min_aspect=objective.mask.min_aspect,
        max_tries=objective.mask.max_tries,
    )
    rng = np.random.default_rng(0)
    data = {
        "image": torch.randn(batch, 3, img_size, img_size, device=device),
        "tokenizer_image": torch.rand(batch, 3, view, view, device=device),
        "mask": torch.from_numpy(np.stack([masks(rng) for _ in range(batch)])).to(device),
    }
    return optimizer_step(lambda: model.compute_loss(data)[0], model.parameters(), mixed=True)


def deit_step(
    encoder: DictConfig, teacher: str | None, mix: bool, batch: int, img_size: int, device: torch.device
) -> Callable[[], None]:
    """DeiT's step as ``DeiT.from_config`` builds it: the student of ``student_encoder_config`` and
    conf/pretrain/objective's distillation from ``teacher`` (a timm arch, random, frozen), or no teacher
    (distillation none: the supervised baseline). ``mix``: mixup/cutmix as conf/augment/deit.yaml (they run in the
    step); else off."""
    objective = config("conf/pretrain/objective/deit.yaml")
    augment = OmegaConf.to_container(config("conf/augment/deit.yaml"))
    if not mix:
        augment.update(mixup=0.0, cutmix=0.0)
    run = OmegaConf.create({"encoder": encoder, "dataset": {"img_size": img_size}})
    student, pooled_dist_head = student_encoder_config(run, teacher is not None)
    frozen = None
    if teacher is not None:
        spec = InputSpec.of(img_size, (0.5,) * 3, (0.5,) * 3)
        frozen = FrozenTeacher(timm.create_model(teacher, num_classes=NUM_CLASSES), spec, spec, adapt=False)
    model = DeiT(
        create_encoder(student, img_size, num_classes=NUM_CLASSES),
        NUM_CLASSES,
        augment,
        None,
        OmegaConf.to_container(objective.optim),
        batch,
        1,
        teacher=frozen,
        distillation=objective.distillation if teacher is not None else "none",
        alpha=objective.alpha,
        tau=objective.tau,
        pooled_dist_head=pooled_dist_head,
    ).to(device)
    data = {
        "image": torch.randn(batch, 3, img_size, img_size, device=device),
        "label": torch.randint(0, NUM_CLASSES, (batch,), device=device),
    }
    return optimizer_step(lambda: model.compute_loss(data)[0], model.parameters(), mixed=True)


def objective_setup(objective: str, encoder: DictConfig, batch: int, img_size: int) -> StepSetup:
    """The library's step of ``objective`` on ``encoder``, its FLOPs counted in the measuring process."""
    steps = {
        "MAE": partial(mae_step, encoder, True, batch, img_size),
        "BEiT": partial(beit_step, encoder, batch, img_size),
        "DeiT": partial(deit_step, encoder, TEACHER, True, batch, img_size),
    }
    return partial(counted, steps[objective])


def known_peak(device_name: str) -> float | None:
    """The table's dense bf16 peak for a CUDA device name (``torch.cuda.get_device_name``); None if not listed."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def device_peak(args: argparse.Namespace) -> tuple[float, str] | None:
    """(dense bf16 peak in TFLOP/s, where it comes from) of the GPU measured; None on the CPU or for unknown GPUs."""
    if torch.device(args.device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(args.device)
    if args.peak_tflops:
        return args.peak_tflops, f"{name}, from --peak-tflops"
    known = known_peak(name)
    return None if known is None else (known, f"{name}, NVIDIA's datasheet")


def mfu_note(args: argparse.Namespace, peak: tuple[float, str] | None) -> str:
    if peak is not None:
        return (
            f"MFU = counted FLOPs per step / wall seconds per step / {peak[0]:g} TFLOP/s (dense bf16 peak: {peak[1]})"
        )
    if torch.device(args.device).type == "cuda":
        return f"MFU: no peak known for {torch.cuda.get_device_name(args.device)}: give --peak-tflops"
    return "MFU: GPUs only (against their dense bf16 peak)"


@section("objectives", "MAE, BEiT and DeiT training steps on ViT-B/16 and Pale-T: images/s, memory, FLOPs, MFU")
def objectives(args: argparse.Namespace) -> Table:
    peak = device_peak(args)
    cuda = torch.device(args.device).type == "cuda"
    contenders = [(name, label, conf) for name, encoders in ENCODERS.items() for label, conf in encoders.items()]
    rows = []
    for batch in args.batch_size:
        setups = [objective_setup(name, conf, batch, args.img_size) for name, _, conf in contenders]
        for (name, label, _), runs in zip(contenders, measure_interleaved(setups, args), strict=True):
            result = median(runs)
            achieved = result.flops / result.seconds
            mfu = f"{100 * achieved / (peak[0] * 1e12):.1f} %" if peak else ("?" if cuda else "-")
            rows.append(
                [
                    str(batch),
                    name,
                    label,
                    precision(args.device),
                    f"{batch / result.seconds:.2f}",
                    format_mib(result.peak_bytes),
                    f"{result.flops / batch / 1e9:.3g}",
                    f"{achieved / 1e12:.3g}",
                    mfu,
                ]
            )
    return Table(
        f"Training step per objective, {args.img_size} px, {args.device}",
        [
            "batch",
            "objective",
            "encoder",
            "precision",
            "images/s (wall)",
            "peak MiB",
            "GFLOP / image",
            "TFLOP/s",
            "MFU",
        ],
        rows,
        [
            "step = the method's compute_loss (its class built as from_config builds it), backward, AdamW, on random "
            "data; encoders as conf/encoder: vit_b, beit_b (BEiT), vit_b with the DeiT recipe's kwargs (learned "
            "position embedding, drop path 0.1), pale_t",
            "MAE: mask 0.75, 8-block 512-wide decoder, norm_pix (Pale: mask token at the stem, 32 px targets); BEiT: "
            "blockwise masks (drawn in setup, as the data workers do), the toolkit's VQ tokenizer (random, frozen), "
            f"drop path 0.1, 16 px targets; DeiT: hard distillation from a frozen random {TEACHER} (the DeiT-B "
            "recipe's teacher), mixup/cutmix as conf/augment/deit.yaml",
            "FLOPs: torch.utils.flop_counter.FlopCounterMode over one whole step (forward + backward counted once, "
            "not 3x forward) in the measuring process, before the warm-up; matmuls, convolutions and attention (the "
            "CPU's fused kernel by torch's SDPA formulas), the frozen tokenizer's and teacher's forwards included "
            "(work the step does), elementwise ops and AdamW not",
            mfu_note(args, peak),
            timing_note(args),
            memory_kind(args.device),
        ],
    )


@section("peers", "our steps against peers: timm's ViT-B/16 supervised step, a plain MAE from the paper")
def peers(args: argparse.Namespace) -> Table:
    mae_vit = ENCODERS["MAE"]["ViT-B/16"]
    supervised_vit = OmegaConf.merge(ENCODERS["DeiT"]["ViT-B/16"], {"kwargs": {"drop_path_rate": 0.0}})
    rows, notes, size = [], [], args.img_size
    for batch in args.batch_size:
        pairs = [
            (
                "timm",
                f"timm {TIMM_VIT}, cross-entropy",
                partial(train_step, TIMM_VIT, batch, size, mixed=True),
                f"ours: DeiT, distillation none ({supervised_vit.arch})",
                partial(deit_step, supervised_vit, None, False, batch, size),
            ),
            (
                "plain",
                "plain MAE from the paper (plain_mae.py)",
                partial(plain_mae_step, PLAIN_VIT, batch, size),
                f"ours: MAE ({mae_vit.arch})",
                partial(mae_step, mae_vit, True, batch, size),
            ),
        ]
        for peer, peer_label, peer_setup, our_label, our_setup in pairs:
            peer_runs, our_runs = measure_interleaved([peer_setup, our_setup], args)
            theirs, ours = median(peer_runs), median(our_runs)
            for label, result in ((peer_label, theirs), (our_label, ours)):
                rows.append(
                    [
                        str(batch),
                        label,
                        f"{result.seconds:.3g}",
                        f"{result.cpu_seconds:.3g}",
                        f"{batch / result.seconds:.2f}",
                        format_mib(result.peak_bytes),
                    ]
                )
            rows.append(
                [
                    str(batch),
                    f"**ours / {peer}**",
                    f"**{paired_ratio(our_runs, peer_runs):.2f}**",
                    f"{paired_ratio(our_runs, peer_runs, 'cpu_seconds'):.2f}",
                    "",
                    format_ratio(ours.peak_bytes, theirs.peak_bytes),
                ]
            )
            notes.append(f"batch {batch}, ours / {peer}: time ratio per round {round_ratios(our_runs, peer_runs)}")
    return Table(
        f"Our training steps against peers, {args.img_size} px, {args.device}",
        ["batch", "step", "s / step (wall)", "CPU s / step", "images/s (wall)", "peak MiB"],
        rows,
        [
            f"timm: timm's {TIMM_VIT} step (forward, cross-entropy, backward, AdamW) against DeiT.compute_loss without "
            "teacher on the same architecture (learned position embedding, no drop path, 1000 classes; mixup/cutmix "
            "off, label smoothing 0.1)",
            "plain: a plain MAE written from the paper (src/benchmarks/plain_mae.py: unfused softmax(q k^T / sqrt(d)) "
            "v attention, LayerNorm, MLP, norm_pix MSE on removed patches) against MAE.compute_loss, both ViT-B/16 "
            "with an 8-block 512-wide decoder, mask ratio 0.75, AdamW",
            "ratio rows: ours divided by the peer, column by column (time below 1: ours is faster; the issue's CPU "
            "target for ours / plain is 0.9 or less at batch 8); Pale-T against timm's Swin-T: section pale_vs_swin",
            f"{precision(args.device)} for every step; {timing_note(args)}",
            memory_kind(args.device),
            *notes,
        ],
    )


@section("mae_profile", "where our MAE step and the plain MAE's spend their time (profiler, CPU), 1 vs N threads")
def mae_profile(args: argparse.Namespace) -> Table:
    batch, size = args.batch_size[0], args.img_size
    contenders = {
        "ours": partial(mae_step, ENCODERS["MAE"]["ViT-B/16"], True, batch, size),
        "plain": partial(plain_mae_step, PLAIN_VIT, batch, size),
    }
    return kinds_table(
        f"MAE ViT-B/16 step by kind of op, ours against the plain MAE, batch {batch}, {size} px, cpu",
        contenders,
        args,
        "step = MAE loss (mask 0.75, 8-block 512-wide decoder, norm_pix), backward, AdamW; the plain MAE's attention "
        "is bmm + softmax (its bmm count as matrix multiplies)",
    )
