"""DeiT distillation: the loss against hand-written math, the distilled ViT against timm's DeiT, frozen teachers
(a real supervised run, and the packaged ImageNet EfficientNet-Lite0), and real training steps for ViT and Pale."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY, assert_export_reproduces, compose_config
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from skimage import data as skimage_data

from src.config import ConfigError
from src.data.builtin import load_fashion_mnist
from src.data.classification import ClassificationTrainTransform
from src.data.distributed import GlobalBatchSampler
from src.encoders.loading import InitCheckpoint
from src.files import load_state_dict_file
from src.methods.deit import DeiT, DistillationLoss
from src.methods.teacher import EFFICIENTNET_LITE0_PACKAGE, IMAGENET_INPUT, InputSpec, build_teacher
from src.pipeline.fit import run

TEACHER_ARCH = "resnet10t"  # a small timm convnet: the real teacher path at test cost
TINY_DATA = [o for o in TINY if "encoder" not in o]  # TINY without its ViT
PALE_TINY = [
    "encoder=pale_t",
    "+encoder.kwargs.embed_dim=16",
    "+encoder.kwargs.depths=[1,1,1,1]",
    "+encoder.kwargs.num_heads=[2,2,2,2]",
    "encoder.kwargs.drop_path_rate=0.0",
]


# ---- the loss against an independent computation ---------------------------------------------------------
def log_softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def reference_loss(mode, alpha, tau, smoothing, cls_logits, targets, dist_logits, teacher_logits) -> torch.Tensor:
    """DeiT's loss written out: smoothed one-hot (or given soft) targets, explicit KL and argmax CE."""
    batch, classes = cls_logits.shape
    if targets.ndim == 1:
        soft = torch.full((batch, classes), smoothing / classes, dtype=torch.float64)
        soft[torch.arange(batch), targets] += 1.0 - smoothing
    else:
        soft = targets.double()
    base = -(soft * log_softmax_by_hand(cls_logits.double())).sum(dim=1).mean()
    if mode == "none":
        return base
    log_s = log_softmax_by_hand(dist_logits.double() / tau)
    log_t = log_softmax_by_hand(teacher_logits.double() / tau)
    if mode == "soft":
        kl_terms = log_t.exp() * (log_t - log_s)  # p_t * (log p_t - log p_s), every sample and class
        distill = kl_terms.sum() * tau * tau / (batch * classes)
    else:
        picked = teacher_logits.argmax(dim=1)
        distill = -log_softmax_by_hand(dist_logits.double())[torch.arange(batch), picked].mean()
    return (1 - alpha) * base + alpha * distill


@pytest.mark.parametrize("mode", ["none", "soft", "hard"])
@pytest.mark.parametrize("mixed", [False, True])
def test_distillation_loss_matches_the_math(mode, mixed):
    g = torch.Generator().manual_seed(0)
    batch, classes, alpha, tau, smoothing = 6, 5, 0.3, 2.5, 0.1
    cls_logits, dist_logits, teacher_logits = (torch.randn(batch, classes, generator=g) * 3 for _ in range(3))
    targets = torch.randint(0, classes, (batch,), generator=g)
    if mixed:  # mixup/cutmix hand the loss soft targets
        targets = torch.softmax(torch.randn(batch, classes, generator=g), dim=1)
    loss, parts = DistillationLoss(mode, alpha, tau, smoothing)(cls_logits, targets, dist_logits, teacher_logits)
    expected = reference_loss(mode, alpha, tau, smoothing, cls_logits, targets, dist_logits, teacher_logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ("loss_distill" in parts) == (mode != "none")


def test_distillation_loss_defaults_and_refusals():
    loss = DistillationLoss()
    assert (loss.mode, loss.alpha, loss.tau, loss.label_smoothing) == ("hard", 0.5, 1.0, 0.1)
    for kwargs, named in [({"mode": "medium"}, "distillation"), ({"alpha": 1.5}, "alpha"), ({"tau": 0.0}, "tau")]:
        with pytest.raises(ValueError, match=named):
            DistillationLoss(**kwargs)
    with pytest.raises(ValueError, match="teacher logits"):  # a 1000-class teacher for a 10-class student
        loss(torch.randn(2, 10), torch.tensor([1, 2]), torch.randn(2, 10), torch.randn(2, 1000))


# ---- the distilled ViT ------------------------------------------------------------------------------------
def test_official_deit_distilled_checkpoint_loads_strictly_and_predicts_the_same(tmp_path):
    official = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    path = tmp_path / "deit_tiny_distilled.pth"
    torch.save({"model": official.state_dict()}, path)  # the released layout
    student = timm.create_model(  # timm's strict pretrained loading; only the mask token keeps its init
        "mim_vit_tiny_patch16_distilled", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=224
    )
    assert student.pos_embed.shape == (1, 14 * 14 + 2, 192) and student.num_prefix_tokens == 2
    student.eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(student(images), official(images))
        cls_logits, dist_logits = student.forward_heads(images)
        torch.testing.assert_close(student(images), (cls_logits + dist_logits) / 2)  # eval: the average
    student.train().set_distilled_training(True)
    outputs = student(images[:1])
    assert isinstance(outputs, tuple) and len(outputs) == 2  # training: both heads' logits


# ---- teachers -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A real supervised run of a small timm convnet on Fashion-MNIST at 32 px: the toolkit's own teacher."""
    runs = tmp_path_factory.mktemp("teacher")
    cfg = compose_config(
        [*TINY_DATA, f"runs_dir={runs}", f"model.arch={TEACHER_ARCH}", "objective.augment.rand_augment=null"],
        config_name="supervised",
    )
    result = run(cfg)
    assert "val/top1" in result.metrics and result.global_step == 4
    assert_export_reproduces(result.run_dir, result.exports, runs / "again")
    return result.exports["classifier"]


def deit_from(cfg: DictConfig) -> DeiT:
    """DeiT's module as a run builds it (it starts from no init checkpoint)."""
    return DeiT.from_config(cfg, InitCheckpoint())


def deit_config(tmp_path: Path, teacher: Path, *extra: str, student: list[str] = TINY):
    return compose_config(
        [
            *student,
            f"runs_dir={tmp_path}",
            "objective=deit",
            f"objective.teacher.arch={TEACHER_ARCH}",
            f"objective.teacher.checkpoint={teacher}",
            *extra,
        ]
    )


@pytest.mark.slow
def test_teacher_sees_the_mixed_batch_and_never_trains(tmp_path, teacher_checkpoint):
    module = deit_from(deit_config(tmp_path, teacher_checkpoint))  # DeiT defaults: mixup 0.8, cutmix 1.0
    module.train()
    assert not any(m.training for m in module.teacher.modules())  # train() reaches the teacher, which stays in eval
    assert not any(p.requires_grad for p in module.teacher.parameters())
    bn = next(m for m in module.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    running_mean = bn.running_mean.clone()
    seen = {}
    module.teacher.model.register_forward_pre_hook(lambda m, args: seen.setdefault("teacher", args[0]))
    module.encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.setdefault("student", args[0]))

    images, labels = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    grey = torch.nn.functional.interpolate(images[:8, None].float(), size=32) / 255
    batch = {"image": (grey.expand(-1, 3, -1, -1) - 0.286) / 0.353, "label": labels[:8]}
    np.random.seed(0)  # timm's Mixup draws lambda and mixup-vs-cutmix with numpy
    loss, parts = module.compute_loss(batch)
    loss.backward()

    assert torch.equal(seen["teacher"], seen["student"]) and not torch.equal(seen["student"], batch["image"])
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.encoder.dist_token.grad is not None and module.encoder.head_dist.weight.grad is not None
    torch.testing.assert_close(bn.running_mean, running_mean)  # eval-mode BatchNorm: statistics untouched
    assert set(parts) == {"loss_base", "loss_distill", "teacher_agreement"}
    teacher_params = {id(p) for p in module.teacher.parameters()}
    assert not any(id(p) in teacher_params for group in module.param_groups() for p in group["params"])


@pytest.mark.slow
def test_teacher_refusals_name_the_key(tmp_path, teacher_checkpoint):
    missing = tmp_path / "no_teacher.safetensors"
    with pytest.raises(ConfigError, match=r"objective\.teacher\.checkpoint=.*python -m src\.train_supervised"):
        DeiT.check_config(deit_config(tmp_path, missing))
    with pytest.raises(ConfigError, match=r"1000 classes .* 10"):  # ImageNet teacher, Fashion-MNIST student
        deit_from(
            deit_config(
                tmp_path,
                EFFICIENTNET_LITE0_PACKAGE,
                "objective.teacher.arch=tf_efficientnet_lite0",
                "objective.teacher.adapt_input=true",
            )
        )
    with pytest.raises(ConfigError, match="adapt_input"):  # the teacher was trained at 32 px, the student runs at 64
        deit_from(deit_config(tmp_path, teacher_checkpoint, "dataset.img_size=64"))
    adapted = deit_from(
        deit_config(tmp_path, teacher_checkpoint, "dataset.img_size=64", "objective.teacher.adapt_input=true")
    )
    assert adapted.teacher.adapt and adapted.teacher(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"objective\.teacher\.arch=resnet18"):  # the record says resnet10t
        deit_from(deit_config(tmp_path, teacher_checkpoint, "objective.teacher.arch=resnet18"))


def skimage_photo(name: str, spec: InputSpec) -> torch.Tensor:
    photo = Image.fromarray(getattr(skimage_data, name)()).resize((spec.img_size, spec.img_size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("data_input", [IMAGENET_INPUT, InputSpec.of(256, [0.5] * 3, [0.5] * 3)])
def test_packaged_efficientnet_lite0_teacher_classifies_real_photos(data_input):
    cfg = OmegaConf.create(
        {"arch": "tf_efficientnet_lite0", "checkpoint": EFFICIENTNET_LITE0_PACKAGE, "adapt_input": True}
    )
    teacher = build_teacher(cfg, num_classes=1000, data_input=data_input)
    assert teacher.adapt == (data_input != IMAGENET_INPUT)  # other input: resized and renormalised, explicitly
    photos = torch.stack([skimage_photo("chelsea", data_input), skimage_photo("coffee", data_input)])
    assert teacher(photos).argmax(dim=1).tolist() == [285, 967]  # Egyptian cat, espresso


# ---- real training --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("student", ["vit", "pale"])
def test_deit_trains_and_exports(tmp_path, teacher_checkpoint, student):
    overrides = TINY if student == "vit" else [*PALE_TINY, *TINY_DATA]
    cfg = deit_config(tmp_path, teacher_checkpoint, "epochs=1", student=overrides)
    result = run(cfg)
    assert result.global_step == 4 and 0.0 <= result.metrics["val/top1"] <= 1.0
    assert {"train/loss_distill", "val/top1_cls", "val/top1_dist", "knn/top1"} <= set(result.metrics)

    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])  # checkpoints stay student-sized
    assert_export_reproduces(result.run_dir, result.exports, tmp_path / "again")
    module = deit_from(cfg)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cls_logits, dist_logits = module.heads(images)
        torch.testing.assert_close(module(images), (cls_logits + dist_logits) / 2)
    module.train()
    assert isinstance(module(images), tuple)

    classifier = load_state_dict_file(result.exports["classifier"])
    if student == "vit":  # the export is timm's own DeiT, loadable strictly
        deit = timm.create_model(
            "deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10, pretrained=False
        )
        deit.load_state_dict(classifier, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(deit.eval()(images), module.eval()(images))
    else:  # Pale: its own classifier plus the pooled-feature distillation head
        assert {"head.weight", "head_dist.weight"} <= set(classifier)
    assert not any(k.startswith(("head", "head_dist")) for k in load_state_dict_file(result.exports["encoder"]))


def test_no_distillation_is_the_plain_one_head_baseline(tmp_path):
    module = deit_from(deit_config(tmp_path, tmp_path / "unused.safetensors", "objective.distillation=none"))
    assert module.teacher is None and not hasattr(module.encoder, "dist_token")
    assert module.encoder.pos_embed.shape[1] == 64 + 1
    assert module.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---- the recipe's data side ---------------------------------------------------------------------------------------
def test_deit_augmentation_and_repeated_sampling():
    images, _ = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    transform = pickle.loads(
        pickle.dumps(  # DataLoader workers receive it pickled
            ClassificationTrainTransform(
                32, [0.286] * 3, [0.353] * 3, "rand-m9-mstd0.5-inc1", (0.08, 1.0), 0.5, 0.3, 0.25
            )
        )
    )
    out = transform(Image.fromarray(images[0].numpy()))["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32

    # Repeated augmentation: each drawn image 3 times in a row in the epoch's order (one global batch holds its
    # copies), each copy with a seed of its own, so augmented differently; the same at any world size
    sampler = GlobalBatchSampler(12, 6, 1, 0, 1, seed=0, position=lambda: (0, 0), repeats=3)
    batches = list(sampler)
    indices = [i for batch in batches for i, _ in batch]
    assert len(indices) == 12 and all(indices.count(i) == 3 for i in set(indices)) and len(set(indices)) == 4
    assert all(indices[3 * k] == indices[3 * k + 1] == indices[3 * k + 2] for k in range(4))
    assert len({seed for batch in batches for _, seed in batch}) == 12
    two_ranks = [GlobalBatchSampler(12, 3, 2, r, 1, seed=0, position=lambda: (0, 0), repeats=3) for r in range(2)]
    assert sorted(k for s in two_ranks for b in s for k in b) == sorted(k for b in batches for k in b)
    later = GlobalBatchSampler(12, 6, 1, 0, 1, seed=0, position=lambda: (1, 2), repeats=3)
    assert [i for b in later for i, _ in b] != indices  # a new epoch, a new draw
