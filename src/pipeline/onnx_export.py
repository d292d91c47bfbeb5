"""ONNX files of a run's encoder and detector, each checked with onnxruntime against PyTorch before it is put in place.

- The encoder goes through torch.onnx's dynamo exporter (``torch.export``) with a dynamic batch. Its outputs are
  ``features`` (timm's ``forward_features``) and ``output`` (the model's ``forward`` in eval mode: pooled features,
  or a classifier's logits; a distilled ViT's two heads averaged).
- The detector does not pass ``torch.export``: torchvision's ``batched_nms`` asks whether a data-dependent box
  count exceeds 4000 (``GuardOnDataDependentSymNode: Could not guard on data-dependent expression 4*u1 > 4000``),
  and the mask pasting loops over a data-dependent number of detections. It goes through the TorchScript exporter
  (``dynamo=False``, opset 17), as torchvision's own ONNX tests export Mask R-CNN, for which torchvision keeps
  traceable paths (NMS, resizing, padding, mask pasting). One image (3, H, W) in [0, 1] per call, any size.

The file is checked where it was written, beside its final place: the same inputs through onnxruntime and through
PyTorch, at a batch size (encoder) or image size (detector) other than the one it was exported with. Each
output's max abs diff must stay within ``tolerance`` (``TOLERANCE`` times the output's scale); only then is the
file renamed into place, so a file that computes something else is an error, never an export.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from src.config import ConfigError
from src.files import PARTIAL_SUFFIX, first_line, follow_umask, partial_name

if TYPE_CHECKING:  # imported where a file is checked: the export extra is optional
    from onnxruntime import InferenceSession

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # max abs diff allowed, times max(1, the largest |value| PyTorch gives for that output)
DETECTOR_OPSET = 17  # the TorchScript exporter's opset: torchvision's Mask R-CNN needs 11 or more
EXTRA = "pip install -e '.[export]' (onnx, onnxruntime, onnxscript)"


class ExportMismatch(RuntimeError):
    """An exported file whose outputs differ from PyTorch's on the same inputs: the export is wrong."""


def tolerance(reference: np.ndarray) -> float:
    """What an output may differ by: ``TOLERANCE`` in units of its own scale (boxes in pixels, features ~1)."""
    return TOLERANCE * max(1.0, float(np.abs(reference).max(initial=0.0)))


@dataclass(frozen=True)
class Compared:
    """One output of one check input: the largest difference onnxruntime and PyTorch gave, and what is allowed."""

    name: str
    shape: tuple[int, ...]
    max_diff: float
    allowed: float


def compare(names: Sequence[str], ours: Sequence[np.ndarray], reference: Sequence[torch.Tensor]) -> list[Compared]:
    """Each output of onnxruntime against PyTorch's; a shape (a count of detections) or integer that differs is a
    mismatch outright."""
    found = []
    for name, got, want in zip(names, ours, reference, strict=True):
        want = want.detach().cpu().numpy()
        if got.shape != want.shape:
            raise ExportMismatch(f"{name}: onnxruntime gives shape {got.shape}, PyTorch {want.shape}")
        diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0.0))
        allowed = 0.0 if np.issubdtype(want.dtype, np.integer) else tolerance(want)
        if diff > allowed:
            raise ExportMismatch(f"{name}: onnxruntime and PyTorch differ by {diff:.3g} (tolerance {allowed:.3g})")
        found.append(Compared(name, tuple(want.shape), diff, allowed))
    return found


def outputs(runtime: InferenceSession, names: Sequence[str], feed: dict[str, np.ndarray], on: str) -> list[np.ndarray]:
    """``runtime.run``, its failure an ``ExportMismatch`` naming the input (a traced size the file cannot leave)."""
    try:
        return runtime.run(list(names), feed)
    except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidArgument, RuntimeException...)
        raise ExportMismatch(f"onnxruntime cannot run the exported file on {on}: {first_line(e)}") from e


def session(path: Path) -> InferenceSession:
    """An onnxruntime session on the CPU over the file at ``path``."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"--format onnx checks the file with onnxruntime, which is not installed: {EXTRA}") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its notes on loop outputs' declared shapes say nothing of values
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def checked_in_place(
    path: Path, write: Callable[[Path], None], check: Callable[[Path], list[Compared]], what: str
) -> list[Compared]:
    """``write`` the file into a folder beside ``path``, ``check`` it there, then move it (and any external-data
    file the exporter wrote) into place; a failed write or check leaves ``path`` as it was."""
    staging = staging_folder(path)
    try:
        write(staging / path.name)
        compared = check(staging / path.name)
        written = sorted(staging.iterdir(), key=lambda f: f.name == path.name)  # the graph last: its data is there
        for file in written:
            follow_umask(file)
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    worst: dict[str, tuple[float, float]] = {}  # per output: the largest difference, the smallest tolerance
    for c in compared:
        diff, allowed = worst.get(c.name, (0.0, math.inf))
        worst[c.name] = max(diff, c.max_diff), min(allowed, c.allowed)
    said = ", ".join(f"{name} max abs diff {d:.2g} (tolerance {a:.2g})" for name, (d, a) in worst.items())
    first = compared[0].name
    shapes = " and ".join(str(c.shape) for c in compared if c.name == first)
    log.info("%s: %s, onnxruntime against PyTorch (%s %s): %s", path.name, what, first, shapes, said)
    return compared


def staging_folder(path: Path) -> Path:
    """An empty folder beside ``path`` for what will become ``path``, named after its writer (host, pid) and with
    the mode the user's umask gives folders; what a killed writer left under the same name goes first."""
    staging = path.parent / f"{partial_name(path)}{PARTIAL_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def onnx_exporter() -> None:
    """The exporter's own dependencies, named before any work."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--format onnx needs {e.name}, which is not installed: {EXTRA}") from None


# ---- the encoder ----------------------------------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    """What the encoder file computes: timm's ``forward_features``, and the model's head on them."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.forward_features(images)
        return features, self.encoder.forward_head(features)


def write_encoder_onnx(encoder: nn.Module, path: Path, input_size: tuple[int, int, int]) -> list[Compared]:
    """The encoder (a copy, on the CPU in fp32, eval mode) as ONNX at ``input_size`` (C, H, W), any batch; checked
    at batch sizes 1 and 3 (it is exported at 2)."""
    onnx_exporter()
    graph = EncoderGraph(copy.deepcopy(encoder).cpu().float().eval()).eval()
    generator = torch.Generator().manual_seed(0)
    example, *checks = (torch.randn(b, *input_size, generator=generator) for b in (2, 1, 3))
    names = ["features", "output"]

    def write(target: Path) -> None:
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
            input_names=["images"],
            output_names=names,
            verbose=False,
        )
        program.save(str(target))  # weights in a .data file beside it only above protobuf's 2 GB

    def check(target: Path) -> list[Compared]:
        runtime = session(target)
        compared = []
        for images in checks:
            with torch.no_grad():
                reference = graph(images)
            found = outputs(runtime, names, {"images": images.numpy()}, f"a batch of {len(images)}")
            compared += compare(names, found, reference)
        return compared

    return checked_in_place(path, write, check, "the encoder at batch sizes 1 and 3 (exported at 2)")


# ---- the detector ---------------------------------------------------------------------------------------------------
class DetectorGraph(nn.Module):
    """The detector's evaluation path on one image of any size, with the full input (token sample ratio 1.0).

    These are the steps of torchvision's ``GeneralizedRCNN.forward`` (transform, backbone, RPN, RoI heads,
    postprocess) as the detector takes them in evaluation. The detector's own forward turns each image's size into
    Python ints, which a tracer records as constants (a file that only takes the traced size); here the sizes stay
    the image's traced shape, so one file takes any size. ``check`` compares this file with the detector's own
    forward, so the two paths cannot drift apart unnoticed.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.outputs = ("boxes", "scores", "labels", *(("masks",) if detector.roi_heads.has_mask() else ()))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        detector = self.detector
        batch, _ = detector.transform([image])
        features = detector.backbone(batch.tensors, batch.image_sizes, 1.0, None)
        proposals, _ = detector.rpn(batch, features)
        detections, _ = detector.roi_heads(features, proposals, batch.image_sizes)
        found = detector.transform.postprocess(detections, batch.image_sizes, [image.shape[-2:]])[0]
        return tuple(found[name] for name in self.outputs)


def detector_check_sizes(detector: nn.Module) -> list[tuple[int, int]]:
    """Image sizes (H, W) around the evaluation size: a landscape one the file is exported at, and a portrait one
    of another aspect, so that the resize, the padding and the token grid all differ."""
    side = int(detector.transform.min_size[-1])  # the evaluation size (DetectionTransform in eval mode)
    return [(side, side * 4 // 3), (side * 3 // 2, side)]


def write_detector_onnx(detector: nn.Module, path: Path) -> list[Compared]:
    """The detector (a copy, on the CPU in fp32, eval mode) as ONNX: one image (3, H, W) of any size in, its
    detections out in the image's pixels; checked against the detector's own forward at two image sizes."""
    onnx_exporter()
    model = copy.deepcopy(detector).cpu().float().eval()
    graph = DetectorGraph(model).eval()
    names = list(graph.outputs)
    axes = {"image": [1, 2], **{n: [0, 2, 3] if n == "masks" else [0] for n in names}}  # masks: (N, 1, H, W)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=generator) for h, w in detector_check_sizes(model)]

    def write(target: Path) -> None:
        with warnings.catch_warnings(record=True) as said, torch.no_grad():
            torch.onnx.export(
                graph,
                (images[0],),
                str(target),
                dynamo=False,
                opset_version=DETECTOR_OPSET,
                input_names=["image"],
                output_names=names,
                dynamic_axes=axes,
            )
        log.info(
            "%s: the TorchScript exporter gave %d warnings (most: a traced value recorded as a constant); the check "
            "at another image size below is what says the file still follows the image",
            path.name,
            len(said),
        )

    def check(target: Path) -> list[Compared]:
        runtime = session(target)
        compared = []
        for image in images:
            with torch.no_grad():
                found = model([image])[0]
            on = f"an image of {image.shape[1]}x{image.shape[2]}"
            compared += compare(names, outputs(runtime, names, {"image": image.numpy()}, on), [found[n] for n in names])
        if not any(c.shape[0] for c in compared if c.name == "boxes"):
            log.warning(
                "%s: the detector finds nothing on the check's random images (untrained heads?), so the check compared "
                "only the number of detections: compare the file with the detector on your own images",
                path.name,
            )
        return compared

    sizes = " and ".join(f"{h}x{w}" for h, w in detector_check_sizes(model))
    return checked_in_place(path, write, check, f"images of {sizes} (exported at the first), the detector's forward")
