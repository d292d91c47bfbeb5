"""Data pipeline on real images: Fashion-MNIST IDX files (or the logged digits fallback) and files made here."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import logging
import pickle
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from src.config import ConfigError
from src.data import (
    DATA_KINDS,
    EvalTransform,
    ImageKind,
    PretrainTransform,
    ShardDataset,
    SkippingDataLoader,
    TensorImageDataset,
    build_datamodule,
    collate_skipping,
    load_fashion_mnist,
    register_kind,
)
from src.data.builtin import FASHION_MNIST_FILES
from src.data.write_shards import main as write_shards_main
from src.data.write_shards import write_shards

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
MEAN, STD = [0.286] * 3, [0.353] * 3


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """Real images for every test but the IDX one: Fashion-MNIST, or digits where it is not installed."""
    return load_fashion_mnist(FMNIST_ROOT, "test")


def dataset_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def make_dm(cfg, batch_size: int, num_workers: int):
    size = cfg.img_size
    return build_datamodule(
        cfg, PretrainTransform(size, cfg.mean, cfg.std), EvalTransform(size, cfg.mean, cfg.std), batch_size, num_workers
    )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Undo EvalTransform's normalisation (channel 0) back to 0-255 pixels."""
    return (images[:, 0] * STD[0] + MEAN[0]).mul(255).round().clamp(0, 255).to(torch.uint8)


# ---- Fashion-MNIST IDX ---------------------------------------------------------------------------
def test_fashion_mnist_idx_shapes_and_balanced_labels():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(FMNIST_ROOT, split)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert torch.equal(torch.bincount(labels), torch.full((10,), n // 10))
        assert 0 < images.float().mean() < 255


def _write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> None:
    header = b"".join(v.to_bytes(4, "big") for v in (magic, *shape))
    path.write_bytes(gzip.compress(header + payload))


def test_idx_errors_name_the_file(tmp_path):
    for name in FASHION_MNIST_FILES["test"]:
        shutil.copy(FMNIST_ROOT / name, tmp_path / name)
    train_images, train_labels = (tmp_path / name for name in FASHION_MNIST_FILES["train"])
    pixels = gzip.decompress((FMNIST_ROOT / "t10k-images-idx3-ubyte.gz").read_bytes())[16 : 16 + 2 * 784]
    _write_idx(train_labels, 2049, (2,), bytes([3, 7]))

    _write_idx(train_images, 2049, (2, 28, 28), pixels)  # label magic on an image file
    with pytest.raises(ValueError, match=rf"{re.escape(str(train_images))}.*magic number is 2049, expected 2051"):
        load_fashion_mnist(tmp_path, "train")
    _write_idx(train_images, 2051, (3, 28, 28), pixels)  # header promises a third image
    with pytest.raises(ValueError, match=rf"{re.escape(str(train_images))}.*shape \(3, 28, 28\)"):
        load_fashion_mnist(tmp_path, "train")
    _write_idx(train_images, 2051, (2, 28, 28), pixels)
    images, labels = load_fashion_mnist(tmp_path, "train")
    assert images.shape == (2, 28, 28) and labels.tolist() == [3, 7]


def test_missing_fashion_mnist_falls_back_or_says_how_to_fix(tmp_path, caplog):
    if importlib.util.find_spec("sklearn") is not None:
        with caplog.at_level(logging.WARNING):
            images, labels = load_fashion_mnist(tmp_path, "train")
        assert images.shape == (1500, 8, 8) and images.dtype == torch.uint8 and int(images.max()) == 255
        assert str(tmp_path) in caplog.text and "apt-get install dataset-fashion-mnist" in caplog.text
    else:
        with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*scikit-learn"):
            load_fashion_mnist(tmp_path, "train")
        with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path))} \(dataset.root\)"):
            make_dm(dataset_cfg("fashion_mnist", root=str(tmp_path)), 8, 0)


# ---- transforms and collation --------------------------------------------------------------------
def test_transforms_give_normalised_rgb_and_pickle(test_split):
    images, _ = test_split
    size = images.shape[-1]
    img = Image.fromarray(images[0].numpy())
    train = pickle.loads(pickle.dumps(PretrainTransform(32, MEAN, STD)))
    out = train(img)["image"]
    assert type(out) is torch.Tensor and out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # grey replicated, not re-augmented
    evaluate = pickle.loads(pickle.dumps(EvalTransform(size, MEAN, STD)))
    view = evaluate(img)["image"]
    assert torch.equal(view, evaluate(img)["image"])
    assert torch.equal(to_uint8(view[None])[0], images[0])  # same size: exactly the original pixels
    whole = PretrainTransform(size, MEAN, STD, crop_scale=None)  # flips only: the image or its mirror, uncropped
    views = [whole(img)["image"] for _ in range(16)]
    assert all(torch.equal(v, view) or torch.equal(v, view.flip(-1)) for v in views)
    assert any(torch.equal(v, view) for v in views) and any(torch.equal(v, view.flip(-1)) for v in views)


def test_batched_views_match_the_per_image_path(test_split):
    """dataset.tensor_transforms: the same views from tensor ops on whole batches, drawn differently."""
    images, labels = test_split
    first = images[:32]
    for size in (images.shape[-1], 32):  # native size: exact; upsampled: torch's bicubic vs PIL's, one grey level
        evaluate = EvalTransform(size, MEAN, STD)
        per_image = torch.stack([evaluate(Image.fromarray(img.numpy()))["image"] for img in first])
        assert torch.allclose(evaluate.batch(first), per_image, atol=1.01 / 255 / STD[0], rtol=0)
    whole = EvalTransform(images.shape[-1], MEAN, STD).batch(first)
    views = PretrainTransform(images.shape[-1], MEAN, STD, crop_scale=None).batch(first)
    kept = [torch.equal(v, w) for v, w in zip(views, whole, strict=True)]
    mirrored = [torch.equal(v, w.flip(-1)) for v, w in zip(views, whole, strict=True)]
    assert all(k or m for k, m in zip(kept, mirrored, strict=True)) and 0 < sum(kept) < 32
    crops = PretrainTransform(32, MEAN, STD).batch(first)
    assert crops.shape == (32, 3, 32, 32) and torch.equal(crops[:, 0], crops[:, 2])

    sizes = {"img_size": 32, "train_limit": 128, "knn_bank": 100, "knn_queries": 50}
    cfg = dataset_cfg("fashion_mnist", **sizes, tensor_transforms=True)
    dm = make_dm(cfg, batch_size=64, num_workers=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0]["image"].shape == (64, 3, 32, 32) and int(batches[0]["skipped"]) == 0
    queries = dm.knn_dataloaders()[1]
    assert torch.equal(torch.cat([b["label"] for b in queries]), labels[:50])
    with pytest.raises(ConfigError, match="tensor_transforms=true: this run's training transform .* no batched form"):
        build_datamodule(cfg, lambda img: {"image": img}, EvalTransform(32, MEAN, STD), 64, 0)
    with pytest.raises(ConfigError, match="tensor_transforms=true needs in-memory images"):
        make_dm(dataset_cfg("image_folder", root="/nowhere", tensor_transforms=True), 8, 0)


def test_collate_skipping_counts_and_drops_all_corrupt_batches(test_split):
    images, _ = test_split
    sample = {"image": images[0].float()[None].expand(3, -1, -1), "label": torch.tensor(4), "mask": torch.ones(4)}
    batch = collate_skipping([sample, None, sample])
    assert batch["image"].shape[0] == 2 and batch["mask"].shape == (2, 4) and batch["label"].tolist() == [4, 4]
    assert batch["skipped"].dtype == torch.long and int(batch["skipped"]) == 1
    assert collate_skipping([None, None]).keys() == {"skipped"}

    data = [None, None, sample, sample, None, None]
    batches = list(SkippingDataLoader(data, batch_size=2, collate_fn=collate_skipping))
    assert len(batches) == 1 and int(batches[0]["skipped"]) == 4  # dropped batches are counted, the last one too
    with pytest.raises(RuntimeError, match="every sample"):
        list(SkippingDataLoader([None] * 4, batch_size=2, collate_fn=collate_skipping))


# ---- data module: Fashion-MNIST ------------------------------------------------------------------
def test_fashion_mnist_datamodule_follows_the_knn_protocol(test_split):
    cfg = dataset_cfg("fashion_mnist", img_size=32, train_limit=256, knn_bank=300, knn_queries=200)
    dm = make_dm(cfg, batch_size=64, num_workers=0)
    assert dm.num_classes == 10 and dm.img_size == 32
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"  # the confusion matrix's axes
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    assert batches[0]["image"].shape == (64, 3, 32, 32) and batches[0]["label"].dtype == torch.long
    assert sum(int(b["skipped"]) for b in batches) == 0
    bank, queries = dm.knn_dataloaders()
    train_labels = load_fashion_mnist(cfg.root, "train")[1]
    assert torch.equal(torch.cat([b["label"] for b in bank]), train_labels[:300])  # first 300, in order
    assert torch.equal(torch.cat([b["label"] for b in queries]), test_split[1][:200])
    assert dm.val_dataloader().dataset is not None


# ---- data module: image folder ---------------------------------------------------------------------
def _image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, classes: dict[str, int], per_class: int):
    for name, label in classes.items():
        (root / name).mkdir(parents=True)
        for i, index in enumerate(torch.nonzero(labels == label)[:per_class, 0].tolist()):
            Image.fromarray(images[index].numpy()).save(root / name / f"{i}.png")


def test_image_folder_skips_and_counts_a_corrupt_file(tmp_path, test_split, caplog):
    images, labels = test_split
    classes = {"pullover": 2, "trouser": 1, "tshirt": 0}
    _image_folder(tmp_path / "train", images, labels, classes, per_class=8)
    broken = tmp_path / "train" / "trouser" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    _image_folder(tmp_path / "val", images[100:], labels[100:], {"trouser": 1, "tshirt": 0}, per_class=4)
    cfg = dataset_cfg("image_folder", root=str(tmp_path / "train"), val_root=str(tmp_path / "val"), img_size=32)
    cfg.knn_bank = cfg.knn_queries = None
    dm = make_dm(cfg, batch_size=5, num_workers=0)
    assert dm.num_classes == 3 and dm.class_names == ("pullover", "trouser", "tshirt")  # folder names, label order

    with caplog.at_level(logging.WARNING, logger="src.data"):
        train = list(dm.train_dataloader())
        bank, queries = dm.knn_dataloaders()
        bank_batches = list(bank)
    assert sum(len(b["label"]) + int(b["skipped"]) for b in train) == 25
    assert sum(int(b["skipped"]) for b in train) == 1
    bank_labels = torch.cat([b["label"] for b in bank_batches])
    assert torch.equal(torch.bincount(bank_labels), torch.tensor([8, 8, 8]))
    assert sum(int(b["skipped"]) for b in bank_batches) == 1
    assert str(broken) in caplog.text
    # val lacks "pullover": labels must still use the training folder's class indices
    assert set(torch.cat([b["label"] for b in queries]).tolist()) == {1, 2}

    with caplog.at_level(logging.WARNING, logger="src.data"):
        pattern = write_shards("folder", str(tmp_path / "train"), "train", tmp_path / "shards", maxcount=10)
    assert f"leaving out unreadable image {broken}" in caplog.text
    shard_labels = torch.stack([s["label"] for s in ShardDataset(pattern, EvalTransform(32, MEAN, STD))])
    assert torch.equal(torch.bincount(shard_labels), torch.tensor([8, 8, 8]))


def test_missing_paths_name_the_config_key(tmp_path):
    """Missing data is the user's to fix: a config error naming the key, raised before any model exists."""
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=rf"dataset.root: .*{re.escape(str(missing))}"):
        make_dm(dataset_cfg("image_folder", root=str(missing)), 8, 0)
    with pytest.raises(ConfigError, match="dataset.root is required"):
        make_dm(dataset_cfg("image_folder"), 8, 0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ConfigError, match=rf"dataset.root: {re.escape(str(tmp_path / 'flat'))} has no class"):
        make_dm(dataset_cfg("image_folder", root=str(tmp_path / "flat")), 8, 0)
    (tmp_path / "flat" / "cls").mkdir()
    with pytest.raises(ConfigError, match=r"dataset.root: no image files .* under .*flat/<class>/"):
        make_dm(dataset_cfg("image_folder", root=str(tmp_path / "flat")), 8, 0)
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "cls" / "a.png")
    with pytest.raises(ConfigError, match=rf"dataset.val_root: .*{re.escape(str(missing))}"):
        make_dm(dataset_cfg("image_folder", root=str(tmp_path / "flat"), val_root=str(missing)), 8, 0)
    urls, first = str(tmp_path / "train-{000000..000001}.tar"), re.escape(str(tmp_path / "train-000000.tar"))
    with pytest.raises(ConfigError, match=rf"dataset.train_urls: shard {first} does not exist"):
        make_dm(dataset_cfg("shards", train_urls=urls, samples_per_epoch=64), 8, 0)


# ---- data kinds ----------------------------------------------------------------------------------------
def test_the_registry_lists_every_kind_and_a_wrong_kind_is_named():
    """One registry, detection's kind included; a data module refuses a kind it does not read, naming those it does."""
    from src.detection.data import CocoDataModule  # registers the coco kind, as importing the methods does in a run

    assert set(DATA_KINDS) == {"fashion_mnist", "image_folder", "shards", "coco"}
    images = r"\('fashion_mnist', 'image_folder', 'shards'\)"
    with pytest.raises(ConfigError, match=rf"^dataset.kind must be one of {images}, got 'nope'$"):
        make_dm(dataset_cfg("fashion_mnist", kind="nope"), 8, 0)
    with pytest.raises(ConfigError, match=rf"one of {images}, got 'coco': coco is read by the detection data module"):
        make_dm(dataset_cfg("fashion_mnist", kind="coco"), 8, 0)
    with pytest.raises(ConfigError, match=r"^dataset.kind must be one of \('coco',\), got 'shards': shards is read by"):
        CocoDataModule(dataset_cfg("shards"), batch_size=1, num_workers=0)


def test_a_new_kind_is_one_registered_class(test_split):
    """A kind states its checks, its sets and its facts; the data module composes it without knowing its name."""
    images, labels = test_split

    @register_kind
    class Tensors(ImageKind):
        name, in_memory = "test_tensors", True

        def check(self) -> None:
            if self.cfg.get("knn_queries") is None:
                raise ConfigError("dataset.knn_queries is required for dataset.kind=test_tensors")

        def build(self) -> dict:
            view, evaluate = self.request.train_view, self.request.eval_view
            return {
                "train": TensorImageDataset(images, labels, view, limit=64, batched=True),
                "bank": TensorImageDataset(images, labels, evaluate, limit=32),
                "queries": TensorImageDataset(images[64:], labels[64:], evaluate, limit=self.cfg.knn_queries),
            }

    try:
        with pytest.raises(ConfigError, match="dataset.knn_queries is required for dataset.kind=test_tensors"):
            make_dm(dataset_cfg("fashion_mnist", kind="test_tensors", knn_queries=None), 16, 0)
        dm = make_dm(dataset_cfg("fashion_mnist", kind="test_tensors", knn_queries=16, tensor_transforms=True), 16, 0)
        bank, queries = dm.knn_dataloaders()
        assert (len(bank.dataset), len(queries.dataset), len(dm.train_dataloader().batch_sampler)) == (32, 16, 4)
        assert dm.kind.num_classes is None and dm.num_classes == 10  # from dataset.num_classes
    finally:
        del DATA_KINDS["test_tensors"]


def test_a_rank_without_a_training_shard_is_refused(tmp_path, test_split):
    images, labels = test_split
    _image_folder(tmp_path / "train", images, labels, {"a": 0, "b": 1}, per_class=4)
    pattern = write_shards("folder", str(tmp_path / "train"), "train", tmp_path / "shards", maxcount=100)
    dm = make_dm(dataset_cfg("shards", train_urls=pattern, samples_per_epoch=8), 4, 0)
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match=r"^dataset.train_urls has 1 shards for 2 ranks; every rank needs at least"):
        dm.train_dataloader()


# ---- tar shards ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_shard_writer_round_trip_with_two_workers(tmp_path, test_split, capsys):
    images, labels = test_split
    argv = ["--source", "fashion_mnist", "--root", str(FMNIST_ROOT), "--split", "test", "--out", str(tmp_path)]
    write_shards_main([*argv, "--maxcount", "64", "--limit", "200"])
    pattern = capsys.readouterr().out.strip()
    assert pattern == str(tmp_path / "train-{000000..000003}.tar")

    size = images.shape[-1]  # no resize, so the pixels must come back exactly
    cfg = dataset_cfg("shards", train_urls=pattern, val_urls=pattern, samples_per_epoch=160, img_size=size)
    cfg.mean, cfg.std, cfg.num_classes, cfg.knn_bank, cfg.knn_queries = MEAN, STD, 10, None, None
    dm = make_dm(cfg, batch_size=32, num_workers=2)
    bank, _ = dm.knn_dataloaders()
    got = list(bank)
    pixels, got_labels = to_uint8(torch.cat([b["image"] for b in got])), torch.cat([b["label"] for b in got])
    assert sorted(zip(got_labels.tolist(), [p.numpy().tobytes() for p in pixels], strict=True)) == sorted(
        zip(labels[:200].tolist(), [p.numpy().tobytes() for p in images[:200]], strict=True)
    )
    train = dm.train_dataloader()
    batches = list(train)
    assert len(train) == len(batches) == 5 and all(b["image"].shape == (32, 3, size, size) for b in batches)


def _corrupt_member(shard: Path, name: str, payload: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = payload if member.name == name else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_corrupt_sample_and_truncated_shard_are_skipped_counted_and_named(tmp_path):
    pattern = write_shards("fashion_mnist", str(FMNIST_ROOT), "test", tmp_path, maxcount=50, limit=200)
    bad_shard, cut_shard = tmp_path / "train-000001.tar", tmp_path / "train-000002.tar"
    _corrupt_member(bad_shard, "train_00000060.png", b"\x89PNG\r\n\x1a\n garbage, not image data")
    with tarfile.open(cut_shard) as tar:
        cut_at = tar.getmember("train_00000120.png").offset_data + 100  # mid-image: samples 100-119 survive
    cut_shard.write_bytes(cut_shard.read_bytes()[:cut_at])

    cfg = dataset_cfg(
        "shards", train_urls=pattern, val_urls=pattern, samples_per_epoch=192, img_size=32, num_classes=10
    )
    cfg.knn_bank = cfg.knn_queries = None
    dm = make_dm(cfg, batch_size=16, num_workers=2)
    log_file = tmp_path / "warnings.log"
    handler = logging.FileHandler(log_file)  # forked DataLoader workers inherit it; caplog cannot see them
    logging.getLogger("src.data").addHandler(handler)
    try:
        bank, _ = dm.knn_dataloaders()
        batches = list(bank)
        train = dm.train_dataloader()
        assert len(list(train)) == len(train) == 12  # cycling past the damage still fills the epoch
    finally:
        logging.getLogger("src.data").removeHandler(handler)
        handler.close()
    assert sum(len(b["label"]) for b in batches) == 50 + 49 + 20 + 50
    assert sum(int(b["skipped"]) for b in batches) == 1 + 30  # the corrupt image, and what the cut shard lost
    lines = log_file.read_text().splitlines()
    assert any(str(bad_shard) in line and "train_00000060" in line for line in lines)
    lost = "after 20 samples (30 samples lost"
    assert any(str(cut_shard) in line and "truncated" in line and lost in line for line in lines)


def test_a_shard_cut_at_a_member_boundary_is_counted_from_its_manifest(tmp_path):
    pattern = write_shards("fashion_mnist", str(FMNIST_ROOT), "test", tmp_path, maxcount=20, limit=40)
    assert json.loads((tmp_path / "train-shards.json").read_text()) == {"train-000000.tar": 20, "train-000001.tar": 20}
    cut = tmp_path / "train-000001.tar"
    with tarfile.open(cut) as tar:  # what remains is a valid tar of 5 samples: only the manifest knows better
        boundary = min(m.offset for m in tar.getmembers() if m.name.startswith("train_00000025."))
    cut.write_bytes(cut.read_bytes()[:boundary] + bytes(1024))

    def one_pass() -> list:
        return list(ShardDataset(pattern, lambda img: {"image": torch.zeros(1)}))

    samples = one_pass()
    assert len(samples) == 40 and sum(s is None for s in samples) == 15
    (tmp_path / "train-shards.json").unlink()  # a shard set from elsewhere: nothing to compare with
    assert len(one_pass()) == 25


def test_a_failed_shard_write_leaves_no_shard_behind(tmp_path):
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "cats" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="no readable images"):
        write_shards("folder", str(tmp_path / "photos"), "train", tmp_path / "shards")
    assert not list((tmp_path / "shards").iterdir())  # no empty tar, no manifest, no staging folder


@pytest.mark.slow
def test_shard_epochs_drive_a_lightning_fit(tmp_path):
    pattern = write_shards("fashion_mnist", str(FMNIST_ROOT), "test", tmp_path, maxcount=40, limit=80)
    cfg = dataset_cfg("shards", train_urls=pattern, samples_per_epoch=70, img_size=16, shuffle_buffer=20)
    dm = make_dm(cfg, batch_size=16, num_workers=0)
    assert dm.knn_dataloaders() is None and dm.val_dataloader() == []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3 * 16 * 16, 10)
            self.seen = 0

        def training_step(self, batch, batch_idx):
            self.seen += len(batch["label"])
            return torch.nn.functional.cross_entropy(self.head(batch["image"].flatten(1)), batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, dm)
    assert trainer.num_training_batches == 4 and probe.seen == 2 * 4 * 16
