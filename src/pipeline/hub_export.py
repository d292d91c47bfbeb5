"""A run's encoder as a Hugging Face Hub folder, written by timm's own ``save_for_hf``.

The folder is what ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads and what
``timm.models.push_to_hf_hub`` uploads: ``config.json`` names the architecture, the arguments that rebuild it
(``model_args``: patch size, depth, image size...) and its ``pretrained_cfg`` (input size, interpolation and the
run's normalisation, so ``timm.data.create_transform`` makes the run's evaluation view); ``model.safetensors`` holds
the weights. Our own architectures (the masked ViT and BEiT variants, Pale) are timm models once ``src.encoders`` is
imported: loading such a folder needs that import first.

The folder is written beside its place, loaded back through ``local-dir:`` and its features compared with the
encoder's before it is renamed into place: a folder that does not rebuild the encoder is an error, never an export.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf
from torch import nn

from src.files import follow_umask
from src.pipeline.onnx_export import ExportMismatch, staging_folder
from src.shards import replace_folder

log = logging.getLogger(__name__)


def write_hub_folder(
    encoder: nn.Module, folder: Path, input_size: tuple[int, int, int], mean: Sequence[float], std: Sequence[float]
) -> float:
    """The encoder (a copy, on the CPU in fp32) as a Hub folder at ``folder``; returns the max abs diff between
    its features and those of the model ``local-dir:`` loads from the folder (0 when the load is exact)."""
    model = copy.deepcopy(encoder).cpu().float().eval()
    data_config = {  # the run's evaluation view: resize the short side (bicubic), centre crop, normalise
        "input_size": tuple(input_size),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": tuple(mean),
        "std": tuple(std),
    }
    staging = staging_folder(folder)
    try:
        save_for_hf(model, str(staging), safe_serialization=True, data_config=data_config)
        for path in staging.iterdir():
            follow_umask(path)
        diff = loaded_difference(model, staging)
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "%s: timm.create_model('local-dir:%s', pretrained=True) rebuilds the encoder: features max abs diff %.2g",
        folder.name,
        folder,
        diff,
    )
    return diff


def loaded_difference(model: nn.Module, folder: Path) -> float:
    """Load ``folder`` as a user would and compare its ``forward_features`` with ``model``'s on two images of the
    size the folder's config states; a difference of more than rounding is an error."""
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.randn(2, *loaded.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.forward_features(images), loaded.forward_features(images)
    diff = float((ours - theirs).abs().max())
    if diff > 1e-6 * max(1.0, float(ours.abs().max())):
        raise ExportMismatch(f"{folder}: the model timm loads from the folder differs from the encoder by {diff:.3g}")
    return diff
