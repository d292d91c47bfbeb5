"""How a run is laid out beyond one process: the Trainer's strategy (FSDP over transformer blocks), SLURM's
requeue signal, and torch.compile of the blocks.

Every method keeps its encoder at ``module.encoder``, so the transformer blocks are found the same way for ViT,
BEiT and Pale (whose blocks sit in stages) and for MAE's decoder; no encoder or method is named here.
"""

from __future__ import annotations

import logging
import os
import signal

from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src.config import ConfigError

log = logging.getLogger(__name__)

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")  # HYBRID_* need process groups we do not build
CONTAINERS = (nn.Sequential, nn.ModuleList)


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


def build_strategy(cfg: DictConfig, module: nn.Module) -> str | Strategy:
    """What the Trainer gets as ``strategy``: an FSDPStrategy over the module's blocks for ``fsdp``, else the name."""
    name = cfg.trainer.strategy
    if name != "fsdp":
        return name
    options = OmegaConf.select(cfg, "trainer.fsdp", default=None) or {}
    sharding = options.get("sharding_strategy", "FULL_SHARD")
    if sharding not in SHARDING_STRATEGIES:
        raise ConfigError(f"trainer.fsdp.sharding_strategy={sharding!r}: must be one of {SHARDING_STRATEGIES}")
    classes = block_classes(module)
    log.info("FSDP %s: one unit per %s", sharding, ", ".join(sorted(c.__name__ for c in classes)))
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if options.get("activation_checkpointing", True) else None,
        sharding_strategy=sharding,
    )


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
