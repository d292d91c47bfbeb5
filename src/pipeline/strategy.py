"""How a run is laid out beyond one process: the Trainer's strategy (FSDP2 over transformer blocks), SLURM's
requeue signal, torch.compile of the blocks, and what this machine can run at all.

Every method keeps its encoder at ``module.encoder``, so the transformer blocks are found the same way for ViT,
BEiT and Pale (whose blocks sit in stages) and for MAE's decoder; no encoder or method is named here.

``check_trainer`` refuses, before any work, a ``trainer`` section that Lightning would only refuse once the data
and the model are built (a GPU that is not there, fp16 autocast on the CPU, a compiler torch.compile lacks).
Every strategy that talks between processes gets ``trainer.timeout_s``: a collective that a rank never joins
ends the run after that long, and ``stopped_ranks_end_the_run`` says which rank stopped answering.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from torch import nn
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from src.config import ConfigError, RunStopped
from src.files import PARTIAL_SUFFIX
from src.pipeline.run_folder import LAST, PREVIOUS
from src.shards import ShardReader, checkpoint_meta, is_sharded, remove, replace_folder

log = logging.getLogger(__name__)

CONTAINERS = (nn.Sequential, nn.ModuleList)
# Strategies whose name holds the key run on that accelerator only.
STRATEGY_ACCELERATORS = {"xla": "tpu", "tpu": "tpu"}
FSDP_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")  # what ModelParallelStrategy takes
# What the methods call to run their model (FullyShardedStrategy gathers the parameters outside the blocks first).
FORWARD_METHODS = ("training_step", "validation_step", "test_step", "make_picture", "forward_pooled")
ON_THE_CPU = "use trainer=default for this machine's CPU, or trainer=cpu_ddp for several CPU processes"
# What gloo, NCCL and the rendezvous store say when a peer did not answer within the process group's timeout.
TIMED_OUT = re.compile(
    r"[Tt]imed out (waiting|after)|Application timeout caused pair closure|Watchdog caught collective operation timeout"
)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the items of every ``blocks`` container in the encoder and of the method's own
    ``*_blocks`` (MAE's decoder); an encoder without such containers falls back to its modules named ``*Block``."""
    containers = [m for name, m in module.encoder.named_modules() if name.rpartition(".")[2] == "blocks"]
    containers += [m for name, m in module.named_children() if name.endswith("_blocks")]
    blocks = [block for c in containers if isinstance(c, CONTAINERS) for block in c.children()]
    return blocks or [m for m in module.encoder.modules() if type(m).__name__.endswith("Block")]


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The classes FSDP wraps as units and recomputes in backward: one unit per block, whatever the encoder."""
    classes = {type(block) for block in transformer_blocks(module) if not isinstance(block, CONTAINERS)}
    if not classes:
        raise ConfigError(
            f"trainer.strategy=fsdp: {type(module.encoder).__name__} has no transformer blocks to shard "
            "(no `blocks` container, no *Block module): use trainer=ddp"
        )
    return classes


def resolved_accelerator(trainer: DictConfig) -> str:
    """The accelerator Lightning will run on, chosen as Lightning chooses it (``gpu``: MPS, else CUDA)."""
    name = trainer.accelerator
    if name == "auto":
        return next((n for n in ("tpu", "mps", "cuda") if AcceleratorRegistry[n]["accelerator"].is_available()), "cpu")
    if name == "gpu":
        return "mps" if AcceleratorRegistry["mps"]["accelerator"].is_available() else "cuda"
    return name


def processes(trainer: DictConfig, accelerator: str) -> int:
    """Processes of the run over all nodes: ``devices`` per node (auto and -1: every device there) times nodes."""
    devices = trainer.devices
    if devices in ("auto", -1):
        devices = AcceleratorRegistry[accelerator]["accelerator"].auto_device_count()
    per_node = devices if isinstance(devices, int) else len(devices)
    return per_node * trainer.num_nodes


def resolved_precision(trainer: DictConfig) -> str:
    """`auto`: bf16 mixed precision on a GPU that has it, full fp32 on the CPU."""
    if trainer.precision != "auto":
        return str(trainer.precision)
    on_gpu = trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def check_trainer(cfg: DictConfig) -> None:
    """Refuse, before any work, a trainer this machine cannot run: each error names the key and the way out."""
    trainer = cfg.trainer
    accelerator = resolved_accelerator(trainer)
    check_devices(trainer, accelerator)
    check_strategy(trainer, accelerator)
    check_precision(str(trainer.precision), accelerator)
    if trainer.strategy == "fsdp" and resolved_precision(trainer) not in FSDP_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={trainer.precision} with trainer.strategy=fsdp: FSDP2 (Lightning's "
            f"ModelParallelStrategy) runs {', '.join(FSDP_PRECISIONS)}"
        )
    if trainer.get("compile", False):
        check_compile(accelerator)


def check_devices(trainer: DictConfig, accelerator: str) -> None:
    """The accelerator must be here, with as many devices as ``trainer.devices`` asks; on the CPU, a count."""
    available = AcceleratorRegistry[accelerator]["accelerator"]
    if not available.is_available():
        chosen = " (as trainer=gpu and trainer=fsdp set it)" if trainer.accelerator == "gpu" else ""
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator}{chosen} needs a {accelerator} device, and torch finds none "
            f"on this machine: {ON_THE_CPU}"
        )
    devices, count = trainer.devices, available.auto_device_count()
    if accelerator == "cpu":  # CPU devices are processes: as many as asked
        if not (devices == "auto" or (isinstance(devices, int) and devices >= 1)):
            raise ConfigError(
                f"trainer.devices={devices} names GPUs, and this run is on the CPU: give a number of CPU processes, "
                "e.g. trainer.devices=2"
            )
        return
    wanted = devices if isinstance(devices, int) else 0 if devices == "auto" else max(devices) + 1  # -1: all
    if wanted > count:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {count} {accelerator} device(s): use at most "
            f"trainer.devices={count} (auto: all of them), and trainer.num_nodes for more machines"
        )


def check_strategy(trainer: DictConfig, accelerator: str) -> None:
    """The strategy must run on this accelerator, over this many processes, with the packages it needs."""
    name = trainer.strategy
    needed = next((acc for part, acc in STRATEGY_ACCELERATORS.items() if part in name), accelerator)
    if needed != accelerator:
        way_out = "trainer=cpu_ddp on the CPU" if accelerator == "cpu" else "trainer=ddp"
        raise ConfigError(
            f"trainer.strategy={name} runs on {needed} devices only, and this run is on {accelerator}: use {way_out}"
        )
    if name not in StrategyRegistry:
        return
    count = processes(trainer, accelerator)
    if issubclass(StrategyRegistry[name]["strategy"], SingleDeviceStrategy) and count > 1:
        raise ConfigError(
            f"trainer.strategy={name} runs one process, and trainer.devices={trainer.devices} x "
            f"trainer.num_nodes={trainer.num_nodes} asks for {count}: use trainer.strategy=ddp, or trainer.devices=1"
        )
    try:
        with_timeout(name, trainer)  # as build_strategy builds it: refuses a package that is missing (deepspeed)
    except (MisconfigurationException, ImportError) as e:
        raise ConfigError(f"trainer.strategy={name}: {str(e).splitlines()[0]}") from None


def check_precision(precision: str, accelerator: str) -> None:
    """fp16 autocast is not on the CPU (Lightning quietly runs bf16 instead); Transformer Engine is NVIDIA's."""
    if precision in ("16", "16-mixed") and accelerator == "cpu":
        raise ConfigError(
            f"trainer.precision={precision} is fp16 autocast, which the CPU does not have (Lightning would run "
            "bf16-mixed instead): use trainer.precision=bf16-mixed or 32-true on the CPU"
        )
    if precision.startswith("transformer-engine") and (accelerator != "cuda" or not find_spec("transformer_engine")):
        raise ConfigError(
            f"trainer.precision={precision} needs CUDA GPUs and NVIDIA's transformer_engine package (this run: "
            f"{accelerator}, package {'found' if find_spec('transformer_engine') else 'missing'}): use bf16-mixed"
        )


def check_compile(accelerator: str) -> None:
    """torch.compile fails at the first step without what it needs here: say so before any work."""
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            f"trainer.compile=true: torch.compile does not run on Python {sys.version.split()[0]} with torch "
            f"{torch.__version__}: use trainer.compile=false"
        )
    if accelerator == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(
                "trainer.compile=true on a GPU needs triton: pip install triton, or trainer.compile=false"
            )
    elif accelerator == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except RuntimeError as e:
            raise ConfigError(
                f"trainer.compile=true on the CPU needs a C++ compiler ({str(e).splitlines()[0]}): install one "
                "(g++), set CXX to it, or use trainer.compile=false"
            ) from None


def build_strategy(cfg: DictConfig, module: nn.Module) -> str | Strategy:
    """What the Trainer gets as ``strategy``: every strategy between processes waits ``trainer.timeout_s`` at most.

    ``fsdp`` shards the module's blocks; ``auto`` over several processes is Lightning's own choice then, ``ddp``.
    """
    trainer = cfg.trainer
    name = trainer.strategy
    if name == "auto" and processes(trainer, resolved_accelerator(trainer)) > 1:
        name = "ddp"
    if name == "fsdp":
        return fsdp_strategy(cfg, module)
    return with_timeout(name, trainer) or name


def with_timeout(name: str, trainer: DictConfig) -> Strategy | None:
    """The registered strategy ``name``, waiting ``trainer.timeout_s`` at most for the other processes; None for
    one that takes no timeout (one process: auto, single_device; no torch process group: xla)."""
    if name not in StrategyRegistry:  # auto
        return None
    entry = StrategyRegistry[name]  # not .get(): the registry's get builds the strategy
    if "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return None
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=float(trainer.timeout_s)))


def shard_blocks(module: nn.Module, mesh: DeviceMesh, fsdp: DictConfig, bf16: bool) -> str:
    """FSDP2 on ``module`` over ``mesh``: one unit (and one activation checkpoint) per transformer block, then the
    module; the methods that run the model are registered as its forward methods. Says what it made."""
    # bf16 parameters in forward and backward, fp32 gradient reductions and fp32 master weights
    policy = MixedPrecisionPolicy(**({"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if bf16 else {}))
    blocks = [b for b in transformer_blocks(module) if not isinstance(b, CONTAINERS)]
    kinds = ", ".join(sorted({type(b).__name__ for b in blocks}))  # before fully_shard renames their classes
    for block in blocks:
        if fsdp.activation_checkpointing:
            activation_checkpoint(block)  # composable: the parameter names stay as they are
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=fsdp.reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for name in FORWARD_METHODS:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return f"one unit per {kinds} ({len(blocks)}), then the module"


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over every process: one unit per transformer block, then the module for the rest.

    Lightning's ``ModelParallelStrategy`` runs the processes and the sharded checkpoints (``torch.distributed.
    checkpoint``: each rank writes its own shard, a resume at another world size re-shards); the module calls
    ``shard`` from its ``configure_model``. The methods reach their model through methods, not ``forward``
    (``training_step``, ``make_picture``, ``forward_pooled``...): those are registered as forward methods of the
    root unit, so that FSDP gathers the parameters outside the blocks before them. ``hybrid``: shard within a
    node and replicate across nodes, on a 2-D device mesh (nodes x processes per node).
    """

    def __init__(self, fsdp: DictConfig, bf16: bool, world: int, timeout: timedelta) -> None:
        super().__init__(data_parallel_size=world, tensor_parallel_size=1, timeout=timeout)
        self.fsdp, self.bf16 = fsdp, bf16

    def shard(self, module: nn.Module) -> None:
        mesh = self.device_mesh["data_parallel"]
        if self.fsdp.hybrid:
            shape = (self.num_nodes, self.num_processes)
            mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=("replicate", "shard"))
        units = shard_blocks(module, mesh, self.fsdp, self.bf16)
        layout = f"{self.num_nodes} nodes x {self.num_processes} processes, hybrid" if self.fsdp.hybrid else "sharded"
        rank_zero_info(f"FSDP2 over {self.world_size} processes ({layout}): {units}")

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Every rank writes its shard into a partial folder; rank zero then puts the finished folder in place
        (``last.ckpt`` keeps the one before as ``last-previous.ckpt``), so a kill never leaves half a checkpoint."""
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.shards{PARTIAL_SUFFIX}")
        if self.global_rank == 0:
            remove(partial)  # left by a killed save
        self.barrier("partial folder cleared")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("every shard written")
        if self.global_rank == 0:
            replace_folder(partial, path, keep_previous=path.with_name(PREVIOUS) if path.name == LAST else None)
        self.barrier("checkpoint in place")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The model's and optimizer's shards, re-sharded to this world size, through ``ShardReader`` (DCP's own
        reader unpickles the index); what is left of the checkpoint (step, loops, callbacks) is returned."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded(path):  # a one-file checkpoint (another strategy's): Lightning spreads it over the ranks
            return super().load_checkpoint(path, weights_only)
        model = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(model, storage_reader=ShardReader(path))
        set_model_state_dict(self.model, model["state_dict"], options=StateDictOptions(strict=True))
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, storage_reader=ShardReader(path))
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"])
        return checkpoint_meta(path)


def fsdp_strategy(cfg: DictConfig, module: nn.Module) -> FullyShardedStrategy:
    """FSDP2 over the module's transformer blocks (refused before any work when it has none)."""
    block_classes(module)
    trainer = cfg.trainer
    return FullyShardedStrategy(
        trainer.fsdp,
        bf16=resolved_precision(trainer).startswith("bf16"),
        world=processes(trainer, resolved_accelerator(trainer)),
        timeout=timedelta(seconds=float(trainer.timeout_s)),
    )


def silent_ranks(grace_s: float) -> list[int] | None:
    """The ranks that do not say they are alive within ``grace_s``, asked through the rendezvous store.

    Every rank that saw a collective time out writes its key; the ranks whose key never comes are the ones that
    stopped. None when the store itself does not answer (the process that holds it stopped).
    """
    store = dist.distributed_c10d._get_default_store()
    keys = [f"answering/{rank}" for rank in range(dist.get_world_size())]
    try:
        store.set_timeout(timedelta(seconds=grace_s))
        store.set(keys[dist.get_rank()], "1")
        deadline = time.monotonic() + grace_s
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [rank for rank, key in enumerate(keys) if not store.check([key])]
    except RuntimeError:  # DistStoreError: the store timed out too
        return None


@contextmanager
def stopped_ranks_end_the_run(trainer: DictConfig) -> Iterator[None]:
    """A collective or a rendezvous that timed out ends the run with one line naming who stopped answering.

    The process group's timeout (``trainer.timeout_s``) bounds every wait, the start included; this turns gloo's,
    NCCL's or the store's timeout error into ``RunStopped``. The checkpoints written so far stay, so the same
    command resumes the run.
    """
    try:
        yield
    except RuntimeError as e:
        joined = dist.is_initialized()
        if not (TIMED_OUT.search(str(e)) and (joined or isinstance(e, dist.DistError))):
            raise
        resume = "the run can be resumed with the same command"
        if not joined:
            raise RunStopped(
                f"the processes did not all meet within trainer.timeout_s={trainer.timeout_s:g} at the start "
                f"({str(e).splitlines()[0]}): every process must reach the rendezvous within it; {resume}"
            ) from None
        ranks = silent_ranks(min(float(trainer.timeout_s) / 4, 5.0))  # the live ranks time out together
        who = f"rank {', '.join(map(str, ranks))}" if ranks else "a rank (the rendezvous store could not tell which)"
        raise RunStopped(f"{who} stopped answering within trainer.timeout_s={trainer.timeout_s:g}: {resume}") from None


def maybe_compile(module: nn.Module, enabled: bool) -> None:
    """torch.compile each transformer block in place, before the strategy wraps them.

    Blocks, not the encoder: methods call encoder methods (``forward_visible``, ``forward_mask_token``) that never
    pass through the encoder's own ``__call__``, but every block is called. ``nn.Module.compile`` keeps the
    parameter names, so checkpoints and exports are the same as without it.
    """
    if not enabled:
        return
    blocks = transformer_blocks(module)
    for block in blocks:
        block.compile()
    log.info("torch.compile: %d blocks (%s)", len(blocks), ", ".join(sorted({type(b).__name__ for b in blocks})))


def launched_by_submitit() -> bool:
    """submitit's sbatch script exports this before it starts the tasks."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def requeue_signal() -> signal.Signals:
    """The signal SLURM sends before a preemption or the time limit kills the job.

    submitit writes ``#SBATCH --signal=USR2@<signal_delay_s>`` (its ``JobEnvironment.USR_SIG``, which
    ``SUBMITIT_PREEMPT_SIGNAL`` may change); Lightning's own default, and recipes/slurm/*.sbatch, use USR1.
    """
    if launched_by_submitit():
        from submitit.core.job_environment import JobEnvironment

        return signal.Signals[f"SIG{JobEnvironment.USR_SIG}"]
    return signal.SIGUSR1


def cluster_plugins() -> list[SLURMEnvironment]:
    """On SLURM: Lightning saves ``run_dir/hpc_ckpt_<N>.ckpt`` and requeues the job on the signal it was sent.

    Under submitit the signal already has submitit's handler, and Lightning installs its own only on a signal
    without one; submitit's would requeue without saving. It is reset here so that Lightning's takes the signal:
    the work since the last checkpoint is kept, and the requeued job runs the same submission again.
    """
    if not SLURMEnvironment.detect():
        return []
    requeue_on = requeue_signal()
    if launched_by_submitit():
        signal.signal(requeue_on, signal.SIG_DFL)
    log.info("SLURM: on %s Lightning saves hpc_ckpt_<N>.ckpt in the run folder and requeues", requeue_on.name)
    return [SLURMEnvironment(requeue_signal=requeue_on)]
