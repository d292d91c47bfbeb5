"""A run's exports rebuilt from its folder: what ``python -m src.export`` does, and the last step of every run.

The run's method is rebuilt from its recorded config (with the pickle permission of the command, never the file's:
a run folder is data, not code) and loaded, weights only, from the checkpoint a resume would continue from.

Formats (``FORMATS``, docs/exports.md): ``weights`` are the method's own files (the encoder in timm naming, the
official layouts, classifiers, tokenizers); ``hf`` the encoder as a Hugging Face Hub folder (``hub_export.py``);
``onnx`` the encoder, and a detection run's detector, checked with onnxruntime (``onnx_export.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from timm.models import get_model_input_config
from torch import nn

from src.config import ConfigError
from src.encoders.loading import InitCheckpoint, load_strict
from src.files import PickleRefused, first_line, read_weights, tensors_only
from src.methods import method_class
from src.methods.base import TrainingMethod
from src.methods.detect import Detection
from src.pipeline.hub_export import write_hub_folder
from src.pipeline.onnx_export import write_detector_onnx, write_encoder_onnx
from src.pipeline.run_folder import CONFIG_FILE, load_recorded, resume_checkpoint
from src.schema import EXPORT_FORMATS
from src.shards import is_sharded, read_sharded

PICKLE_KEY = "allow_pickle"
FORMATS = ("weights", *EXPORT_FORMATS)  # weights: the method's own files (``TrainingMethod.export``)
HUB_FOLDER = "hf"  # the Hub folder's name under the export folder


def with_pickle_permission(node: Any, allow: bool) -> Any:
    """``node`` (a plain container) with every ``allow_pickle`` key, however deep, set to ``allow``."""
    if isinstance(node, dict):
        return {k: allow if k == PICKLE_KEY else with_pickle_permission(v, allow) for k, v in node.items()}
    if isinstance(node, list):
        return [with_pickle_permission(v, allow) for v in node]
    return node


def pickle_permissions(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a config (as a plain container) whose ``allow_pickle`` is true."""
    if not isinstance(node, dict):
        return []
    keys = []
    for k, v in node.items():
        if k == PICKLE_KEY:
            keys += [f"{prefix}{k}"] if v is True else []
        else:
            keys += pickle_permissions(v, f"{prefix}{k}.")
    return keys


def pickle_allowed(node: Any) -> bool:
    """Whether a config composed from a command line (as a plain container) sets some ``allow_pickle`` true: the
    permission a run's own export of its checkpoint passes on to ``export_run``."""
    return bool(pickle_permissions(node))


def recorded_config(run_dir: Path, allow_pickle: bool) -> DictConfig:
    """The config the run recorded, with the pickle permission of the command instead of the file's."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{config_file} not found: is {run_dir} a run folder made by this toolkit?")
    try:  # recorded resolved: an interpolation was written by someone else, and must resolve here or be named
        recorded = OmegaConf.to_container(load_recorded(config_file), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{config_file} cannot be resolved ({first_line(e)}): the run folder is damaged") from None
    return OmegaConf.create(with_pickle_permission(recorded, allow_pickle))


def checkpoint_state(run_dir: Path, checkpoint: Path | None) -> tuple[Path, dict]:
    """The checkpoint to export and its state dict; without ``checkpoint``, the one a resume would continue from."""
    if checkpoint is None:
        checkpoint = resume_checkpoint(run_dir, "auto")  # an unreadable newer one is passed over with a warning
        if checkpoint is None:
            raise ConfigError(f"{run_dir} holds no checkpoint (checkpoints/last.ckpt): has this run trained yet?")
    if is_sharded(checkpoint):  # trainer=fsdp: the shards gathered here, in one process
        return checkpoint, read_sharded(checkpoint)
    try:
        raw = read_weights(checkpoint, "checkpoint")
    except PickleRefused:
        raise ConfigError(
            f"checkpoint={checkpoint} pickles Python objects: checkpoints of this toolkit hold weights only, so this "
            "file is not one of them, and export never unpickles a checkpoint"
        ) from None
    return checkpoint, tensors_only(raw.get("state_dict"), "checkpoint", checkpoint)


def export_run(
    run_dir: Path,
    checkpoint: Path | None = None,
    out_dir: Path | None = None,
    allow_pickle: bool = False,
    formats: Sequence[str] = ("weights",),
) -> dict[str, Path]:
    """Rebuild the run of ``run_dir`` from its recorded config, load its checkpoint and write its exports in
    ``formats`` (``FORMATS``).

    ``allow_pickle`` is the permission of the person typing the command (``--allow-pickle``) to unpickle the
    files the config names; the recorded config never grants it.
    """
    cfg = recorded_config(run_dir, allow_pickle)
    method = method_class(cfg.get("method"))
    state = None
    if method.fits:
        checkpoint, state = checkpoint_state(run_dir, checkpoint)
        if "init" in cfg:  # the checkpoint holds every trained weight: the run's init file need not exist any more
            cfg.init.kind, cfg.init.checkpoint = "random", None
    try:
        module = method.from_config(cfg, InitCheckpoint.read(cfg.get("init")))
    except PickleRefused as e:
        raise ConfigError(
            f"{e.key}={e.path} (named by {run_dir / CONFIG_FILE}) pickles Python objects, and unpickling runs code "
            "from the file; a run folder's config cannot allow that. If you trust the file, pass --allow-pickle"
        ) from None
    if state is not None:
        module.on_load_checkpoint({"state_dict": state})  # frozen parts (tokenizer, teacher) come from their files
        load_strict(module, state, f"checkpoint={checkpoint} does not fit the model {run_dir / CONFIG_FILE} describes")
    return write_formats(module, cfg, formats, out_dir or run_dir / "export")


def write_formats(module: TrainingMethod, cfg: DictConfig, formats: Sequence[str], out_dir: Path) -> dict[str, Path]:
    """The trained ``module``'s exports in each of ``formats`` under ``out_dir``, by name; each hf or onnx file is
    checked against the module (on a copy of it, on the CPU) before it is put in place. A format the run cannot
    give is refused before anything is written."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"export format {unknown[0]!r} is none of {FORMATS}")
    hub_encoder = exported_encoder(module, "hf") if "hf" in formats else None
    paths = module.export(out_dir) if "weights" in formats else {}
    if hub_encoder is not None:
        mean, std = module.pixel_stats(cfg)
        write_hub_folder(hub_encoder, out_dir / HUB_FOLDER, input_size(hub_encoder, cfg), mean, std)
        paths["hf"] = out_dir / HUB_FOLDER
    if "onnx" in formats and isinstance(module, Detection):
        write_detector_onnx(module.detector, out_dir / "detector.onnx")
        paths["detector_onnx"] = out_dir / "detector.onnx"
    elif "onnx" in formats:
        encoder = exported_encoder(module, "onnx")
        write_encoder_onnx(encoder, out_dir / "encoder.onnx", input_size(encoder, cfg))
        paths["encoder_onnx"] = out_dir / "encoder.onnx"
    return paths


def exported_encoder(module: TrainingMethod, fmt: str) -> nn.Module:
    """The timm model a run exports as a Hub folder or an ONNX encoder: its encoder, a classifier's with its head."""
    if isinstance(module, Detection) and fmt == "hf":
        raise ConfigError(
            "--format hf: a detection run's model is the detector, which timm does not build; --format onnx writes "
            "the whole detector, --format weights its encoder (encoder.safetensors) and detector.safetensors"
        )
    encoder = getattr(module, "encoder", None)
    if encoder is None:
        raise ConfigError(f"--format {fmt}: a {type(module).__name__} run has no encoder (export its weights instead)")
    return encoder


def input_size(encoder: nn.Module, cfg: DictConfig) -> tuple[int, int, int]:
    """(C, H, W) the run fed the encoder: the dataset's image size, else the size the model was built for."""
    channels, *size = get_model_input_config(encoder)["input_size"]
    side = cfg.dataset.get("img_size")
    return (channels, side, side) if side is not None else (channels, *size)
