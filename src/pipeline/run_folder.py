"""A run folder belongs to one run and one process: its identity, its lock, and which checkpoint resumes it.

- Identity: the folder records the resolved config it was started with (``config.yaml``) and the identity
  of its init checkpoint (``run_identity.json``: path, size, sha256). A later command in the same folder
  continues only the same run; any other difference stops before work and names the keys, except how the
  run is laid out on machines (devices, nodes, strategy, accumulation): a run may resume at another world size.
- Place: the folder lies inside ``runs_dir`` (a ``run_name`` cannot climb out of it) and nothing in it depends on
  the absolute path it was made at, so a project or a run folder may be moved or copied and resumed.
- Finished: a run that ended writes ``finished.json`` last; the same command again reports it and writes nothing,
  the way ``make`` treats a built target. A longer run (``resume_changes=[...]``) takes the marker away first.
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
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.files import PARTIAL_SUFFIX, first_line, write_atomically
from src.shards import checkpoint_meta

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the run's resolved config, as the method settled it (export rebuilds from it)
IDENTITY_FILE = "run_identity.json"
FINISHED_FILE = "finished.json"  # written last by a run that ended; its presence says the folder's results are whole
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"
LAST, PREVIOUS = "last.ckpt", "last-previous.ckpt"
# Lightning's checkpoint on SLURM's requeue signal: trainer.default_root_dir (the run folder)/hpc_ckpt_<N>.ckpt,
# N one more than the highest already there (_CheckpointConnector.hpc_save_path).
HPC_NAME = re.compile(r"hpc_ckpt_(\d+)\.ckpt")

# Keys that change no result: they may differ between the commands of one run.
HARMLESS = ("resume", "takeover", "resume_changes", "num_workers", "checkpoint_every_n_steps", "export", "pictures.")
# Where the folder and the init file lie: a moved project resumes (the init file's content is checked by its identity).
HARMLESS += ("runs_dir", "run_dir", "init.checkpoint")
HARMLESS += ("logger.", "trainer.log_every_n_steps", "knn.every_n_epochs", "max_nonfinite_steps", "trainer.timeout_s")
HARMLESS += ("trainer.progress",)  # a bar or lines: how the progress shows
HARMLESS += ("objective.eval_backend",)  # either COCOeval gives the same AP (tests/test_detection_eval.py)
# How the run is laid out on machines: a resume may change them (another world size keeps the global batch by
# its accumulation, src/pipeline/elastic.py); each change is said on an info line.
LAYOUT = ("trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.accumulate_grad_batches")
LAYOUT += ("trainer.accelerator", "trainer.sync_batchnorm", "trainer.compile", "trainer.fsdp.", "launcher.")
LAYOUT += ("dataset.device_transforms",)  # the same views, made on the device instead of in the loader
# Keys that may change on resume when the command says so (resume_changes=[...]): how long the run goes on.
RESUMABLE = ("epochs", "trainer.max_epochs", "trainer.max_steps")
# What finished.json keeps of a finished run's result, each a path relative to the folder (or None).
RECORDED_PATHS = ("checkpoint", "pictures", "loss_curve", "first_and_last", "wandb_dir")
IMPLIED = {"epochs": ("trainer.max_epochs",)}  # trainer.max_epochs follows epochs in every config
READ_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, ValueError)


# ---- place -------------------------------------------------------------------------------------------------
def run_folder(cfg: DictConfig) -> Path:
    """The run's folder, refused unless it lies inside ``runs_dir`` (``run_name=../x`` would write elsewhere)."""
    runs_dir = Path(cfg.runs_dir).resolve()
    run_dir = Path(cfg.run_dir).resolve()
    if ".." in Path(str(cfg.get("run_name", ""))).parts or not run_dir.is_relative_to(runs_dir):
        raise ConfigError(
            f"run_name={cfg.get('run_name')!r} puts the run at {run_dir}, outside runs_dir={runs_dir}: a run_name "
            "names a folder inside runs_dir (no '..'); to write runs elsewhere, set runs_dir=..."
        )
    return run_dir


def check_writable(run_dir: Path) -> None:
    """Create the folder and a file in it now, so that a read-only place fails in one line before any work."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, *(p for p in (run_dir / "checkpoints",) if p.is_dir())):
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as e:
        raise ConfigError(
            f"cannot write the run folder {run_dir} ({e.strerror or type(e).__name__}: {e.filename or run_dir}): "
            "choose runs_dir=... on a writable disk, or make the folder writable"
        ) from None


# ---- identity ----------------------------------------------------------------------------------------------
def file_identity(path: str | Path) -> dict[str, Any]:
    """Path, size and sha256 of a file: a replaced file under the same name is another file.

    Only size and digest say which file it is (``same_file``): the path changes when a project is moved.
    """
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


def same_file(before: dict[str, Any] | None, after: dict[str, Any] | None) -> bool:
    """Two identities name the same content (wherever the files lie)."""
    if before is None or after is None:
        return before is after
    return (before.get("size"), before.get("sha256")) == (after.get("size"), after.get("sha256"))


def load_recorded(path: Path) -> Any:
    """A file the toolkit wrote into a run folder (config, identity, marker); damage is named, not a traceback."""
    try:
        value = OmegaConf.load(path) if path.suffix == ".yaml" else json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(
            f"{path} cannot be read ({first_line(e)}): the run folder is damaged; restore the file or start the run "
            "again in a new run_name"
        ) from None
    if not isinstance(value, (DictConfig, dict)) or not value:
        raise ConfigError(f"{path} holds no mapping: the run folder is damaged; restore the file or use a new run_name")
    return value


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
    changes = config_changes(load_recorded(config_file), cfg)
    layout = {k: v for k, v in changes.items() if k.startswith(LAYOUT)}
    refused = {k: v for k, v in changes.items() if not k.startswith(HARMLESS + LAYOUT) and k not in allowed}
    identity_file = run_dir / IDENTITY_FILE
    if identity_file.is_file():
        before, after = load_recorded(identity_file).get("init"), run_identity(cfg)["init"]
        if not same_file(before, after):
            digests = tuple(
                identity and f"{identity.get('path')} {str(identity.get('sha256'))[:12]}"
                for identity in (before, after)
            )
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


def config_text(cfg: DictConfig) -> str:
    """The text of ``config.yaml``: the settled config, resolved (``show_config=true`` prints the same)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def record_run(run_dir: Path, cfg: DictConfig) -> None:
    """Write what defines the run into its folder (rank zero only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / CONFIG_FILE, config_text(cfg))
    write_atomically(run_dir / IDENTITY_FILE, json.dumps(run_identity(cfg), indent=2) + "\n")


# ---- finished runs -------------------------------------------------------------------------------------------
def run_length(cfg: DictConfig) -> dict[str, Any]:
    """The keys that say how long a run goes on: a finished run asked to go on longer is not finished."""
    return {key: OmegaConf.select(cfg, key) for key in RESUMABLE}


def finished_run(run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """What a finished run of the same length recorded (``finished.json``), or None if it has to (go on) run.

    ``resume=false`` asks for a fresh run: the folder's checkpoint refuses it, not its old results.
    """
    marker = run_dir / FINISHED_FILE
    if not marker.is_file() or cfg.get("resume") is False:
        return None
    record = load_recorded(marker)
    if record.get("length") != run_length(cfg):
        return None
    paths, exports = record.get("paths"), record.get("exports")
    whole = type(record.get("step")) is int and isinstance(paths, dict) and isinstance(exports, dict)
    if not whole or not all(isinstance(p, str) for p in exports.values()) or set(paths) != set(RECORDED_PATHS):
        raise ConfigError(f"{marker} is damaged (no step or paths of a finished run): delete it to run again")
    if not all(p is None or isinstance(p, str) for p in paths.values()):
        raise ConfigError(f"{marker} is damaged (no step or paths of a finished run): delete it to run again")
    return record


def mark_finished(run_dir: Path, cfg: DictConfig, record: dict[str, Any]) -> None:
    """The last write of a run: from now on the same command reports the run instead of running it."""
    write_atomically(run_dir / FINISHED_FILE, json.dumps({**record, "length": run_length(cfg)}, indent=2) + "\n")


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


def lock_holder(lock: Path, attempts: int = 5) -> dict[str, Any] | None:
    """Host and pid of the process holding ``lock``, or None when the file does not say (garbage, empty).

    An empty file may be a lock its holder is still writing: it is read again a few times before it counts.
    """
    for attempt in range(attempts):
        try:
            holder = json.loads(lock.read_text())
        except FileNotFoundError:  # its holder has just let it go
            return {}
        except (OSError, UnicodeDecodeError, ValueError):
            holder = None
        pid = holder.get("pid") if isinstance(holder, dict) else None
        if type(pid) is int and pid > 0 and isinstance(holder.get("host"), str):
            return holder
        if attempt + 1 < attempts:
            time.sleep(0.02)
    return None


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
            holder = lock_holder(lock)
            if holder == {}:
                continue
            if holder is None and not (takeover or _requeued()):
                raise ConfigError(
                    f"{lock} is unreadable (empty or not a lock this toolkit wrote; a writer killed mid-write leaves "
                    "one): if no process is using this run, pass takeover=true or delete the file"
                ) from None
            stale = holder is not None and holder["host"] == me["host"] and not _alive(holder["pid"])
            if not (stale or takeover or _requeued()):
                raise ConfigError(
                    f"{run_dir} is in use by pid {holder['pid']} on {holder['host']} since "
                    f"{holder.get('started')}: wait for it to end, use another run_name, or pass takeover=true if "
                    "that process is gone (a SLURM requeue takes over by itself)"
                ) from None
            owner = f"pid {holder['pid']} on {holder['host']}" if holder else "an unreadable holder"
            log.warning("taking over %s from %s", lock, owner)
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
    """The global step a checkpoint was saved at (weights-only, without its weights: ``checkpoint_meta``)."""
    state = checkpoint_meta(path)
    if not isinstance(state, dict):
        raise TypeError(f"it holds a {type(state).__name__}, not a training checkpoint")
    return int(state["global_step"])


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
    present = [p for p in (folder / LAST, folder / PREVIOUS, *hpc) if p.exists()]  # a file, or a folder of shards
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
        log.warning("%s; using %s%s (step %d)", "; ".join(problems), older, newest, steps[newest])
    elif len(steps) > 1:
        others = ", ".join(f"{p.name} at step {s}" for p, s in steps.items() if p != newest)
        log.info("resume: %s at step %d is the newest (beside %s)", newest, steps[newest], others)
    return newest
