"""A run folder belongs to one run and one process: its identity, its lock, and which checkpoint resumes it.

- Identity: the folder records the resolved config it was started with (``config.yaml``) and the identity
  of its init checkpoint (``run_identity.json``: path, size, sha256). A later command in the same folder
  continues only the same run; any other difference stops before work and names the keys, except how the
  run is laid out on machines (devices, nodes, strategy, accumulation): a run may resume at another world size.
- Lock: one process per folder (``.lock`` names host, pid and start time). A lock whose pid is dead on this
  host is stale and taken over; ``takeover=true`` (or a SLURM requeue) takes over a lock from another host.
- Checkpoints: the last two are kept (``last.ckpt``, ``last-previous.ckpt``), and on SLURM's requeue signal
  Lightning saves ``hpc_ckpt_<N>.ckpt`` beside them in the run folder. The one at the latest step resumes; an
  unreadable one is passed over with a warning. Temporary files of a killed save are removed only when their
  writer is dead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import socket
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the run's resolved config, as the method settled it (export rebuilds from it)
IDENTITY_FILE = "run_identity.json"
LOCK_FILE = ".lock"
LAST, PREVIOUS = "last.ckpt", "last-previous.ckpt"
# Lightning's checkpoint on SLURM's requeue signal: trainer.default_root_dir (the run folder)/hpc_ckpt_<N>.ckpt,
# N one more than the highest already there (_CheckpointConnector.hpc_save_path).
HPC_NAME = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
PARTIAL_SUFFIX = ".tmp"

# Keys that change no result: they may differ between the commands of one run.
HARMLESS = ("resume", "takeover", "resume_changes", "num_workers", "checkpoint_every_n_steps", "export", "pictures.")
HARMLESS += ("logger.", "trainer.log_every_n_steps", "knn.every_n_epochs", "max_nonfinite_steps")
# How the run is laid out on machines: a resume may change them (another world size keeps the global batch by
# its accumulation, src/pipeline/elastic.py); each change is said on an info line.
LAYOUT = ("trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.accumulate_grad_batches")
LAYOUT += ("trainer.accelerator", "trainer.sync_batchnorm", "trainer.compile", "trainer.fsdp.", "launcher.")
LAYOUT += ("dataset.device_transforms",)  # the same views, made on the device instead of in the loader
# Keys that may change on resume when the command says so (resume_changes=[...]): how long the run goes on.
RESUMABLE = ("epochs", "trainer.max_epochs", "trainer.max_steps")
IMPLIED = {"epochs": ("trainer.max_epochs",)}  # trainer.max_epochs follows epochs in every config
READ_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, ValueError)


# ---- identity ----------------------------------------------------------------------------------------------
def file_identity(path: str | Path) -> dict[str, Any]:
    """Path, size and sha256 of a file: a replaced file under the same name is another file."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What defines a run besides its config: the content of the checkpoint it starts from."""
    init = cfg.get("init")
    checkpoint = init.get("checkpoint") if init is not None else None
    if checkpoint is None or not Path(checkpoint).is_file():
        return {"init": None}
    return {"init": file_identity(checkpoint)}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def config_changes(before: DictConfig, after: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Every key whose resolved value differs: {key: (before, after)}."""
    old = _flat(OmegaConf.to_container(before, resolve=True))
    new = _flat(OmegaConf.to_container(after, resolve=True))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_same_run(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse, before any work, a command that would continue this folder as another run."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        return
    asked = tuple(cfg.get("resume_changes") or ())
    unknown = [k for k in asked if k not in RESUMABLE]
    if unknown:
        raise ConfigError(f"resume_changes={list(asked)}: only {list(RESUMABLE)} may change on resume")
    allowed = asked + tuple(implied for key in asked for implied in IMPLIED.get(key, ()))
    changes = config_changes(OmegaConf.load(config_file), cfg)
    layout = {k: v for k, v in changes.items() if k.startswith(LAYOUT)}
    refused = {k: v for k, v in changes.items() if not k.startswith(HARMLESS + LAYOUT) and k not in allowed}
    identity_file = run_dir / IDENTITY_FILE
    if identity_file.is_file():
        before, after = json.loads(identity_file.read_text())["init"], run_identity(cfg)["init"]
        if before != after:
            digests = tuple(identity and identity["sha256"][:12] for identity in (before, after))
            refused["init.checkpoint (file content, sha256)"] = digests
    if not refused:
        if layout:
            log.info("resume laid out anew: %s", "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in layout.items()))
        for key in allowed:
            if key in changes:
                log.warning("resume: %s changes from %r to %r (resume_changes)", key, *changes[key])
        return
    lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
    implied = {k for key in refused for k in IMPLIED.get(key, ())}
    resumable = [k for k in refused if k in RESUMABLE and k not in implied]
    ways = f"pass a new run_name=... to start another run in its own folder (this one is {run_dir})"
    if resumable and all(k in RESUMABLE for k in refused):
        ways = f"resume_changes=[{','.join(resumable)}] to continue this run with them, or {ways}"
    raise ConfigError(f"{run_dir} holds another run: {lines}. Either {ways}")


def record_run(run_dir: Path, cfg: DictConfig) -> None:
    """Write what defines the run into its folder (rank zero only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / IDENTITY_FILE).write_text(json.dumps(run_identity(cfg), indent=2) + "\n")


# ---- lock ----------------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _requeued() -> bool:
    """A SLURM requeue restarts the same job: its old process is gone, wherever it ran."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


@contextmanager
def run_lock(run_dir: Path, takeover: bool = False) -> Iterator[None]:
    """Hold ``run_dir/.lock`` for the duration; a live holder elsewhere refuses this process, naming itself."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            stale = holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)))
            if not (stale or takeover or _requeued()):
                raise ConfigError(
                    f"{run_dir} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')}: wait for it to end, use another run_name, or pass takeover=true if "
                    "that process is gone (a SLURM requeue takes over by itself)"
                ) from None
            log.warning("taking over %s from pid %s on %s", lock, holder.get("pid"), holder.get("host"))
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


# ---- checkpoints ------------------------------------------------------------------------------------------
def partial_name(path: Path) -> str:
    """Prefix of a temporary file while ``path`` is being written: names its writer (host, pid)."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def remove_dead_partial_writes(folder: Path) -> list[Path]:
    """Delete temporary files whose writer is dead on this host; a live writer's file is left alone."""
    host = socket.gethostname()
    removed = []
    for path in sorted(folder.glob(f".*{PARTIAL_SUFFIX}")) if folder.is_dir() else []:
        parts = path.name.removesuffix(PARTIAL_SUFFIX).rsplit(".", 3)  # [.name, host, pid, random]
        if len(parts) == 4 and parts[1] == host and parts[2].isdigit() and not _alive(int(parts[2])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at (memory-mapped, weights-only: nothing else is loaded)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def resume_checkpoint(run_dir: Path, resume: str | bool) -> Path | None:
    """auto: continue from the readable checkpoint at the latest step; true: insist on one; false: refuse the folder.

    The candidates are ``checkpoints/last.ckpt``, the one before it and Lightning's SLURM ``hpc_ckpt_<N>.ckpt``.
    They are ordered by the step stored inside, not by file times: a copied or restored run folder, or the clocks
    of several nodes on one shared file system, reorder times, and the step is what a resume continues from. At
    the same step ``last.ckpt`` wins (it is written at a fixed point of the loop, a signal's save anywhere).
    """
    folder = run_dir / "checkpoints"
    for stale in [*remove_dead_partial_writes(folder), *remove_dead_partial_writes(run_dir)]:
        log.warning("removed %s, left half-written by a killed save", stale)
    hpc = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if HPC_NAME.fullmatch(p.name)]
    hpc.sort(key=lambda p: int(HPC_NAME.fullmatch(p.name)[1]), reverse=True)
    present = [p for p in (folder / LAST, folder / PREVIOUS, *hpc) if p.is_file()]
    if resume is False and present:
        raise ConfigError(
            f"run_dir={run_dir} already holds {present[0]}: pass resume=auto to continue or a new run_name"
        )
    if resume is True and not present:
        raise ConfigError(f"resume=true but there is no checkpoint at {folder / LAST} nor {run_dir}/hpc_ckpt_<N>.ckpt")
    steps: dict[Path, int] = {}
    problems = []
    for path in present:
        try:
            steps[path] = checkpoint_step(path)
        except (*READ_ERRORS, KeyError, TypeError) as e:  # TypeError, KeyError: not a training checkpoint
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            problems.append(f"{path} cannot be read ({type(e).__name__}: {reason[:300]})")
    if not steps:
        if problems:
            raise ConfigError(
                "; ".join(problems) + f". No readable checkpoint is left: start again with resume=false in a new "
                f"run_name, or delete {folder} to restart this run from scratch"
            )
        return None
    newest = max(steps, key=steps.__getitem__)  # the first of equal steps: last.ckpt before the others
    if problems:
        older = "the older " if folder / LAST not in steps else ""
        log.warning("%s; resuming from %s%s (step %d)", "; ".join(problems), older, newest, steps[newest])
    elif len(steps) > 1:
        others = ", ".join(f"{p.name} at step {s}" for p, s in steps.items() if p != newest)
        log.info("resume: %s at step %d is the newest (beside %s)", newest, steps[newest], others)
    return newest
