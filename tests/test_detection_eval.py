"""COCO evaluation and detection pictures on real Fashion-MNIST garments pasted onto canvases.

Every expected number is derived in the test (from an exact IoU, or from pycocotools' COCOeval run directly on
the same annotations), never copied from a previous run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from lightning.pytorch.loggers import WandbLogger
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.io import read_image
from torchvision.ops import box_iou

from src.benchmarks.coco_eval import evaluate as coco_evaluate
from src.benchmarks.coco_eval import imitated_evaluation
from src.config import ConfigError, validate
from src.data.builtin import load_fashion_mnist
from src.detection.build_sets import build_set
from src.detection.evaluation import DetectionEvaluator
from src.detection.pictures import DetectionPictures, detection_figure, per_class_table, wandb_detection_image
from src.figures import figure_pixels

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SCALE = 2  # 56 px garments: COCO "medium" instances (32^2 < area < 96^2)
CANVAS = (128, 160)
SUMMARY = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"]


@pytest.fixture(scope="module")
def garments() -> dict[int, torch.Tensor]:
    """The first test-split garment of each class, keyed by detection label (class index + 1)."""
    images, labels = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    first = {}
    for image, label in zip(images[:100], labels[:100].tolist(), strict=True):
        first.setdefault(label + 1, image)
    return first


def scene(garments: dict[int, torch.Tensor], placed: list[tuple[int, int, int]]) -> tuple[torch.Tensor, dict]:
    """Paste ``(label, top, left)`` garments on a black canvas; masks are the garment's pixels, boxes their extent."""
    canvas = torch.zeros(CANVAS)
    masks, boxes, labels = [], [], []
    for label, top, left in placed:
        garment = F.interpolate(garments[label][None, None].float() / 255, scale_factor=SCALE)[0, 0]
        height, width = garment.shape
        pixels = garment > 0.1
        canvas[top : top + height, left : left + width][pixels] = garment[pixels]
        mask = torch.zeros(CANVAS, dtype=torch.uint8)
        mask[top : top + height, left : left + width] = pixels
        ys, xs = mask.nonzero(as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(mask)
        labels.append(label)
    masks = torch.stack(masks)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels),
        "masks": masks,
        "iscrowd": torch.zeros(len(labels), dtype=torch.long),
        "area": masks.flatten(1).sum(1).float(),
        "image_id": 0,
    }
    return canvas.expand(3, -1, -1).clone(), target


def as_prediction(target: dict, scores: list[float]) -> dict:
    """The ground truth as torchvision would predict it: masks as (M, 1, H, W) probabilities."""
    return {
        "boxes": target["boxes"].clone(),
        "scores": torch.tensor(scores),
        "labels": target["labels"].clone(),
        "masks": target["masks"][:, None].float(),
    }


def evaluate(predictions: list[dict], targets: list[dict], masks: bool = True, backend: str = "pycocotools") -> dict:
    evaluator = DetectionEvaluator(CLASSES, masks=masks, backend=backend)
    evaluator.update(predictions, targets)
    return evaluator.compute()


def rle(mask: torch.Tensor) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))


def xywh(box: torch.Tensor) -> list[float]:
    x1, y1, x2, y2 = box.tolist()
    return [x1, y1, x2 - x1, y2 - y1]


def cocoeval_stats(prediction: dict, target: dict, iou_type: str) -> list[float]:
    """pycocotools' COCOeval on one image, built from the raw annotations: the independent reference."""
    annotations = [
        {
            "id": k + 1,
            "image_id": 1,
            "category_id": int(target["labels"][k]),
            "iscrowd": int(target["iscrowd"][k]),
            "area": float(target["area"][k]),
            "bbox": xywh(target["boxes"][k]),
            "segmentation": rle(target["masks"][k]),
        }
        for k in range(len(target["labels"]))
    ]
    dataset = {
        "info": {},
        "images": [{"id": 1, "height": CANVAS[0], "width": CANVAS[1]}],
        "categories": [{"id": label, "name": name} for label, name in enumerate(CLASSES, start=1)],
        "annotations": annotations,
    }
    results = []
    for k in range(len(prediction["labels"])):
        result = {"image_id": 1, "category_id": int(prediction["labels"][k]), "score": float(prediction["scores"][k])}
        if iou_type == "bbox":
            result["bbox"] = xywh(prediction["boxes"][k])
        else:
            result["segmentation"] = rle(prediction["masks"][k, 0] > 0.5)
        results.append(result)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = dataset
        truth.createIndex()
        coco_eval = COCOeval(truth, truth.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats[:6]]


def test_ground_truth_as_predictions_scores_one(garments):
    image, target = scene(garments, [(1, 4, 4), (2, 4, 90), (8, 66, 40)])
    results = evaluate([as_prediction(target, [1.0, 1.0, 1.0])], [target])
    # COCO's size ranges by the annotation (mask) area; a range without ground truth keeps COCO's -1
    areas = target["area"].tolist()
    present = {
        "ap_small": any(a < 32**2 for a in areas),
        "ap_medium": any(32**2 <= a < 96**2 for a in areas),
        "ap_large": any(a >= 96**2 for a in areas),
    }
    assert not all(present.values())  # the -1 rule is exercised
    for kind in ("box", "mask"):
        for name in ("ap", "ap50", "ap75"):
            assert results[f"{kind}/{name}"] == pytest.approx(1.0), (kind, name)
        for name, has_truth in present.items():
            assert results[f"{kind}/{name}"] == pytest.approx(1.0 if has_truth else -1.0), (kind, name)
    # boxes only: the ranges still follow the annotation areas, not the boxes' (all medium here)
    boxes_only = evaluate([as_prediction(target, [1.0, 1.0, 1.0])], [target], masks=False)
    for name, has_truth in present.items():
        assert boxes_only[f"box/{name}"] == pytest.approx(1.0 if has_truth else -1.0), name
    rows = {row["class"]: row for row in results["per_class"]}
    assert [row["class"] for row in results["per_class"]] == CLASSES
    for label in (1, 2, 8):
        assert rows[CLASSES[label - 1]]["box_ap"] == pytest.approx(1.0)
        assert rows[CLASSES[label - 1]]["mask_ap"] == pytest.approx(1.0)
    assert rows[CLASSES[4]]["box_ap"] == -1.0  # a class without ground truth


def test_shifted_box_scores_the_thresholds_its_iou_clears(garments):
    _, target = scene(garments, [(4, 30, 50)])
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    width = int(x2 - x1)
    shift = round(width * 0.38 / 1.62)  # IoU (w - s) / (w + s) close to 0.62
    iou = Fraction(width - shift, width + shift)
    shifted = target["boxes"] + torch.tensor([shift, 0.0, shift, 0.0])
    assert float(box_iou(shifted, target["boxes"])) == pytest.approx(float(iou), abs=1e-6)
    thresholds = [Fraction(50 + 5 * i, 100) for i in range(10)]
    assert min(abs(iou - t) for t in thresholds) > Fraction(1, 1000)  # not on a threshold's edge
    expected = sum(t <= iou for t in thresholds) / 10
    assert 0 < expected < 1
    prediction = {"boxes": shifted, "scores": torch.tensor([0.9]), "labels": target["labels"]}
    results = evaluate([prediction], [{k: v for k, v in target.items() if k != "masks"}], masks=False)
    assert results["box/ap"] == pytest.approx(expected)
    assert results["box/ap50"] == pytest.approx(1.0)
    assert results["box/ap75"] == pytest.approx(0.0)
    assert "mask/ap" not in results and results["per_class"][3]["mask_ap"] is None


def test_wrong_class_scores_zero_for_the_true_class(garments):
    _, target = scene(garments, [(1, 4, 4), (3, 40, 90)])
    prediction = as_prediction(target, [0.9, 0.8])
    prediction["labels"] = torch.tensor([1, 8])  # the pullover called a sneaker
    results = evaluate([prediction], [target])
    rows = {row["class"]: row for row in results["per_class"]}
    assert rows["T-shirt/top"]["box_ap"] == pytest.approx(1.0)
    assert rows["Pullover"]["box_ap"] == 0.0 and rows["Pullover"]["mask_ap"] == 0.0
    assert rows["Sneaker"]["box_ap"] == -1.0  # detections but no ground truth: COCO leaves the class out
    assert results["box/ap"] == pytest.approx(0.5) and results["mask/ap"] == pytest.approx(0.5)


def crowd_case(garments) -> tuple[dict, dict]:
    """Two coats, the second marked as a crowd region; the most confident detection covers its left 40 %.

    Against a crowd region COCO measures how much of the detection lies inside it (all of it here), so the half
    detection is ignored; against an ordinary annotation its IoU would be 0.4, below every threshold.
    """
    _, target = scene(garments, [(5, 4, 4), (5, 60, 90)])
    target["iscrowd"] = torch.tensor([0, 1])
    prediction = as_prediction(target, [0.7, 0.95])
    x1, _, x2, _ = prediction["boxes"][1].tolist()
    cut = int(x1 + 0.4 * (x2 - x1))
    prediction["boxes"][1, 2] = cut
    prediction["masks"][1, :, :, cut:] = 0
    return prediction, target


def test_detection_on_crowd_region_is_not_penalised(garments):
    prediction, target = crowd_case(garments)
    results = evaluate([prediction], [target])
    for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
        reference = cocoeval_stats(prediction, target, iou_type)
        assert [results[f"{kind}/{name}"] for name in SUMMARY] == pytest.approx(reference, abs=1e-6)
        assert results[f"{kind}/ap"] == pytest.approx(1.0)
    # were the region an ordinary coat, the detection would be a false positive and the coat a miss
    ordinary = target | {"iscrowd": torch.zeros(2, dtype=torch.long)}
    assert float(box_iou(prediction["boxes"][1:], target["boxes"][1:])) < 0.5
    assert evaluate([prediction], [ordinary])["box/ap"] < 0.5
    # without the region, the same detection is a false positive ranked first: precision 1/2 at recall 1
    alone = {k: v[:1] if torch.is_tensor(v) else v for k, v in target.items()}
    assert evaluate([prediction], [alone])["box/ap"] == pytest.approx(0.5)


def test_faster_coco_eval_matches_pycocotools(garments):
    prediction, target = crowd_case(garments)
    prediction["boxes"][0] += torch.tensor([6.0, 0.0, 6.0, 0.0])  # a box IoU between thresholds
    prediction["masks"][0] = torch.roll(prediction["masks"][0], 1, dims=-1)  # the coat's mask is lacy: IoU 0.69
    reference = evaluate([prediction], [target])
    faster = evaluate([prediction], [target], backend="faster_coco_eval")
    assert 0 < reference["box/ap"] < 1 and 0 < reference["mask/ap"] < 1
    assert faster.keys() == reference.keys()
    for key, value in reference.items():
        if key == "per_class":
            for fast_row, row in zip(faster[key], value, strict=True):
                assert fast_row["class"] == row["class"]
                assert [fast_row["box_ap"], fast_row["mask_ap"]] == pytest.approx([row["box_ap"], row["mask_ap"]])
        else:
            assert faster[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize(
    ("builder", "params", "masks"),
    [
        ("stardist", {}, True),
        ("deepforest", {}, False),
        ("fmnist_scenes", {"train_images": 1, "val_images": 40}, True),
    ],
)
def test_both_backends_give_the_same_ap_on_the_project_sets(tmp_path: Path, builder: str, params: dict, masks: bool):
    """Each built set's validation split, scored on detections drawn from its ground truth (hits at every IoU,
    misses, false positives): every summary number and every class's AP alike, to the last bit."""
    build_set(builder, tmp_path / builder, **params)
    class_names, detections, targets = imitated_evaluation(tmp_path / builder, masks)
    reference = coco_evaluate("pycocotools", class_names, masks, detections, targets)
    faster = coco_evaluate("faster_coco_eval", class_names, masks, detections, targets)
    assert 0 < reference["box/ap"] < 1 and (not masks or 0 < reference["mask/ap"] < 1)
    assert faster == reference


def hide_faster_coco_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "faster_coco_eval" else installed(name)
    )


def test_auto_takes_faster_coco_eval_where_installed_and_says_which_ran(monkeypatch, caplog):
    cfg = compose_config(["objective=detect"], config_name="finetune")
    assert cfg.objective.eval_backend == "auto"
    validate(cfg)
    with caplog.at_level(logging.INFO, logger="src.detection.evaluation"):
        evaluator = DetectionEvaluator(CLASSES, masks=True, backend=cfg.objective.eval_backend)
    assert evaluator.backend == evaluator.metric._coco_backend.backend == "faster_coco_eval"  # what torchmetrics runs
    assert caplog.messages == ["COCO box and mask AP through faster_coco_eval (eval_backend=auto)"]

    hide_faster_coco_eval(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="src.detection.evaluation"):
        evaluator = DetectionEvaluator(CLASSES, masks=False)
    assert evaluator.backend == evaluator.metric._coco_backend.backend == "pycocotools"
    assert caplog.messages == ["COCO box AP through pycocotools (eval_backend=auto)"]
    assert DetectionEvaluator(CLASSES, masks=False, backend="pycocotools").backend == "pycocotools"  # named: honoured


def test_backend_errors_say_what_to_do(monkeypatch):
    cfg = compose_config(["objective=detect", "objective.eval_backend=detectron2"], config_name="finetune")
    with pytest.raises(ConfigError, match="objective.eval_backend='detectron2' must be one of .*faster_coco_eval"):
        validate(cfg)  # the schema names the backends
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'detectron2'"):
        DetectionEvaluator(CLASSES, masks=False, backend="detectron2")
    hide_faster_coco_eval(monkeypatch)
    cfg = compose_config(["objective=detect", "objective.eval_backend=faster_coco_eval"], config_name="finetune")
    refusal = r"objective.eval_backend='faster_coco_eval' must be one of \('auto', 'pycocotools'\) \(not installed: "
    with pytest.raises(ConfigError, match=refusal + "`pip install faster-coco-eval`"):
        validate(cfg)  # before any work: a chosen backend that is missing
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        DetectionEvaluator(CLASSES, masks=False, backend="faster_coco_eval")


def test_reset_forgets_the_epoch(garments):
    _, target = scene(garments, [(1, 4, 4)])
    evaluator = DetectionEvaluator(CLASSES, masks=True)
    evaluator.update([as_prediction(target, [1.0])], [target])
    assert evaluator.compute()["box/ap"] == pytest.approx(1.0)
    evaluator.reset()
    wrong = as_prediction(target, [1.0])
    wrong["labels"] = torch.tensor([2])
    evaluator.update([wrong], [target])
    assert evaluator.compute()["box/ap"] == 0.0


def test_the_detection_figure_puts_predictions_beside_the_truth_with_class_names(garments):
    image, target = scene(garments, [(1, 4, 4), (2, 60, 90)])
    prediction = as_prediction(target, [0.9, 0.8])
    # a confident box in an empty corner and a weak one in another: only the first is drawn
    prediction["boxes"] = torch.cat([prediction["boxes"], torch.tensor([[120.0, 4.0, 150.0, 40.0]])])
    prediction["boxes"] = torch.cat([prediction["boxes"], torch.tensor([[4.0, 80.0, 40.0, 120.0]])])
    prediction["scores"] = torch.cat([prediction["scores"], torch.tensor([0.6, 0.2])])
    prediction["labels"] = torch.cat([prediction["labels"], torch.tensor([9, 9])])
    prediction["masks"] = torch.cat([prediction["masks"], torch.zeros(2, 1, *CANVAS)])
    figure = detection_figure([(image, prediction, target)], CLASSES, score_threshold=0.5, step=7)
    predicted, truth = figure.axes
    assert (predicted.get_title(), truth.get_title()) == ("prediction (score ≥ 0.5)", "ground truth")
    assert figure.get_suptitle() == "detections at step 7"

    def outlines(axes) -> list[list[float]]:
        return [
            [patch.get_x(), patch.get_y(), patch.get_x() + patch.get_width(), patch.get_y() + patch.get_height()]
            for patch in axes.patches
        ]

    assert outlines(predicted) == prediction["boxes"][:3].tolist()  # the weak box is below the threshold
    assert outlines(truth) == target["boxes"].tolist()
    assert [text.get_text() for text in predicted.texts] == ["T-shirt/top 0.90", "Trouser 0.80", "Bag 0.60"]
    assert [text.get_text() for text in truth.texts] == ["T-shirt/top", "Trouser"]
    assert predicted.patches[1].get_edgecolor() == truth.patches[1].get_edgecolor()  # a colour per class
    plain, shown = image.permute(1, 2, 0).numpy(), truth.images[0].get_array()
    covered = target["masks"].bool().any(0).numpy()
    assert not np.allclose(shown[covered], plain[covered]) and np.array_equal(shown[~covered], plain[~covered])
    assert figure_pixels(figure).shape == (128 / 160 * 320 + 80, 640, 3)  # each image 320 px on its long side


def test_wandb_image_carries_box_and_mask_overlays(garments, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    image, target = scene(garments, [(1, 4, 4), (2, 60, 90)])
    prediction = as_prediction(target, [0.9, 0.3])
    prediction["boxes"] = torch.cat([prediction["boxes"], torch.tensor([[1.0, 1.0, 5.0, 5.0]])])
    prediction["scores"] = torch.cat([prediction["scores"], torch.tensor([0.01])])  # below W&B's floor
    prediction["labels"] = torch.cat([prediction["labels"], torch.tensor([3])])
    prediction["masks"] = torch.cat([prediction["masks"], torch.zeros(1, 1, *CANVAS)])
    picture = wandb_detection_image(image, prediction, target, CLASSES)
    assert set(picture._boxes) == {"predictions", "ground_truth"} and set(picture._masks) == {
        "predictions",
        "ground_truth",
    }
    boxes = picture._boxes["predictions"]._val  # the box_data list
    assert sorted(box["scores"]["score"] for box in boxes) == pytest.approx([0.3, 0.9])
    assert {box["class_id"] for box in boxes} == {1, 2}
    assert all(box["domain"] == "pixel" for box in boxes)
    assert picture._boxes["ground_truth"]._class_labels[2] == "Trouser"
    truth = picture._masks["ground_truth"]._val
    assert truth["class_labels"][0] == "background" and truth["class_labels"][1] == "T-shirt/top"
    assert np.array_equal(truth["mask_data"] == 2, target["masks"][1].bool().numpy())
    assert set(np.unique(picture._masks["predictions"]._val["mask_data"])) == {0, 1, 2}


def test_per_class_table_has_a_row_per_class():
    table = per_class_table(
        [{"class": "Bag", "box_ap": 0.5, "mask_ap": 0.25}, {"class": "Coat", "box_ap": -1.0, "mask_ap": None}]
    )
    assert table.columns == ["class", "box AP", "mask AP"]
    assert table.data[0] == ["Bag", 0.5, 0.25]


def test_detection_pictures_writes_the_grid_and_logs_to_wandb(garments, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    samples = []
    for placed in ([(1, 4, 4)], [(2, 40, 60), (8, 4, 100)]):
        image, target = scene(garments, placed)
        samples.append((image, as_prediction(target, [0.9] * len(placed)), target))
    small_image, small_target = samples[0][0][:, :100, :120], {k: v for k, v in samples[0][2].items()}
    small_target["masks"] = small_target["masks"][:, :100, :120]
    samples[0] = (small_image, as_prediction(small_target, [0.9]), small_target)  # images keep their own sizes
    rows = [{"class": name, "box_ap": 0.5, "mask_ap": 0.5} for name in CLASSES]
    module = SimpleNamespace(detection_samples=samples, last_per_class=rows, class_names=CLASSES)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    logged = []
    monkeypatch.setattr(logger, "log_metrics", lambda metrics, step: logged.append((metrics, step)))
    callback = DetectionPictures(tmp_path / "pictures", num_images=8, score_threshold=0.5)

    callback.on_validation_end(SimpleNamespace(loggers=[logger], global_step=3, sanity_checking=True), module)
    assert callback.saved == [] and logged == []  # the sanity check draws nothing

    callback.on_validation_end(SimpleNamespace(loggers=[logger], global_step=7, sanity_checking=False), module)
    path = tmp_path / "pictures" / "detections_step000007.png"
    assert callback.saved == [path] and path.exists()
    height = round(100 / 120 * 320 + 80)  # the tallest image (100 x 120) 320 px wide, titles above
    assert read_image(str(path)).shape == (3, height, 4 * 320)  # one row: each prediction beside its truth, twice
    assert {step for _, step in logged} == {7}
    metrics = {key: value for logged_now, _ in logged for key, value in logged_now.items()}
    assert set(metrics) == {"pictures/detections", "val/detections", "val/per_class_ap"}
    assert metrics["pictures/detections"][0].image.size == (4 * 320, height)  # the figure, as on disk
    assert len(metrics["val/detections"]) == 2  # and W&B's overlays of each image
    assert metrics["val/per_class_ap"].data[0] == ["T-shirt/top", 0.5, 0.5]
