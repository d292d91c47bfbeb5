"""Real multi-process runs on this CPU (gloo over loopback): results do not depend on the process count.

torchrun starts two one-process "nodes" on 127.0.0.1, against one process with the same global batch and
seed (a run in the test's own process, on one thread as each node). Logged losses and final weights must agree
to float tolerance, with one run folder. The elastic tests resume a run at another world size and check that
the global batch and the step carry over. MAE and a linear probe in one process, under DDP and under FSDP2
are in tests/test_fsdp.py (which uses the helpers here).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY, command, compose_config, free_port

from src.config import ConfigError
from src.data.distributed import GlobalBatchSampler, RankStrideSampler, evaluation_split
from src.shards import is_sharded, read_sharded

pytestmark = pytest.mark.slow

# A constant lr (no warm-up, cosine floor = peak): a run cut by max_steps and resumed follows the same schedule.
FLAT_LR = [
    "warmup_epochs=0",
    "objective.optim.base_lr=1.5e-4",
    "objective.optim.min_lr=1.5e-4",
    "objective.optim.reference_batch=16",
]
MAE_SMALL = ["objective.decoder_dim=64", "objective.decoder_depth=1", "objective.decoder_heads=4"]
QUIET = ["knn.every_n_epochs=100", "pictures.every_n_steps=1000", "export=false", "trainer.log_every_n_steps=1"]
GLOBAL_BATCH = 16


def env() -> dict[str, str]:
    # one thread per process in both layouts, so that the float sums are ordered alike
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def base_args(runs: Path, batch_size: int) -> list[str]:
    args = [a for a in TINY if not a.startswith(("batch_size", "trainer.devices"))]
    return [*args, *MAE_SMALL, *FLAT_LR, *QUIET, f"runs_dir={runs}", f"batch_size={batch_size}", "epochs=1"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread, as in each process of the two-node runs (``OMP_NUM_THREADS=1``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_process(door: str, args: list[str]) -> None:
    """The run in this process: the pipeline the command runs, on the config its Hydra composes."""
    from src.pipeline.fit import run  # here: the ranks of the spawned test below import this module

    with one_thread():
        run(compose_config([*args, "trainer.devices=1"], config_name=door.removeprefix("src.")))


def two_nodes(
    door: str, args: list[str], strategy: str = "ddp", timeout: int = 300
) -> list[subprocess.CompletedProcess]:
    """torchrun --nnodes=2 --nproc-per-node=1 twice, node ranks 0 and 1, rendezvous on loopback; both finish."""
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            door,
            *args,
            "trainer.devices=1",
            "trainer.num_nodes=2",
            f"trainer.strategy={strategy}",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    done = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    for node in done:
        assert node.returncode == 0, node.stdout[-3000:]
    return done


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """Step -> the value of ``key`` in the run's CSV history (the last row per step)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the run's last checkpoint: one file, or a folder of shards (trainer=fsdp) gathered here."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if is_sharded(last):
        return read_sharded(last)
    return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path, atol: float = 5e-5) -> None:
    """Float tolerance for AdamW: a step moves a weight by up to lr (1.5e-4), so gradients that differ in their
    last bits (summed in another order) may move a weight with a tiny gradient by a fraction of one step."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa if wa[k].is_floating_point())
    assert worst < atol, f"largest weight difference {worst}"


def test_the_global_batch_is_the_same_samples_at_any_world_size():
    """Chunks of every rank and micro-step, put together, are the one-process global batch, seeds included."""
    position = lambda: (1, 0)  # noqa: E731 - epoch 1, nothing done
    one = list(GlobalBatchSampler(100, 16, 1, 0, 1, seed=3, position=position))
    for world, accumulate in ((2, 1), (4, 1), (2, 2), (1, 4)):
        ranks = [
            list(GlobalBatchSampler(100, 16 // (world * accumulate), world, r, accumulate, 3, position))
            for r in range(world)
        ]
        assert all(len(r) == len(one) * accumulate for r in ranks)
        for step, batch in enumerate(one):
            parts = [ranks[r][step * accumulate + a] for a in range(accumulate) for r in range(world)]
            assert sorted(key for part in parts for key in part) == sorted(batch), (world, accumulate, step)
    # a resumed epoch starts after the steps its trainer has done, in any layout
    resumed = list(GlobalBatchSampler(100, 8, 2, 1, 1, 3, lambda: (1, 6 + 2)))
    assert resumed == list(GlobalBatchSampler(100, 8, 2, 1, 1, 3, position))[2:]
    with pytest.raises(ConfigError, match=r"^batch_size=16: the training set has 10 samples .* smaller batch_size"):
        GlobalBatchSampler(10, 16, 1, 0, 1, 3, position)  # a set smaller than one global batch: named, not a traceback
    assert list(RankStrideSampler(7, 2, 1)) == [1, 3, 5]
    for size, world, batch, even in ((33, 2, 8, 9), (32, 2, 8, 8), (50, 4, 4, 5), (3, 2, 8, 8)):
        trainers = [SimpleNamespace(world_size=world, global_rank=rank) for rank in range(world)]
        splits = [evaluation_split(trainer, size, batch) for trainer in trainers]
        assert {b for _, b in splits} == {even}  # every rank the same number of batches (FSDP2 waits otherwise)
        assert len({-(-len(sampler) // even) for sampler, _ in splits}) == 1, (size, world, batch)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """MAE in one process at the global batch: one epoch of 4 steps, the run every other layout must match."""
    runs = tmp_path_factory.mktemp("reference")
    one_process("src.pretrain", [*base_args(runs, GLOBAL_BATCH), "run_name=one"])
    return runs / "one"


def test_elastic_resume_keeps_the_global_batch_and_the_step(tmp_path, reference_run, caplog):
    """One run resumed at another world size both ways: 1 process (accumulation 2) for steps 0-1, 2 nodes
    (accumulation 1) for step 2, 1 process again (2) for step 3. The same weights as the uninterrupted run."""
    args = [*base_args(tmp_path, GLOBAL_BATCH // 2), "run_name=elastic"]
    more = [*args, "resume_changes=[trainer.max_steps]"]
    one_process("src.pretrain", [*args, "trainer.max_steps=2", "trainer.accumulate_grad_batches=2"])
    grown = two_nodes("src.pretrain", [*more, "trainer.max_steps=3"])[0].stdout
    with caplog.at_level("INFO"):
        one_process("src.pretrain", more)  # to the end of the epoch
    for told in (grown, caplog.text):  # 1 -> 2 processes (accumulation 2 -> 1), then 2 -> 1 (1 -> 2)
        assert "the global batch stays 16" in told and "resuming from" in told, told[-3000:]
    state = torch.load(tmp_path / "elastic" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 4 and state["data_layout"]["global_batch"] == GLOBAL_BATCH
    losses, reference = logged(tmp_path / "elastic", "train/loss"), logged(reference_run, "train/loss")
    assert sorted(reference) == [0, 1, 2, 3]
    # with accumulation Lightning logs each micro-batch's loss; the two-node step logs the global batch's
    assert abs(losses[2] - reference[2]) < 1e-5, (losses, reference)
    assert_same_weights(reference_run, tmp_path / "elastic")


def test_a_detection_step_on_two_nodes_matches_one_process(tmp_path):
    """MIMDet at sample ratio 0.5: 2 nodes x 2 images against 1 x 4, same seed, one optimizer step.

    Sizes, token samples and the RPN/RoI samples follow each image's seed; the heads' BatchNorms see the
    global batch; the validation images are split over the ranks and their AP gathered. One image size
    (96 px scenes, no crop branch), so that the padded batches agree too, and no drop path (it draws per rank).
    """
    from test_detection import detect_overrides

    fixed = [
        "dataset.sizes.train=[96]",
        "dataset.crop.prob=0",
        "objective.random_decoder=true",
        "objective.drop_path=0",
    ]
    args = [a for a in detect_overrides(tmp_path, *fixed) if not a.startswith(("batch_size", "trainer.devices"))]
    # One step: after it, float-level weight differences can flip a discrete choice (a proposal kept by NMS or
    # top-k), so later losses agree only in distribution; the step itself and its update agree to float rounding.
    args += ["trainer.log_every_n_steps=1", "export=false", "trainer.max_steps=1"]
    # A process of its own, as each node's: the first detection model a process builds draws a throwaway block
    # from the global generator (src/detection/backbone.py: _block_keys, cached), so a run here would depend on
    # the tests before it. It builds the scenes first.
    single = command("src.finetune", [*args, "trainer.devices=1", "batch_size=4", "run_name=one"], OMP_NUM_THREADS="1")
    assert single.returncode == 0, single.stderr[-3000:]
    two_nodes("src.finetune", [*args, "batch_size=2", "run_name=two"])
    a, b = logged(tmp_path / "one", "train/loss"), logged(tmp_path / "two", "train/loss")
    assert sorted(a) == sorted(b) == [0]
    assert abs(a[0] - b[0]) < 1e-5 * abs(a[0]), (a, b)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-4)
    ap = [logged(tmp_path / name, "val/box/ap") for name in ("one", "two")]
    assert ap[0] and ap[0] == pytest.approx(ap[1], abs=1e-3)  # each rank evaluates half the images, AP gathered


def test_a_rank_that_composed_another_config_stops_the_run():
    """Each process composes the command's config itself; one that differs from rank zero's is refused."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from src.config import RunStopped
    from src.pipeline.fit import SameConfigOnEveryRank  # the pipeline's import order (methods, then callbacks)

    mine, rank_zeros = (
        SameConfigOnEveryRank(OmegaConf.create({"a": 1})),
        SameConfigOnEveryRank(OmegaConf.create({"a": 2})),
    )
    strategy = SimpleNamespace(broadcast=lambda value, src: rank_zeros.digest)
    trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=strategy)
    with pytest.raises(RunStopped, match="rank 1 composed another config than rank 0"):
        mine.setup(trainer, None, "fit")
    rank_zeros.setup(trainer, None, "fit")  # the same config passes


def test_shards_are_split_over_ranks_without_duplicates_and_resampled_streams_per_rank(tmp_path, monkeypatch):
    """One pass: ranks read disjoint shards that together hold every sample once. Resampled: each rank draws
    its own endless stream of shards with replacement, cut to its share of samples_per_epoch."""
    from src.data.shards import ShardDataset
    from src.data.transforms import EvalTransform
    from src.data.write_shards import write_shards

    pattern = write_shards(
        "fashion_mnist", "/usr/share/datasets/fashion-mnist", "test", tmp_path, maxcount=10, limit=40
    )
    transform = EvalTransform(28, [0.5] * 3, [0.5] * 3)

    def labels_read(rank: int, **kwargs) -> list[int]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        return [int(s["label"]) for s in ShardDataset(pattern, transform, **kwargs)]

    one_pass = [labels_read(rank, split_by_node=True) for rank in range(2)]
    assert [len(r) for r in one_pass] == [20, 20]  # shards 0, 2 and 1, 3 of the four
    everything = [int(s["label"]) for s in ShardDataset(pattern, transform)]
    assert sorted(one_pass[0] + one_pass[1]) == sorted(everything) and len(everything) == 40

    torch.manual_seed(0)
    streams = [labels_read(rank, resampled=True, num_samples=30, batch_size=5) for rank in range(2)]
    assert [len(s) for s in streams] == [15, 15] and streams[0] != streams[1]


def _global_mean_on_rank(rank: int, store_path: str, results: dict) -> None:
    """One rank of the global-mean check: rank 0 holds 3 terms, rank 1 holds 1."""
    from types import SimpleNamespace

    from src.methods.base import TrainingMethod

    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    terms = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])[rank, : 3 if rank == 0 else 1].requires_grad_()
    fake = SimpleNamespace(_trainer=True, trainer=SimpleNamespace(world_size=2))
    loss = TrainingMethod.global_mean(fake, terms.sum(), terms.numel())
    loss.backward()
    grads = [torch.zeros(3), torch.zeros(3)]
    torch.distributed.all_gather(grads, torch.nn.functional.pad(terms.grad, (0, 3 - terms.numel())) / 2)
    results[rank] = (loss.item(), [g.tolist() for g in grads])  # DDP averages gradients: hence the / 2
    torch.distributed.destroy_process_group()


def test_a_loss_over_a_varying_number_of_terms_is_the_global_batch_mean(tmp_path):
    """BEiT's masked tokens (or detection's positive RoIs) differ in number per rank: the loss each rank
    back-propagates, averaged as DDP averages, has the gradient of the mean over all terms of the global batch."""
    manager = torch.multiprocessing.Manager()
    results = manager.dict()
    torch.multiprocessing.spawn(_global_mean_on_rank, args=(str(tmp_path / "store"), results), nprocs=2)
    mean = (1 + 2 + 3 + 10) / 4
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(mean)  # the logged value: the mean over the ranks
    grads = results[0][1]
    assert grads[0] == pytest.approx([0.25, 0.25, 0.25]) and grads[1][0] == pytest.approx(0.25)  # d mean / d term
