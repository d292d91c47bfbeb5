"""The trainer and the kNN monitor refuse, before any work and in one line, what Lightning or the kNN vote would
only fail on (or quietly change) later; a rank that stops answering ends a run in bounded time, resumably."""

from __future__ import annotations

import copy
import importlib.util
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY, compose_config, composition_refusal, free_port
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError
from PIL import Image
from torch import nn

from src.config import ConfigError, validate
from src.evaluation.knn import check_bank, knn_predict
from src.pipeline.fit import build_trainer, prepare, run
from src.pipeline.strategy import build_strategy, check_trainer

LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"]
ANY_MACHINE = tuple(a for a in TINY if not a.startswith("trainer."))  # the trainer choice says where the run goes
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")


def pretrain(*extra: str, base: tuple[str, ...] = tuple(TINY)) -> DictConfig:
    return compose_config([*base, *LIGHT, "runs_dir=/nonexistent", *extra])


def knn_evaluation(*extra: str) -> DictConfig:
    return compose_config([*TINY, "objective=knn", "runs_dir=/nonexistent", *extra], config_name="finetune")


def refusal(cfg: DictConfig) -> str:
    """The one line ``prepare`` refuses ``cfg`` with."""
    with pytest.raises(ConfigError) as refused:
        prepare(cfg)
    message = str(refused.value)
    assert "\n" not in message
    return message


# ---- item 6: one set of kNN rules for the monitor and the evaluation ------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "requirement"),
    [
        ("k", "0", "must be >= 1 (the neighbours that vote)"),
        ("temperature", "0", "must be > 0 (the votes are exp(sim / T))"),
        ("temperature", "-1", "must be > 0"),
        ("temperature", "inf", "must be finite"),
    ],
)
def test_the_knn_monitor_refuses_what_the_knn_evaluation_refuses(key: str, value: str, requirement: str) -> None:
    monitor = refusal(pretrain(f"knn.{key}={value}"))
    evaluation = refusal(knn_evaluation(f"objective.{key}={value}"))
    assert monitor.startswith(f"knn.{key}=") and requirement in monitor
    assert evaluation == monitor.replace("knn.", "objective.", 1)  # one rule, one wording


@pytest.mark.parametrize("value", ["2.5", "true"])  # true: Python's 1
def test_a_k_that_is_no_integer_fails_in_composition_naming_the_key(value: str) -> None:
    """The schema's type (src/schema.py: KnnVote) is the same for both; composition refuses it, naming the key."""
    for key, door in (("knn.k", "pretrain"), ("objective.k", "finetune")):
        said = composition_refusal([f"{key}={value}", *(["objective=knn"] if door == "finetune" else [])], door)
        assert f"full_key: {key}" in said and "could not be converted to Integer" in said


def test_the_knn_monitor_needs_a_positive_cadence() -> None:
    assert refusal(pretrain("knn.every_n_epochs=0")) == "knn.every_n_epochs=0 must be >= 1"


def test_k_larger_than_the_bank_is_refused_not_quietly_lowered() -> None:
    """Both know their bank from dataset.knn_bank: one rule, before any work."""
    for key, cfg in (("knn.k", pretrain("knn.k=65")), ("objective.k", knn_evaluation("objective.k=65"))):
        assert refusal(cfg) == (
            f"{key}=65 is more neighbours than the kNN bank holds (64 images): use {key}<=64 or a larger "
            "dataset.knn_bank"
        )


def test_the_monitor_counts_a_bank_smaller_than_knn_bank_before_the_first_step(tmp_path: Path) -> None:
    """An image folder holds fewer images than dataset.knn_bank=64 names: counted on every rank at setup."""
    for split in ("train", "val"):
        for label in ("cats", "dogs"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / split / label / f"{i}.png")
    folders = [f"dataset.root={tmp_path / 'train'}", f"dataset.val_root={tmp_path / 'val'}"]
    cfg = pretrain("dataset=image_folder", *folders, "dataset.train_limit=null", "batch_size=4")
    cfg.runs_dir = str(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"^knn\.k=20 is more neighbours than the kNN bank holds \(8 images\)"):
        run(cfg)
    assert not (Path(cfg.run_dir) / "checkpoints").exists()  # refused before the first step


def test_a_small_temperature_still_votes_for_the_nearest_class() -> None:
    """exp(sim / 0.005) overflows float32: every vote was inf, every class tied, and the first class won."""
    bank = F.normalize(torch.tensor([[1.0, 0.08], [1.0, 0.0]]), dim=1)  # class 0 a little further than class 3
    query = F.normalize(torch.tensor([[1.0, 0.01]]), dim=1)
    scores = knn_predict(bank, torch.tensor([0, 3]), query, num_classes=4, k=2, temperature=0.005)
    assert torch.isfinite(scores).all() and scores.argmax().item() == 3


# ---- items 15, 16: trainer values and machines Lightning refuses only once everything is built ----------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.devices=0", "trainer.devices=0 must be auto, a positive integer, -1 (every GPU) or a list"),
        ("trainer.devices=-2", "trainer.devices=-2 must be auto, a positive integer, -1 (every GPU) or a list"),
        ("trainer.devices=[0,0]", "trainer.devices=[0, 0] must be auto"),
        ("trainer.num_nodes=0", "trainer.num_nodes=0 must be >= 1"),
        ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps=-1 must be >= 1"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be >= 1"),
        ("trainer.num_sanity_val_steps=-5", "trainer.num_sanity_val_steps=-5 must be >= -1 (-1: all)"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1.0 must be >= 0"),
        ("trainer.timeout_s=0", "trainer.timeout_s=0.0 must be > 0 (seconds a rank waits for the others"),
        ("trainer.devices=[0,1]", "trainer.devices=[0, 1] names GPUs, and this run is on the CPU"),
        ("trainer.precision=16-mixed", "trainer.precision=16-mixed is fp16 autocast, which the CPU does not have"),
        ("trainer.strategy=xla", "trainer.strategy=xla runs on tpu devices only, and this run is on cpu"),
        ("trainer.strategy=single_device", "trainer.strategy=single_device runs one process, and trainer.devices=2"),
    ],
)
def test_trainer_values_that_cannot_work_are_refused_before_any_work(override: str, message: str) -> None:
    overrides = ["trainer.devices=2"] if "single_device" in override else []
    assert refusal(pretrain(*overrides, override)).startswith(message)


@NO_GPU
@pytest.mark.parametrize("choice", ["trainer=gpu", "trainer=fsdp"])
def test_a_gpu_trainer_on_a_machine_without_one_names_the_way_out(choice: str) -> None:
    assert refusal(pretrain(choice, base=ANY_MACHINE)) == (
        "trainer.accelerator=gpu (as trainer=gpu and trainer=fsdp set it) needs a cuda device, and torch finds none "
        "on this machine: use trainer=default for this machine's CPU, or trainer=cpu_ddp for several CPU processes"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to count")
def test_more_gpus_than_the_machine_has_are_refused() -> None:
    count = torch.cuda.device_count()
    assert refusal(pretrain("trainer=gpu", f"trainer.devices={count + 1}", base=ANY_MACHINE)).startswith(
        f"trainer.devices={count + 1} but this machine has {count} cuda device(s)"
    )


def test_compile_without_a_cpp_compiler_is_refused_before_any_work() -> None:
    import torch._inductor.config

    # inductor's own patch: monkeypatch's undo would hide the key from every later compile in this process
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        refused = refusal(pretrain("trainer.compile=true"))
    assert refused.startswith("trainer.compile=true on the CPU needs a C++ compiler")
    assert torch._inductor.config.cpp.cxx != (None, "/nonexistent/g++")  # put back as it was


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_a_strategy_whose_package_is_missing_is_refused() -> None:
    assert refusal(pretrain("trainer.strategy=deepspeed", "trainer.devices=2")).startswith(
        "trainer.strategy=deepspeed: To use the `DeepSpeedStrategy`, you must have DeepSpeed installed"
    )


# ---- fuzz: whatever the checks let through, Lightning builds a Trainer from; the rest is one named line ------
# Per key, values a run may well use: drawn half of the time, so that mixes of them reach Lightning.
PLAUSIBLE = {
    "trainer.devices": [1, 2, "auto", -1, [0]],
    "trainer.num_nodes": [1, 2],
    "trainer.accelerator": ["auto", "cpu", "gpu", "cuda"],
    "trainer.strategy": ["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "single_device", "fsdp"],
    "trainer.precision": ["auto", "32-true", "bf16-mixed", "bf16-true", "16-true", "64-true", "16-mixed", 32],
    "trainer.timeout_s": [0.5, 60, 1800],
    "trainer.log_every_n_steps": [1, 50],
    "trainer.num_sanity_val_steps": [-1, 0, 2],
    "trainer.gradient_clip_val": [None, 0, 0.5, 3],
    "trainer.accumulate_grad_batches": [1, 4],
    "trainer.max_steps": [-1, 1, 100],
    "trainer.max_epochs": [None, -1, 1, 5],
    "knn.k": [1, 20, 64],
    "knn.temperature": [1e-6, 0.07, 1e6],
    "knn.every_n_epochs": [1, 3],
}
# Anything a command line can give: numbers of every kind, names of other keys, null, booleans, lists.
ANYTHING = st.one_of(
    st.integers(-3, 4),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "2", "0,1", "mps", "tpu", "deepspeed", "single_xla", "xla", "transformer-engine", "16"]),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-1, 3), max_size=3),
)
MUTATION = st.sampled_from(sorted(PLAUSIBLE)).flatmap(
    lambda key: st.tuples(st.just(key), st.one_of(st.sampled_from(PLAUSIBLE[key]), ANYTHING))
)


class Built:
    """A composed config and its module, built once; hypothesis prints it by name (the mutations tell it all)."""

    def __init__(self, cfg: DictConfig, module: nn.Module) -> None:
        self.cfg, self.module = cfg, module

    def __repr__(self) -> str:
        return "Built(TINY MAE)"


@pytest.fixture(scope="module")
def built() -> Built:
    cfg = pretrain()
    settled = prepare(cfg)
    return Built(settled.cfg, settled.build())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzzed_trainer_and_knn_values_build_a_trainer_or_name_their_key(built: Built, tmp_path: Path, mutations):
    cfg = copy.deepcopy(built.cfg)  # composed onto the schema: a value of the wrong type is refused as it is set
    try:
        for key, value in mutations:
            OmegaConf.update(cfg, key, value, merge=False)
    except ValidationError as e:
        assert e.full_key in dict(mutations), str(e)
        event(f"refused by type: {e.full_key}")
        return
    try:
        validate(cfg)
        check_trainer(cfg)
        check_bank(cfg.knn.k, 64, "knn.k")  # TINY's dataset.knn_bank
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith(("trainer.", "knn.")), str(e)
        event(f"refused: {str(e).partition('=')[0]}")
        return
    event("accepted: a Trainer built")
    build_trainer(cfg, tmp_path, [], [], built.module)  # the Trainer the run would get, strategy and plugins included
    bank = F.normalize(torch.randn(64, 8), dim=1)
    scores = knn_predict(bank, torch.arange(64) % 4, bank[:5], 4, cfg.knn.k, cfg.knn.temperature)
    assert torch.isfinite(scores).all() and (scores.sum(1) >= 1).all()  # the nearest votes exp(0) = 1, any T


# ---- item 24: a rank that stops answering ends the run in bounded time, and the run resumes ----------------
def test_every_strategy_between_processes_waits_trainer_timeout_s_at_most() -> None:
    for overrides in (["trainer=cpu_ddp"], ["trainer.devices=2"], ["trainer.strategy=ddp_spawn"]):
        cfg = pretrain(*overrides, "trainer.timeout_s=12.5")
        strategy = build_strategy(cfg, module=None)  # no module: only FSDP looks at its blocks
        assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(seconds=12.5), overrides
    assert build_strategy(pretrain(), module=None) == "auto"  # one process: no process group to wait in


def two_ranks(args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Both ranks of a trainer=cpu_ddp run, started together as torchrun would (LOCAL_RANK set: Lightning then
    launches nothing itself), so that the start fits a short trainer.timeout_s on a loaded machine. Their output
    goes to ``logs/rank<N>.out`` and ``.err``: a pipe nobody reads while a rank waits could block the other."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = []
    for rank in (0, 1):
        with open(logs / f"rank{rank}.out", "w") as out, open(logs / f"rank{rank}.err", "w") as err:
            command = [sys.executable, "-m", "src.pretrain", *args]
            ranks.append(
                subprocess.Popen(command, cwd=REPO, env={**env, "LOCAL_RANK": str(rank)}, stdout=out, stderr=err)
            )
    return ranks


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_within_the_timeout_and_the_run_resumes(tmp_path: Path) -> None:
    args = [a for a in TINY if not a.startswith(("trainer.devices", "batch_size"))]
    args += [*LIGHT, "trainer=cpu_ddp", "batch_size=8", "knn=null", "export=false", "pictures.every_n_steps=1000"]
    args += ["warmup_epochs=0", "epochs=20", "trainer.max_steps=10", "checkpoint_every_n_steps=1"]
    args += ["trainer.timeout_s=10", f"runs_dir={tmp_path / 'runs'}", "run_name=stop"]
    last = tmp_path / "runs" / "stop" / "checkpoints" / "last.ckpt"
    rank0 = tmp_path / "rank0.err"
    ranks = two_ranks(args, tmp_path)
    try:
        while not last.exists():  # the first checkpoint: then rank 1 stops mid-run
            assert ranks[0].poll() is None, rank0.read_text()[-3000:]
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        ranks[0].wait(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        ranks[1].kill()  # SIGKILL ends a stopped process too
        ranks[1].wait()
    errors = rank0.read_text()
    assert ranks[0].returncode == 1 and "Traceback" not in errors, errors[-3000:]
    assert errors.strip().splitlines()[-1] == (
        "run stopped: rank 1 stopped answering within trainer.timeout_s=10: the run can be resumed with the same "
        "command"
    )
    assert waited < 10 + 2.5 + 20  # the timeout, the grace to hear from the live ranks, and a loaded machine
    stopped_at = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert 1 <= stopped_at < 10

    again = two_ranks(args, tmp_path)
    assert [rank.wait(timeout=240) for rank in again] == [0, 0], rank0.read_text()[-3000:]
    assert f"resuming from {last}" in (tmp_path / "rank0.out").read_text()  # the log
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 10
