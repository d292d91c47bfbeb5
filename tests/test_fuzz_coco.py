"""Fuzzed COCO instances files: the reader accepts what it can use safely, or says what is wrong in one line.

Each example starts from the small valid set of ``test_trust_coco`` (two real images; a polygon, a compressed and
an uncompressed RLE) and mutates it: keys dropped, values replaced by other types, NaN, inf, huge or negative
numbers, list entries duplicated (so ids repeat), the JSON text cut short or overwritten with garbage bytes.
Whatever it reads is then loaded as the datamodule would, every sample decoded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_trust_coco import SIZES, tiny_coco

from src.config import ConfigError
from src.detection.data import CocoDetection, read_coco

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEY = "dataset.train_annotations"
ODD_VALUES = st.one_of(
    st.sampled_from(
        [math.nan, math.inf, -math.inf, 1e308, -1, 0, 10**30, "1", "", "../a.png", "/etc/passwd", None, True, [], {}]
    ),
    st.integers(-3, 40),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-3, 700), st.floats()), max_size=9),
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    for i, (h, w) in SIZES.items():
        Image.fromarray(np.full((h, w), 60 * i, np.uint8)).save(root / "images" / f"{'ab'[i - 1]}.png")
    return root


def places(node: Any, at: tuple = ()) -> list[tuple]:
    """Every key path into the JSON tree (the root is the empty path)."""
    found = [at]
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        found += places(child, (*at, key))
    return found


def mutate(coco: dict[str, Any], data: st.DataObject) -> None:
    """One change at a drawn place: drop it, replace it, or (in a list) repeat one of its entries."""
    at = data.draw(st.sampled_from(places(coco)[1:]))
    parent = coco
    for key in at[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["drop", "replace", "repeat"]))
    if action == "drop":
        del parent[at[-1]]
    elif action == "replace" or not isinstance(parent, list):
        parent[at[-1]] = data.draw(ODD_VALUES)
    else:
        parent.append(json.loads(json.dumps(parent[at[-1]])))


def check(root: Path, text: bytes, masks: bool, train: bool) -> None:
    """Reading gives a ConfigError of one line, or data whose boxes are finite, inside their image, ids unique."""
    path = root / "instances.json"
    path.write_bytes(text)
    try:
        coco = read_coco(path, KEY, root / "images", "dataset.images", masks, train)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and message.startswith((f"{KEY}: {path}", "dataset.images: ")), message
        return
    for section in ("images", "annotations", "categories"):
        ids = [record["id"] for record in coco[section]]
        assert len(ids) == len(set(ids)), section
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= width * (1 + 1e-12) and y + h <= height * (1 + 1e-12)
        assert 0 <= ann.get("area", 0) <= width * height
    data = CocoDetection(root / "images", coco, masks=masks, train=train)
    for index in range(len(data)):
        sample = data[index]  # None: an image of another size than its JSON says, skipped by name
        if sample is not None:
            image, target = sample
            corner = torch.tensor([image.shape[2], image.shape[1]]) * (1 + 1e-6)  # float32 rounding of x + w
            assert target["boxes"].isfinite().all() and (target["boxes"][:, 2:] <= corner).all()


@FUZZ
@given(data=st.data(), changes=st.integers(1, 3), masks=st.booleans(), train=st.booleans())
def test_mutated_fields(root: Path, data: st.DataObject, changes: int, masks: bool, train: bool) -> None:
    coco = tiny_coco()
    for _ in range(changes):
        if places(coco)[1:]:
            mutate(coco, data)
    check(root, json.dumps(coco).encode(), masks, train)


@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True), masks=st.booleans())
def test_json_cut_short(root: Path, cut: float, masks: bool) -> None:
    text = json.dumps(tiny_coco()).encode()
    check(root, text[: int(cut * len(text))], masks, train=True)


@FUZZ
@given(data=st.data(), garbage=st.binary(min_size=1, max_size=8), masks=st.booleans())
def test_garbage_bytes(root: Path, data: st.DataObject, garbage: bytes, masks: bool) -> None:
    text = json.dumps(tiny_coco()).encode()
    at = data.draw(st.integers(0, len(text)))
    check(root, text[:at] + garbage + text[at + len(garbage) :], masks, train=False)
