"""One process, DDP and FSDP2 (``trainer=fsdp``, torch's ``fully_shard``), run for real on this CPU with gloo.

MAE pretraining and a linear probe, each in three layouts: one process at the global batch (in this process,
on one thread), two DDP processes (torchrun: two one-process "nodes" on 127.0.0.1) and two FSDP2 processes at
half of it, both pairs at once (four one-thread processes on the two cores). Logged losses and final weights
agree to float rounding, with one run folder per layout. A sharded checkpoint (a folder of shards) written by
two processes is resumed by one and then by two again, and ends at the uninterrupted run's weights.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY, both_ranks, command, compose_config
from test_distributed import (
    GLOBAL_BATCH,
    assert_same_weights,
    base_args,
    logged,
    one_process,
    two_nodes,
    weights,
)

from src.config import ConfigError
from src.encoders.loading import InitCheckpoint
from src.pipeline.fit import run
from src.pipeline.run_folder import LAST, PREVIOUS, resume_checkpoint
from src.shards import checkpoint_meta, is_sharded

pytestmark = pytest.mark.slow


def probe_args(runs: Path, pretrained: Path) -> list[str]:
    """A linear probe (BatchNorm + linear head) on the encoder of a pretraining run, one epoch at a flat lr."""
    args = [a for a in TINY if not a.startswith(("batch_size", "trainer.devices"))]
    return [
        *args,
        "objective=linear",
        f"init.checkpoint={pretrained / 'checkpoints' / 'last.ckpt'}",
        f"runs_dir={runs}",
        "epochs=1",
        "warmup_epochs=0",
        "objective.optim.base_lr=1e-3",
        "objective.optim.min_lr=1e-3",
        "objective.optim.reference_batch=16",
        "trainer.log_every_n_steps=1",
        "dataset.knn_queries=33",  # an odd count: the ranks validate 17 and 16 images
    ]


def said(ranks: list) -> str:
    """What rank zero printed, once every rank has finished well."""
    for rank in ranks:
        assert rank.returncode == 0, rank.stderr[-3000:]
    return ranks[0].stdout + ranks[0].stderr


@dataclass
class Layouts:
    """The run folders of one run in three layouts, and what rank zero of each two-process layout printed."""

    runs: dict[str, Path]
    printed: dict[str, str]


def three_layouts(door: str, args: list[str], runs: Path) -> Layouts:
    """``args`` in one process (batch 16), and as two DDP and two FSDP2 processes (batch 8 each)."""
    one_process(door, [*args, f"batch_size={GLOBAL_BATCH}", "run_name=one"])
    half = [*args, f"batch_size={GLOBAL_BATCH // 2}"]
    with ThreadPoolExecutor(2) as pool:
        ddp = pool.submit(two_nodes, door, [*half, "run_name=ddp"])
        fsdp = pool.submit(both_ranks, door, [*half, "trainer=cpu_fsdp", "run_name=fsdp"], OMP_NUM_THREADS="1")
        printed = {"ddp": ddp.result()[0].stdout, "fsdp": said(fsdp.result())}
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "fsdp", "one"]  # one folder per run, every rank's
    return Layouts({name: runs / name for name in ("one", "ddp", "fsdp")}, printed)


def assert_layouts_agree(layouts: Layouts) -> None:
    """Every layout logs the one-process losses and ends at its weights; the table goes to the test's output."""
    runs = layouts.runs
    losses = {name: logged(run, "train/loss") for name, run in runs.items()}
    reference = weights(runs["one"])
    print(f"{'layout':<6} {'losses at steps ' + ', '.join(map(str, sorted(losses['one']))):<48} max |w - w_one|")
    for name, folder in runs.items():
        mine = weights(folder)
        assert mine.keys() == reference.keys()
        gap = max((mine[k].float() - reference[k].float()).abs().max().item() for k in mine)
        print(f"{name:<6} {', '.join(f'{v:.6f}' for _, v in sorted(losses[name].items())):<48} {gap:.2e}")
        assert sorted(losses[name]) == sorted(losses["one"]) == [0, 1, 2, 3]
        assert all(abs(losses[name][s] - losses["one"][s]) < 1e-5 for s in losses["one"]), losses
        assert_same_weights(runs["one"], folder)
    assert is_sharded(runs["fsdp"] / "checkpoints" / LAST)  # FSDP2 writes a folder of shards, DDP one file


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory) -> Layouts:
    runs = tmp_path_factory.mktemp("mae")
    return three_layouts("src.pretrain", base_args(runs, GLOBAL_BATCH), runs)


def test_mae_agrees_in_one_process_under_ddp_and_under_fsdp2(pretraining: Layouts) -> None:
    assert_layouts_agree(pretraining)
    for printed in pretraining.printed.values():
        assert "global batch 16 = 8 per micro-batch x 2 processes x 1 accumulated" in printed
        assert "lr 0.00015 (base 0.00015 x 16/16)" in printed  # scaled with the true global batch
    knn = [json.loads((run / "metrics.json").read_text())["knn/top1"] for run in pretraining.runs.values()]
    assert len(set(knn)) == 1, knn  # the kNN monitor: under FSDP2 every rank runs it, rank zero reports
    pictures = pretraining.runs["fsdp"] / "pictures"  # drawn by every rank, saved by rank zero
    assert (pictures / "step0000000.png").is_file() and (pictures / "first_and_last.png").is_file()


def test_a_linear_probe_agrees_in_one_process_under_ddp_and_under_fsdp2(pretraining: Layouts, tmp_path) -> None:
    """The fine-tune front door, from the one-process MAE checkpoint (the frozen encoder is sharded too). The
    probe's BatchNorm normalises with the global batch's statistics in every layout (GlobalBatchNorm), and the
    validation on 33 test images is split over the ranks (17 and 16, in as many batches) and reduced."""
    probe = three_layouts("src.finetune", probe_args(tmp_path, pretraining.runs["one"]), tmp_path)
    assert_layouts_agree(probe)
    top1 = [logged(run, "val/top1") for run in probe.runs.values()]
    assert top1[0] and top1[0] == top1[1] == top1[2]


def test_a_sharded_checkpoint_resumes_on_one_process_and_on_two(pretraining: Layouts, tmp_path) -> None:
    """2 FSDP2 processes for steps 0-1, 1 process (accumulation 2) for step 2, then 2 nodes of 1 process each for
    step 3, hybrid (a 2-D mesh: replicated across the nodes): the weights of the uninterrupted one-process run, and
    every checkpoint a folder of shards with the one before it kept."""
    args = [*base_args(tmp_path, GLOBAL_BATCH // 2), "trainer=cpu_fsdp", "run_name=resumed"]
    more = [*args, "resume_changes=[trainer.max_steps]"]
    last = tmp_path / "resumed" / "checkpoints" / LAST
    said(both_ranks("src.pretrain", [*args, "trainer.max_steps=2"], OMP_NUM_THREADS="1"))
    shrunk = said([command("src.pretrain", [*more, "trainer.devices=1", "trainer.max_steps=3"], OMP_NUM_THREADS="1")])
    grown = two_nodes("src.pretrain", [*more, "trainer.fsdp.hybrid=true"], strategy="fsdp")[0].stdout
    assert "FSDP2 over 2 processes (2 nodes x 1 processes, hybrid): one unit per Block (3), then the module" in grown
    for told, change in ((shrunk, "2 -> 1"), (grown, "1 -> 2")):
        assert f"elastic resume: {change} processes" in told and "the global batch stays 16" in told, told[-3000:]
    assert checkpoint_meta(last)["global_step"] == 4 and is_sharded(last.with_name(PREVIOUS))
    assert_same_weights(pretraining.runs["one"], tmp_path / "resumed")
    one_file = [a for a in more if a != "trainer=cpu_fsdp"] + ["trainer.max_steps=5", "trainer.precision=32-true"]
    with pytest.raises(ConfigError, match=r"last.ckpt is a folder of shards written under trainer=fsdp, and trai"):
        run(compose_config(one_file))


def test_fine_tuning_starts_from_a_sharded_checkpoint_and_refuses_a_damaged_one(pretraining, tmp_path) -> None:
    """A fine-tune's init.checkpoint may be a folder of shards: gathered in one process, read weights-only."""

    folder = pretraining.runs["fsdp"] / "checkpoints" / LAST
    init = InitCheckpoint.read(compose_config([f"init.checkpoint={folder}"], config_name="finetune").init)
    assert init.kind == "lightning" and torch.equal(
        init.state["encoder.cls_token"], weights(pretraining.runs["fsdp"])["encoder.cls_token"]
    )
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / ".metadata").write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")  # a pickle that would run a command
    with pytest.raises(ConfigError, match=r"folder of shards that cannot be read \(UnpicklingError: os.system has no"):
        InitCheckpoint.read(compose_config([f"init.checkpoint={damaged}"], config_name="finetune").init)


def test_an_unreadable_newest_folder_of_shards_falls_back_to_the_one_before(pretraining: Layouts, tmp_path) -> None:
    run_dir = tmp_path / "fsdp"
    shutil.copytree(pretraining.runs["fsdp"], run_dir)
    (run_dir / "checkpoints" / LAST / "meta.pt").write_bytes(b"half a file")  # a disk that lost the end of it
    assert resume_checkpoint(run_dir, "auto") == run_dir / "checkpoints" / PREVIOUS


def test_bf16_fsdp2_trains_on_bf16_parameters_over_fp32_master_weights(tmp_path) -> None:
    """trainer=fsdp's default precision, on the CPU: the loss falls, the shards hold fp32 weights."""
    args = [*base_args(tmp_path, GLOBAL_BATCH // 2), "trainer=cpu_fsdp", "trainer.precision=bf16-mixed"]
    said(both_ranks("src.pretrain", [*args, "objective.optim.base_lr=1e-2", "run_name=bf16"], OMP_NUM_THREADS="1"))
    losses = logged(tmp_path / "bf16", "train/loss")
    assert sorted(losses) == [0, 1, 2, 3] and losses[3] < losses[0], losses
    shards = weights(tmp_path / "bf16")
    assert {t.dtype for t in shards.values() if t.is_floating_point()} == {torch.float32}
