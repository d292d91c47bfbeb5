"""The distributed kNN evaluation: the strided all-gather in real gloo processes, and objective=knn over two ranks.

The end-to-end test runs the evaluation twice, in this process and through the front door in two processes
(``trainer=cpu_ddp``), and asks for the same metrics: splitting the work between ranks must not change a single
number. The gather test's ranks import this module, so its top imports little (torch, hydra): the project's
modules load inside the tests that use them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, both_ranks, compose_config

from src.evaluation.gather import gather_strided

if TYPE_CHECKING:
    from src.methods.knn import RankSplitLoaders

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

WORLD = 2


def gather_worker(rank: int, store_path: str, out_dir: str) -> None:
    """One rank: gathers its strided slices of known tensors and saves what came back for the parent to check."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    try:
        features = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3) / 7  # 7 rows: ranks hold 4 and 3
        labels = torch.arange(8, dtype=torch.long) * 10  # 8 rows: 4 and 4
        gathered = {
            "features": gather_strided(features[rank::WORLD], WORLD),
            "labels": gather_strided(labels[rank::WORLD], WORLD),
            "one_row": gather_strided(features[:1][rank::WORLD], WORLD),  # rank 1 holds nothing
        }
        try:  # 1 row on rank 0 and 3 on rank 1 cannot come from a strided split: every rank refuses
            gather_strided(labels[:1] if rank == 0 else labels[:3], WORLD)
        except ValueError as error:
            gathered["refused"] = str(error)
        torch.save(gathered, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_strided_restores_dataset_order_on_every_rank(tmp_path):
    mp.spawn(gather_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        features = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3) / 7
        assert got["features"].dtype == torch.float32 and torch.equal(got["features"], features)
        assert got["labels"].dtype == torch.long and torch.equal(got["labels"], torch.arange(8) * 10)
        assert torch.equal(got["one_row"], features[:1])
        assert "rows per rank [1, 3] are not a strided split of 4 rows (expected [2, 2])" in got["refused"]


def test_gather_strided_in_one_process_returns_its_input():
    local = torch.randn(5, 2)
    assert gather_strided(local, 1) is local
    assert gather_strided(local, 2) is local  # no process group: nothing to gather from


def loaders_at_world_size(tmp_path: Path, world: int, *overrides: str) -> RankSplitLoaders:
    """objective=knn's loaders for a trainer of ``world`` processes, without starting any."""
    from src.methods.knn import KNNEvaluation, RankSplitLoaders

    tiny = [a for a in TINY if not a.startswith("dataset.train_limit")]  # shards have no such key
    cfg = compose_config([*tiny, f"runs_dir={tmp_path}", "objective=knn", *overrides], config_name="finetune")
    loaders = RankSplitLoaders(KNNEvaluation.build_data(cfg))
    loaders.trainer = SimpleNamespace(world_size=world, global_rank=0)
    return loaders


def test_fewer_queries_than_processes_are_refused_before_any_work(tmp_path):
    from src.config import ConfigError

    with pytest.raises(ConfigError, match="dataset.knn_queries=1 gives some of the 2 processes nothing"):
        loaders_at_world_size(tmp_path, 2, "dataset.knn_queries=1").val_dataloader()
    bank, queries = loaders_at_world_size(tmp_path, 1, "dataset.knn_queries=1").val_dataloader()
    assert len(bank.dataset) == 64 and len(queries.dataset) == 1  # one process evaluates it as it is


def test_shards_read_whole_by_every_rank_are_refused(tmp_path):
    from src.config import ConfigError
    from src.data.write_shards import write_shards

    pattern = write_shards("fashion_mnist", str(FMNIST_ROOT), "test", tmp_path, maxcount=20, limit=40)
    shards = ["dataset=shards", f"dataset.train_urls='{pattern}'", f"dataset.val_urls='{pattern}'"]
    shards += ["dataset.samples_per_epoch=32", "dataset.num_classes=10", "dataset.shuffle_buffer=0"]
    with pytest.raises(ConfigError, match="every rank reads all the shards"):
        loaders_at_world_size(tmp_path, 2, *shards).val_dataloader()


def knn_run(runs_dir: Path, *overrides: str) -> list[str]:
    """``objective=knn`` on 601 bank images and 301 queries, its run folder ``runs_dir/knn``."""
    args = [a for a in TINY if not a.startswith(("trainer.devices", "dataset.knn_", "batch_size"))]
    args += ["objective=knn", "dataset.knn_bank=601", "dataset.knn_queries=301", "batch_size=64"]
    return [*args, f"runs_dir={runs_dir}", "run_name=knn", *overrides]


@pytest.mark.slow
def test_two_processes_report_the_metrics_of_one(tmp_path):
    from src.pipeline.fit import run

    run(compose_config(knn_run(tmp_path / "one", "trainer.devices=1"), config_name="finetune"))
    ranks = both_ranks("src.finetune", knn_run(tmp_path / "two", "trainer=cpu_ddp"))
    for done in ranks:
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "knn" / "metrics.json").read_text()) for name in ("one", "two"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in ranks[1].stdout + ranks[1].stderr  # 301 and 300 bank images each
    assert two["knn/bank_size"] == one["knn/bank_size"] == 601  # gathered, not duplicated
    assert two["knn/query_size"] == one["knn/query_size"] == 301
    for key in ("knn/top1", "knn/top5", "knn/pixels_top1", "knn/pixels_top5"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert one["knn/pixels_top1"] > 0.5  # a real score: raw pixels are far above chance on Fashion-MNIST
