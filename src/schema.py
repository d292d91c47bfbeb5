"""The schema every front door's config is composed onto: one dataclass per section, stored in Hydra's ConfigStore.

Hydra's structured-config pattern. A YAML file names its schema first in its defaults list
(``- /schema_objective_mae@_here_``), and the front door's own file names the run's
(``- schema_pretrain``). Composition then enforces each field's type and refuses a key the schema does not
have, naming it, before any of our code runs. A field's ``Check`` (a range, a set of names) is what a type
cannot say; ``src.config.validate`` runs them all. Fields have no defaults: the YAML files hold the values
(``launcher`` and the sections of ``logger`` alone are null unless launcher=slurm or logger=... sets them).

The schemas are registered under root names, not a config group, so ``--help`` offers none of them as a choice.
They live in this one light module (dataclasses only) so that a front door registers them before Hydra composes,
without the start-up cost of torch and Lightning.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from typing import Any, get_args

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, ListConfig

from src.config import Check, above, at_least, between, one_of, setting

# Names a key may take, stated once: src/methods reads OPTIMIZERS and DISTILLATIONS from here.
OPTIMIZERS = ("adamw", "lars")
POOLS = ("cls", "avg")  # the linear probe's feature: the final-normed cls token, or the mean of the patch tokens
DISTILLATIONS = ("none", "soft", "hard")
WANDB_MODES = ("auto", "online", "offline", "disabled")  # auto: online with a key and a server, else offline
PROGRESS_MODES = ("auto", "bar", "lines")  # src/pipeline/progress.py: auto is a bar in a terminal, else lines
INIT_KINDS = ("auto", "lightning", "export", "official", "random", "mimdet")  # src/encoders/loading.py reads each
TOKENIZER_KINDS = ("vq", "dalle")  # src/tokenizers loads each
# src/detection/evaluation.py: COCO AP through either backend (the same numbers), each -> what pip installs;
# objective.eval_backend=auto takes faster_coco_eval where it is installed (several times faster on large sets)
COCO_PACKAGES = {"pycocotools": "pycocotools", "faster_coco_eval": "faster-coco-eval"}
EVAL_BACKENDS = ("auto", *COCO_PACKAGES)
DETECT_BACKBONES = ("mimdet", "plain")  # src/detection: MIMDet (backbone.py), ViTDet (plain_backbone.py)
FPN_NORMS = ("", "syncbn")  # src/detection/backbone.py: after each FPN conv, nothing (convs with biases) or BatchNorm
BOX_LOSSES = ("l1", "smooth_l1")  # src/detection/detector.py: detectron2's L1 or torchvision's smooth L1 (beta 1/9)
STEM_STRIDE = 16  # MIMDet's ConvStem: the token grid of an image is its size / 16 (objective.table_size)
# src/pipeline/export.py: what a run writes at its end besides its weights (export_formats), docs/exports.md
EXPORT_FORMATS = ("hf", "onnx")
EACH_EXPORT_FORMAT = Check(lambda v: all(f in EXPORT_FORMATS for f in v), f"each must be one of {EXPORT_FORMATS}")


# ---- registries outside this repository, asked only when a config is checked ---------------------------------------
@cache
def precisions() -> tuple[str, ...]:
    """What Lightning accepts as a precision (its own type), plus our "auto"."""
    from lightning.fabric.connector import _PRECISION_INPUT

    return tuple(dict.fromkeys(("auto", *(str(v) for arg in get_args(_PRECISION_INPUT) for v in get_args(arg)))))


@cache
def accelerators() -> tuple[str, ...]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


@cache
def strategies() -> tuple[str, ...]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *StrategyRegistry.available_strategies())


def installed_eval_backends() -> tuple[str, ...]:
    """The COCO backends importable here (found, not imported: asking costs nothing at composition)."""
    return tuple(name for name in COCO_PACKAGES if importlib.util.find_spec(name) is not None)


def _installed_backend_choices() -> str:
    """The choices that work here, and the pip command for the backends that are not installed."""
    installed = installed_eval_backends()
    missing = " ".join(package for name, package in COCO_PACKAGES.items() if name not in installed)
    return f"must be one of {('auto', *installed)}" + (f" (not installed: `pip install {missing}`)" if missing else "")


INSTALLED_EVAL_BACKEND = Check(lambda v: v == "auto" or v in installed_eval_backends(), _installed_backend_choices)


def is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


# ---- checks of one key whose value has a shape ----------------------------------------------------------------
def _device_indices(value: Any) -> bool:
    """A list of distinct GPU indices (``trainer.devices=[0,1]``), as Lightning takes it."""
    indices = list(value) if isinstance(value, (ListConfig, list)) else []
    ints = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
    return bool(indices) and ints and len(set(indices)) == len(indices)


DEVICES = Check(
    lambda v: (
        v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v >= 1)) or _device_indices(v)
    ),
    "must be auto, a positive integer, -1 (every GPU) or a list of GPU indices such as [0,1]",
)
NO_LIMIT_OR_AT_LEAST_1 = Check(lambda v: v == -1 or v >= 1, "must be -1 (no limit) or at least 1")
CROP_SCALE = Check(
    lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
    "must be null (no crop: resize and flip) or [low, high] with 0 < low <= high <= 1",
)
RGB = Check(lambda v: len(v) == 3, "needs 3 values (images are 3-channel)")
RGB_SPREAD = Check(lambda v: len(v) == 3 and min(v) > 0, "needs 3 positive values")
POSITIVE_INTS = Check(
    lambda v: len(v) > 0 and all(x > 0 for x in v),
    "must be a non-empty list of positive integers (shortest-edge sizes)",
)


# ---- sections every run shares ----------------------------------------------------------------------------------
@dataclass
class Encoder:
    name: str = MISSING
    arch: str = MISSING  # a timm name our encoders register (src/encoders)
    kwargs: dict[str, Any] = MISSING  # passed to timm.create_model; open to new keys (+encoder.kwargs.depth=4)


@dataclass
class Dataset:
    """The keys of every kind of data; each kind's schema adds its own, and its data kind checks its files."""

    name: str = MISSING
    kind: str = MISSING
    mean: list[float] = setting(RGB)
    std: list[float] = setting(RGB_SPREAD)
    num_classes: int | None = setting(at_least(1))


@dataclass
class ImageDataset(Dataset):
    """The kinds ImageDataModule reads: images at one size, and a labelled split the kNN evaluation reads."""

    img_size: int = setting(at_least(1))
    knn_bank: int | None = setting(at_least(1))
    knn_queries: int | None = setting(at_least(1))


@dataclass
class FashionMnist(ImageDataset):
    root: str = MISSING
    train_limit: int | None = setting(at_least(1))
    tensor_transforms: bool = MISSING
    device_transforms: bool = MISSING


@dataclass
class ImageFolder(ImageDataset):
    root: str = MISSING
    val_root: str | None = MISSING
    train_limit: int | None = setting(at_least(1))


@dataclass
class Shards(ImageDataset):
    train_urls: Any = MISSING  # a brace pattern or a list of them (src/data/shards.py reads either)
    val_urls: Any = MISSING
    samples_per_epoch: int | None = setting(at_least(1))
    resampled: bool = MISSING
    shuffle_buffer: int = MISSING


@dataclass
class CocoSizes:
    train: list[int] = setting(POSITIVE_INTS)
    test: int = setting(at_least(1))
    max: int = setting(at_least(1))


@dataclass
class CocoCrop:
    prob: float = setting(between(0, 1))
    sizes: list[int] = setting(POSITIVE_INTS)
    range: list[int] = setting(
        Check(lambda v: len(v) == 2 and 0 < v[0] <= v[1], "must be [min, max] positive integers, min <= max")
    )


@dataclass
class Coco(Dataset):
    """COCO-format instances (src/detection/data.py), built into ``root`` first when ``build`` names a builder."""

    num_classes: int = setting(at_least(1))
    root: str = MISSING
    build: str | None = MISSING
    build_args: dict[str, Any] = MISSING
    train_annotations: str = MISSING
    val_annotations: str = MISSING
    images: Any = setting(
        Check(lambda v: isinstance(v, str) or set(v) == {"train", "val"}, "must be a folder or {train: .., val: ..}")
    )
    masks: bool = MISSING
    sizes: CocoSizes = MISSING
    crop: CocoCrop = MISSING


@dataclass
class Trainer:
    """Lightning Trainer arguments (conf/trainer/), and ours: ``compile``, ``timeout_s``."""

    accelerator: str = setting(one_of(accelerators))
    devices: Any = setting(DEVICES)
    num_nodes: int = setting(at_least(1))
    strategy: str = setting(one_of(strategies))
    precision: str = setting(one_of(precisions))
    max_epochs: int | None = setting(NO_LIMIT_OR_AT_LEAST_1)
    max_steps: int = setting(NO_LIMIT_OR_AT_LEAST_1)
    accumulate_grad_batches: int = setting(at_least(1))
    gradient_clip_val: float | None = setting(at_least(0))
    log_every_n_steps: int = setting(at_least(1))
    num_sanity_val_steps: int = setting(at_least(-1, "-1: all"))
    compile: bool = MISSING
    timeout_s: float = setting(above(0, "seconds a rank waits for the others in a collective"))
    progress: str = setting(one_of(PROGRESS_MODES))


@dataclass
class DdpTrainer(Trainer):
    sync_batchnorm: bool = MISSING


@dataclass
class Fsdp:
    """FSDP2 (src/pipeline/strategy.py: FullyShardedStrategy)."""

    reshard_after_forward: bool = MISSING
    hybrid: bool = MISSING
    activation_checkpointing: bool = MISSING


@dataclass
class FsdpTrainer(Trainer):
    fsdp: Fsdp = MISSING


@dataclass
class Wandb:
    project: str = MISSING
    entity: str | None = MISSING
    mode: str = setting(one_of(WANDB_MODES))


@dataclass
class TensorBoard:
    save_dir: str | None = MISSING  # null: the run folder's tensorboard/; a folder: <folder>/<run_name>


@dataclass
class MLflow:
    tracking_uri: str | None = MISSING  # null: a file store in the run folder (mlruns/); else a server or a store
    experiment: str = MISSING


@dataclass
class Logger:
    """One section per logger the run writes to besides its CSV log: conf/logger/ (``logger=[wandb,tensorboard]``)
    sets the sections it chooses, and an absent section is a logger that does not run."""

    wandb: Wandb | None = None
    tensorboard: TensorBoard | None = None
    mlflow: MLflow | None = None


@dataclass
class KnnVote:
    """The weighted kNN vote's settings: the same for the online monitor (``knn.``) and the evaluation."""

    k: int = setting(at_least(1, "the neighbours that vote"))
    temperature: float = setting(above(0, "the votes are exp(sim / T)"))


@dataclass
class KnnMonitor(KnnVote):
    every_n_epochs: int = setting(at_least(1))


@dataclass
class Pictures:
    every_n_steps: int = MISSING
    num_images: int = MISSING


@dataclass
class SlurmLauncher:
    """conf/launcher/slurm.yaml: the world of a SLURM job, which the Trainer follows."""

    nodes: int = MISSING
    gpus_per_node: int = MISSING
    cpus_per_task: int = MISSING
    mem_gb: int | None = MISSING
    partition: str | None = MISSING
    timeout_min: int = MISSING
    signal_delay_s: int = MISSING


# ---- the methods' sections (``objective``) ------------------------------------------------------------------------
@dataclass
class Optim:
    """lr = base_lr x global batch / reference_batch."""

    base_lr: float = setting(above(0))
    reference_batch: int = setting(at_least(1))
    betas: list[float] = MISSING
    weight_decay: float = setting(at_least(0))
    fused: bool | None = None  # AdamW's fused kernel; null: on a GPU only (src/methods/optim.py)


@dataclass
class CosineOptim(Optim):
    """AdamW, warmed up, then a half-cosine down to ``min_lr``."""

    min_lr: float = MISSING


@dataclass
class NamedOptim(CosineOptim):
    name: str = setting(one_of(OPTIMIZERS))


@dataclass
class LinearOptim(NamedOptim):
    momentum: float = MISSING  # lars only


@dataclass
class DetectOptim(Optim):
    """Detection's step schedule has no floor."""

    name: str = setting(one_of(OPTIMIZERS))


@dataclass
class Augment:
    """conf/augment/: per-sample augmentation (timm), and mixup/cutmix per batch."""

    rand_augment: str | None = MISSING
    crop_scale: list[float] = MISSING
    hflip: float = MISSING
    color_jitter: float | None = MISSING
    random_erasing: float = setting(at_least(0))
    mixup: float = setting(at_least(0))
    cutmix: float = setting(at_least(0))
    mix_prob: float = setting(at_least(0))
    switch_prob: float = setting(at_least(0))
    label_smoothing: float = setting(at_least(0))
    repeated_aug: int = setting(at_least(1, "1 = off"))


@dataclass
class FineTuneAugment(Augment):
    repeated_aug: int = setting(Check(lambda v: v == 1, "must be 1: fine-tuning samples each image once per epoch"))


@dataclass
class Objective:
    name: str = MISSING  # the method (src/methods/__init__.py METHODS)


@dataclass
class MAEObjective(Objective):
    mask_ratio: float = setting(between(0, 1, "[)"))
    crop_scale: list[float] | None = setting(CROP_SCALE)
    norm_pix_loss: bool = MISSING
    token_drop: bool = MISSING
    target_patch: int | None = MISSING
    decoder_dim: int = setting(Check(lambda v: v % 4 == 0, "must be divisible by 4 (sin-cos table)"))
    decoder_depth: int = setting(at_least(1))
    decoder_heads: int = MISSING
    optim: CosineOptim = MISSING


@dataclass
class BlockMask:
    num_patches: int | None = MISSING
    min_block: int | None = MISSING
    min_aspect: float = MISSING
    max_tries: int = MISSING


@dataclass
class TokenizerFile:
    kind: str = setting(one_of(TOKENIZER_KINDS))
    path: str = MISSING
    allow_pickle: bool = MISSING


@dataclass
class BEiTObjective(Objective):
    target_patch: int | None = MISSING
    drop_path_rate: float | None = setting(between(0, 1, "[)"))
    crop_scale: list[float] = MISSING
    mask: BlockMask = MISSING
    tokenizer: TokenizerFile = MISSING
    optim: CosineOptim = MISSING


@dataclass
class Teacher:
    arch: str = MISSING
    kwargs: dict[str, Any] = MISSING
    checkpoint: str | None = MISSING
    allow_pickle: bool = MISSING
    img_size: int | None = MISSING
    mean: list[float] | None = MISSING
    std: list[float] | None = MISSING
    adapt_input: bool = MISSING


@dataclass
class SupervisedObjective(Objective):
    augment: Augment = MISSING
    optim: CosineOptim = MISSING


@dataclass
class DeiTObjective(SupervisedObjective):
    distillation: str = setting(one_of(DISTILLATIONS))
    alpha: float = setting(between(0, 1))
    tau: float = setting(above(0))
    teacher: Teacher = MISSING


@dataclass
class ClassifyObjective(Objective):
    augment: FineTuneAugment = MISSING
    global_pool: str = MISSING
    drop_path: float = setting(between(0, 1, "[)"))
    layer_decay: float = setting(between(0, 1, "(]", "1 = no decay"))
    optim: NamedOptim = MISSING


@dataclass
class LinearObjective(Objective):
    augment: FineTuneAugment = MISSING
    pool: str = setting(one_of(POOLS))
    optim: LinearOptim = MISSING


@dataclass
class KnnObjective(KnnVote, Objective):
    pixels: bool = MISSING


@dataclass
class DetectObjective(Objective):
    backbone: str = setting(one_of(DETECT_BACKBONES))
    train_ratio: float = setting(between(0, 1, "(]"))
    eval_ratio: float = setting(between(0, 1, "(]"))
    compare_train_ratio: bool = MISSING
    pretrain_img_size: int | None = MISSING
    decoder_depth: int = setting(at_least(1))
    decoder_dim: int = MISSING
    decoder_heads: int = MISSING
    random_decoder: bool = MISSING
    drop_path: float = setting(between(0, 1, "[)"))
    lr_mult: float = setting(above(0))
    lr_milestones: list[float] = MISSING
    fpn_channels: int = setting(at_least(8))
    roi_samples: int = setting(at_least(1))
    test_proposals: int = setting(at_least(1))
    anchor_sizes: list[int] = setting(Check(lambda v: len(v) == 5 and min(v) > 0, "needs 5 positive sizes (P2..P6)"))
    eval_every_n_epochs: int = setting(at_least(1))
    eval_backend: str = setting(INSTALLED_EVAL_BACKEND)
    table_size: int | None = setting(
        Check(lambda v: v is None or (v >= STEM_STRIDE and v % STEM_STRIDE == 0), "must be null or a multiple of 16")
    )
    layer_norm_eps: float = setting(above(0))
    fpn_norm: str = setting(one_of(FPN_NORMS))
    box_loss: str = setting(one_of(BOX_LOSSES))
    warmup_factor: float = setting(between(0, 1))
    iters_per_epoch: int | None = setting(Check(lambda v: v is None or v >= 1, "must be null or at least 1"))
    grad_checkpointing: bool = MISSING
    optim: DetectOptim = MISSING


@dataclass
class TokenizerObjective:
    """BEiT's VQ tokenizer, trained by ``python -m src.train_tokenizer``."""

    kind: str = setting(one_of(("vq",), "only a VQ tokenizer is trained here; DALL-E's is loaded from a file"))
    vocab_size: int = setting(at_least(2))
    downsample: int = setting(at_least(1, "pixels per token side"))
    img_size: int = setting(at_least(1))
    hidden: int = MISSING
    code_dim: int = MISSING
    res_blocks: int = MISSING
    commitment: float = MISSING
    ema_decay: float = MISSING
    restart_threshold: float = MISSING
    optim: CosineOptim = MISSING


# ---- the runs: one schema per front door ------------------------------------------------------------------------
@dataclass
class Run:
    """The keys every front door's config holds."""

    dataset: Dataset = MISSING
    trainer: Trainer = MISSING
    logger: Logger = MISSING
    objective: Any = MISSING  # each objective file names its own schema
    method: str = MISSING
    run_name: str = MISSING
    runs_dir: str = MISSING
    run_dir: str = MISSING
    resume: bool | str = setting(one_of(("auto", True, False)))
    resume_changes: list[str] = MISSING
    takeover: bool = MISSING
    show_config: bool = MISSING
    seed: int = MISSING
    batch_size: int = setting(at_least(1))
    num_workers: int = setting(at_least(0))
    epochs: int = setting(above(0))
    warmup_epochs: float = setting(at_least(0))
    checkpoint_every_n_steps: int = MISSING
    max_nonfinite_steps: int = setting(at_least(1))
    pictures: Pictures = MISSING
    launcher: SlurmLauncher | None = None  # launcher=slurm sets it


@dataclass
class PretrainRun(Run):
    encoder: Encoder = MISSING
    export: bool = MISSING
    export_formats: list[str] = setting(EACH_EXPORT_FORMAT)
    knn: KnnMonitor | None = MISSING


@dataclass
class Init:
    checkpoint: str | None = MISSING
    kind: str = setting(one_of(INIT_KINDS))
    encoder_from_checkpoint: bool = MISSING
    strict: bool = MISSING
    norm_to_fc_norm: bool = MISSING
    allow_pickle: bool = MISSING


@dataclass
class FinetuneRun(PretrainRun):
    init: Init = MISSING


@dataclass
class TokenizerRun(Run):
    objective: TokenizerObjective = MISSING
    dataset: ImageDataset = MISSING
    report_images: int = MISSING


@dataclass
class Model:
    arch: str = setting(Check(is_timm_model, "must be a timm model name (e.g. resnet18)"))
    kwargs: dict[str, Any] = MISSING


@dataclass
class SupervisedRun(Run):
    objective: SupervisedObjective = MISSING
    model: Model = MISSING
    export: bool = MISSING
    export_formats: list[str] = setting(EACH_EXPORT_FORMAT)
    knn: KnnMonitor | None = MISSING


# Each YAML file names its schema by these: the front doors' files, conf/pretrain/objective/, conf/finetune/objective/,
# conf/dataset/ and the trainers that add keys (conf/trainer/ddp.yaml, fsdp.yaml).
SCHEMAS: dict[str, type] = {
    "schema_pretrain": PretrainRun,
    "schema_finetune": FinetuneRun,
    "schema_tokenizer": TokenizerRun,
    "schema_supervised": SupervisedRun,
    "schema_objective_mae": MAEObjective,
    "schema_objective_beit": BEiTObjective,
    "schema_objective_deit": DeiTObjective,
    "schema_objective_classify": ClassifyObjective,
    "schema_objective_linear": LinearObjective,
    "schema_objective_knn": KnnObjective,
    "schema_objective_detect": DetectObjective,
    "schema_dataset_fashion_mnist": FashionMnist,
    "schema_dataset_image_folder": ImageFolder,
    "schema_dataset_shards": Shards,
    "schema_dataset_coco": Coco,
    "schema_trainer_ddp": DdpTrainer,
    "schema_trainer_fsdp": FsdpTrainer,
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore; the front doors (and tests) call it before composing."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=name, node=schema)
