"""Beyond one machine: trainer choices, FSDP over any encoder's blocks, compiled blocks, SLURM through submitit
and through a plain sbatch script, requeue checkpoints and resuming at another world size."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import submitit
import torch
from conftest import REPO, TINY, compose_config, start_pretraining
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

from src.config import ConfigError
from src.methods import method_class
from src.pipeline.run_folder import LAST, PREVIOUS, check_same_run, record_run, resume_checkpoint
from src.pipeline.settle import settle
from src.pipeline.strategy import (
    FullyShardedStrategy,
    build_strategy,
    cluster_plugins,
    maybe_compile,
    requeue_signal,
    transformer_blocks,
)

MAE_LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2", "knn=null"]
SBATCH = REPO / "recipes" / "slurm" / "pretrain_2nodes.sbatch"
# What srun gives each task of a one-task job (Lightning's SLURMEnvironment reads these).
ONE_TASK_SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "pretrain",
    "SLURM_JOB_ID": "4242",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def built_module(door: str, overrides: list[str]):
    cfg = compose_config(["logger=csv", "runs_dir=/nonexistent", *overrides], config_name=door)
    method = method_class(cfg.method)  # not prepare(): it refuses trainer=fsdp on a machine without a GPU
    settled = settle(cfg, method)
    return settled.cfg, settled.build()


@contextmanager
def with_hydra_node(overrides: list[str]) -> Iterator:
    """The pretrain config with its ``hydra`` node, as the command line composes it (a launcher reads that)."""
    with initialize_config_dir(config_dir=str(REPO / "conf" / "pretrain"), version_base="1.3"):
        yield compose(config_name="pretrain", overrides=overrides, return_hydra_config=True)


# ---- trainer choices and FSDP -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("door", "overrides", "block_names"),
    [
        ("pretrain", ["encoder=vit_t", "+encoder.kwargs.depth=2", "dataset.img_size=32"], {"Block"}),
        ("pretrain", ["encoder=pale_t", "dataset.img_size=64"], {"PaleBlock", "Block"}),  # MAE's decoder: Block
        ("finetune", ["encoder=vit_t", "+encoder.kwargs.depth=2", "dataset.img_size=32"], {"Block"}),
        ("finetune", ["encoder=pale_t", "dataset.img_size=64"], {"PaleBlock"}),
    ],
)
def test_trainer_fsdp_shards_and_checkpoints_each_transformer_block(door, overrides, block_names) -> None:
    """What FSDP2 gets for any encoder: its blocks (MAE's decoder blocks too), one unit and one activation
    checkpoint each; tests/test_fsdp.py runs it for real on two CPU processes."""
    cfg, module = built_module(door, ["trainer=fsdp", *overrides])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    strategy = build_strategy(cfg, module)
    assert isinstance(strategy, FullyShardedStrategy) and strategy.bf16  # bf16 parameters, fp32 reductions
    assert strategy.fsdp.reshard_after_forward and strategy.fsdp.activation_checkpointing and not strategy.fsdp.hybrid
    blocks = transformer_blocks(module)
    assert {type(b).__name__ for b in blocks} == block_names
    if "pale_t" in overrides:  # 2 + 2 + 16 + 2 blocks in four stages
        assert sum(type(b).__name__ == "PaleBlock" for b in blocks) == 22


def test_other_strategies_pass_through_and_trainer_choices_compose() -> None:
    cfg, module = built_module("pretrain", [*TINY, "trainer=cpu_ddp"])
    assert isinstance(build_strategy(cfg, module), DDPStrategy)  # built here: it waits trainer.timeout_s at most
    gpu = compose_config(["trainer=gpu"]).trainer
    assert (gpu.accelerator, gpu.devices, gpu.precision, gpu.compile) == ("gpu", 1, "bf16-mixed", False)
    ddp = compose_config(["trainer=ddp", "trainer.num_nodes=2"], config_name="finetune").trainer
    assert (ddp.strategy, ddp.num_nodes) == ("ddp", 2)
    fsdp = compose_config(["trainer=cpu_fsdp", "trainer.fsdp.hybrid=true"]).trainer
    assert (fsdp.strategy, fsdp.accelerator, fsdp.devices, fsdp.precision) == ("fsdp", "cpu", 2, "32-true")


def test_compile_compiles_every_block_in_place_and_keeps_names_and_numbers(monkeypatch) -> None:
    _, module = built_module("pretrain", [*TINY, *MAE_LIGHT])
    names = list(module.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    eager, _ = module.compute_loss({"image": images})
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))  # inductor: minutes on a CPU
    torch._dynamo.reset()
    maybe_compile(module, True)
    blocks = transformer_blocks(module)
    assert len(blocks) == 3  # two encoder blocks, one decoder block
    assert all(b._compiled_call_impl is not None for b in blocks) and module.encoder._compiled_call_impl is None
    assert list(module.state_dict()) == names  # checkpoints and exports keep their names
    torch.manual_seed(0)
    compiled, _ = module.compute_loss({"image": images})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks really ran through dynamo
    torch.testing.assert_close(compiled, eager)


# ---- SLURM ----------------------------------------------------------------------------------------------
def test_launcher_slurm_renders_the_sbatch_file_that_submitit_would_submit(tmp_path: Path, monkeypatch) -> None:
    overrides = ["trainer=ddp", "launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=8"]
    overrides += ["launcher.partition=gpu", "launcher.mem_gb=256", f"runs_dir={tmp_path}"]
    login_node = tmp_path / "bin"  # submitit's SlurmExecutor wants an `srun` on the PATH: a stand-in that fails
    login_node.mkdir()
    (login_node / "srun").write_text("#!/bin/sh\nexit 1\n")
    (login_node / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{login_node}{os.pathsep}{os.environ['PATH']}")
    with with_hydra_node(overrides) as cfg:
        assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 8, "ddp")
        launcher = instantiate(cfg.hydra.launcher)  # as Hydra builds it for `-m`
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        executors = []
        monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda ex, *args: executors.append(ex) or [])
        assert launcher.launch([["seed=1"]], initial_job_idx=0) == []  # everything up to sbatch itself
    slurm = executors[0]._executor
    text = slurm._make_submission_file_text(slurm._submitit_command_str, "uid")
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", text, flags=re.M))
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "8" and flags["gpus-per-node"] == "8"
    assert flags["partition"] == "gpu" and flags["cpus-per-task"] == "10" and flags["mem"] == "256GB"
    assert flags["time"] == "4320" and "requeue" in flags
    name, delay = flags["signal"].split("@")
    assert delay == "120"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # what submitit's sbatch file exports (its last lines)
    assert "export SUBMITIT_EXECUTOR=slurm" in text
    assert signal.Signals[f"SIG{name}"] == requeue_signal() == signal.SIGUSR2


def test_lightning_takes_over_submitits_signal_and_requeues_on_it(monkeypatch) -> None:
    for key, value in {**ONE_TASK_SLURM, "SUBMITIT_EXECUTOR": "slurm"}.items():
        monkeypatch.setenv(key, value)
    sigterm = signal.getsignal(signal.SIGTERM)
    submitits = signal.signal(signal.SIGUSR2, lambda *_: None)  # as submitit's _handle_signals leaves it
    try:
        plugins = cluster_plugins()
        assert [p.requeue_signal for p in plugins] == [signal.SIGUSR2]
        trainer = L.Trainer(accelerator="cpu", devices=1, plugins=plugins, logger=False, enable_progress_bar=False)
        trainer._signal_connector.register_signal_handlers()  # what trainer.fit does first
        handler = signal.getsignal(signal.SIGUSR2)
        assert isinstance(handler, _HandlersCompose)  # Lightning's: it saves hpc_ckpt_<N>.ckpt, then requeues
        assert trainer._signal_connector._slurm_sigusr_handler_fn in handler.signal_handlers
    finally:
        signal.signal(signal.SIGUSR2, submitits)
        signal.signal(signal.SIGTERM, sigterm)
    monkeypatch.delenv("SLURM_NTASKS")
    assert cluster_plugins() == []  # not on SLURM: Lightning's own environments


def sbatch_script() -> tuple[dict[str, str], list[str]]:
    """The script's #SBATCH flags, and the argv after `python -m` of its srun line with SLURM's variables filled
    in from those flags (as SLURM sets them for the tasks)."""
    text = SBATCH.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", text, flags=re.M))
    variables = {"SLURM_NNODES": flags["nodes"], "SLURM_NTASKS_PER_NODE": flags["ntasks-per-node"]}
    (line,) = [line for line in text.replace("\\\n", " ").splitlines() if line.startswith("srun ")]
    for name, value in variables.items():
        line = line.replace(f"${name}", value)
    words = shlex.split(line)
    assert "$" not in line, line
    return flags, words[words.index("-m") + 1 :]


def test_the_sbatch_script_composes_and_signals_what_lightning_requeues_on(monkeypatch) -> None:
    flags, argv = sbatch_script()
    assert argv[0] == "src.pretrain"
    cfg = compose_config(argv[1:])
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.devices) == ("ddp", 2, 8)
    assert flags["nodes"] == "2" and flags["gpus-per-node"] == "8" and "requeue" in flags
    assert cfg.run_name == "mae_vit_l_in1k_1600ep_2nodes" and cfg.resume == "auto"  # a requeue finds its folder
    assert cfg.batch_size * 16 * cfg.trainer.accumulate_grad_batches == 4096
    for key, value in ONE_TASK_SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    name, delay = flags["signal"].split("@")
    assert [p.requeue_signal for p in cluster_plugins()] == [signal.Signals[f"SIG{name}"]] and int(delay) >= 60


def docs_commands() -> list[list[str]]:
    """argv after `-m` of every front-door command in docs/distributed.md's bash blocks (torchrun's too),
    without Hydra's own flags (`-m` for multirun)."""
    text = (REPO / "docs" / "distributed.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "-m" in words and words[words.index("-m") + 1].startswith("src."):
                commands.append([w for w in words[words.index("-m") + 1 :] if w not in ("-m", "--multirun")])
    return commands


def test_every_command_of_the_launching_guide_composes() -> None:
    commands = docs_commands()
    assert len(commands) >= 6 and {argv[0] for argv in commands} == {"src.pretrain"}
    worlds = set()
    for argv in commands:
        cfg = compose_config(argv[1:])
        worlds.add((cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.devices))
    assert {("ddp", 2, 8), ("ddp", 1, 8), ("fsdp", 1, 8)} <= worlds  # torchrun, SLURM, one node; ViT-H


# ---- requeue checkpoints and resuming -------------------------------------------------------------------
def fake_checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(2)}}, path)
    return path


def test_resume_picks_the_checkpoint_at_the_latest_step_and_says_which(tmp_path: Path, caplog) -> None:
    last = fake_checkpoint(tmp_path / "checkpoints" / LAST, 100)
    fake_checkpoint(tmp_path / "checkpoints" / PREVIOUS, 50)
    hpc1 = fake_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 130)
    with caplog.at_level("INFO"):
        assert resume_checkpoint(tmp_path, "auto") == hpc1  # preempted after last.ckpt: its steps are kept
    assert "hpc_ckpt_1.ckpt at step 130 is the newest" in caplog.text and "last.ckpt at step 100" in caplog.text

    hpc2 = fake_checkpoint(tmp_path / "hpc_ckpt_2.ckpt", 90)  # requeued from an older state (a numbered file)
    assert resume_checkpoint(tmp_path, "auto") == hpc1  # the step decides, not the number or the file's time
    fake_checkpoint(last, 130)
    assert resume_checkpoint(tmp_path, "auto") == last  # the same step: last.ckpt, written at a known point

    hpc1.write_bytes(b"not a checkpoint")
    fake_checkpoint(hpc2, 200)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(tmp_path, "auto") == hpc2
    assert "hpc_ckpt_1.ckpt cannot be read" in caplog.text and "; using " in caplog.text

    only_hpc = tmp_path / "requeued_before_any_checkpoint"
    fake_checkpoint(only_hpc / "hpc_ckpt_1.ckpt", 7)
    assert resume_checkpoint(only_hpc, True) == only_hpc / "hpc_ckpt_1.ckpt"
    with pytest.raises(ConfigError, match="already holds"):
        resume_checkpoint(only_hpc, False)


def test_a_run_resumes_at_another_world_size_but_not_with_other_settings(tmp_path: Path, caplog) -> None:
    same = ["logger=csv", f"runs_dir={tmp_path}", "run_name=run"]
    record_run(tmp_path / "run", compose_config([*same, "trainer=cpu_ddp"]))
    wider = [*same, "trainer=ddp", "launcher=slurm", "launcher.nodes=4", "launcher.gpus_per_node=8"]
    wider += ["trainer.strategy=fsdp", "trainer.accelerator=gpu", "trainer.accumulate_grad_batches=2"]
    wider += ["trainer.compile=true"]
    with caplog.at_level("INFO"):
        check_same_run(tmp_path / "run", compose_config(wider))  # no error: the same run, laid out anew
    for said in ("trainer.devices 2 -> 8", "trainer.num_nodes 1 -> 4", "trainer.strategy 'ddp' -> 'fsdp'"):
        assert said in caplog.text
    assert "trainer.accumulate_grad_batches 1 -> 2" in caplog.text and "launcher.nodes None -> 4" in caplog.text
    assert "trainer.sync_batchnorm None -> True" in caplog.text and "trainer.compile False -> True" in caplog.text
    with pytest.raises(ConfigError, match=r"holds another run: trainer\.precision: 'auto' -> 'bf16-mixed'"):
        check_same_run(tmp_path / "run", compose_config([*wider, "trainer.precision=bf16-mixed"]))


@pytest.mark.slow
def test_the_requeue_signal_saves_an_hpc_checkpoint_that_the_requeued_run_resumes_from(tmp_path: Path) -> None:
    """A real run under (simulated) SLURM: the signal of the sbatch script makes Lightning save
    run_dir/hpc_ckpt_1.ckpt mid-epoch; the job is killed as SLURM does after a requeue; the rerun resumes there."""
    args = [*TINY, *MAE_LIGHT, f"runs_dir={tmp_path}", "run_name=requeued", "epochs=50", "export=false"]
    args += ["checkpoint_every_n_steps=1000", "pictures.every_n_steps=1"]
    env = {**os.environ, **ONE_TASK_SLURM, "WANDB_MODE": "offline"}
    env.pop("SUBMITIT_EXECUTOR", None)
    run_dir = tmp_path / "requeued"
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    proc = start_pretraining(args, env)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(list((run_dir / "pictures").glob("step*.png"))) < 3:
            time.sleep(0.5)  # a few steps in
        proc.send_signal(signal.SIGUSR1)  # SLURM: --signal=USR1@120 of recipes/slurm/pretrain_2nodes.sbatch
        while time.time() < deadline and not hpc.is_file():
            time.sleep(0.2)
        assert proc.poll() is None  # Lightning saved and asked for the requeue; SLURM ends the job itself
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    step = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert step >= 2 and not (run_dir / "checkpoints" / LAST).exists()  # only the signal's save holds the steps

    again = [*args, f"trainer.max_steps={step + 2}", "resume_changes=[trainer.max_steps]"]
    result = subprocess.run(
        [sys.executable, "-m", "src.pretrain", *again], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {hpc}" in result.stdout + result.stderr
    assert torch.load(run_dir / "checkpoints" / LAST, weights_only=True)["global_step"] == step + 2
