"""What a run leaves and says: its result, the record ``finished.json`` keeps of it, and the block of text the
front doors print at the end (where everything went, what was skipped, what the kNN numbers mean)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from src.files import write_atomically
from src.pipeline.run_folder import METRICS_FILE, RECORDED_PATHS, load_recorded, mark_finished


@dataclass
class RunResult:
    """What a run made and measured, and where it put each; ``summary`` says it, ``save`` records it."""

    run_dir: Path
    checkpoint: Path | None
    exports: dict[str, Path] = field(default_factory=dict)
    pictures: Path | None = None
    loss_curve: Path | None = None
    first_and_last: Path | None = None
    wandb_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int = 0
    finished_before: bool = False  # the same command had already finished this run: nothing ran, nothing changed

    def record(self) -> dict:
        """What ``finished.json`` keeps of the result: paths relative to the run folder, which may move."""
        return {
            "step": self.global_step,
            "paths": {k: _relative(getattr(self, k), self.run_dir) for k in RECORDED_PATHS},
            "exports": {k: _relative(v, self.run_dir) for k, v in self.exports.items()},
        }

    def save(self, cfg: DictConfig) -> None:
        """``metrics.json`` (atomically), then ``finished.json``, the run's last write."""
        write_atomically(self.run_dir / METRICS_FILE, json.dumps(self.metrics, indent=2, sort_keys=True))
        mark_finished(self.run_dir, cfg, self.record())

    @classmethod
    def recorded(cls, run_dir: Path, record: dict) -> RunResult:
        """The result a finished run recorded, read back from its folder."""
        paths = {k: v if v is None else run_dir / v for k, v in record["paths"].items()}
        wandb_dir = paths.pop("wandb_dir")
        return cls(
            run_dir=run_dir,
            **paths,
            wandb_dir=str(wandb_dir) if wandb_dir else None,
            exports={k: run_dir / v for k, v in record["exports"].items()},
            metrics=dict(load_recorded(run_dir / METRICS_FILE)),
            global_step=int(record["step"]),
            finished_before=True,
        )


def _relative(path: str | Path | None, run_dir: Path) -> str | None:
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


@rank_zero_only
def report(text: str) -> None:
    """What a front door prints at the end, once: every rank ran the same run, and rank zero says so."""
    print(text)


def summary(result: RunResult) -> str:
    """The one block a user reads at the end of a run: where everything went, and what the numbers mean."""
    lines = [f"run finished at step {result.global_step}: {result.run_dir}"]
    if result.finished_before:
        lines = [
            f"run already finished at step {result.global_step}: {result.run_dir} (nothing ran, nothing changed; to "
            "go on longer, pass resume_changes=[trainer.max_steps] with a larger trainer.max_steps, or "
            "resume_changes=[epochs] with more epochs)"
        ]
    if result.checkpoint:
        lines.append(f"  checkpoint : {result.checkpoint}  (resume: same command, resume=auto)")
    for name, path in result.exports.items():
        lines.append(f"  export     : {name} -> {path}")
    if result.pictures:
        lines.append(f"  pictures   : {result.pictures}")
    if result.first_and_last:
        lines.append(f"  first/last : {result.first_and_last}  (the same images at the first and the last step)")
    if result.loss_curve:
        lines.append(f"  loss curve : {result.loss_curve}")
    lines.append(f"  metrics    : {result.run_dir / METRICS_FILE}, history in {result.run_dir / 'csv' / 'metrics.csv'}")
    if result.wandb_dir:
        lines.append(f"  W&B run    : {result.wandb_dir}  (offline runs upload with `wandb sync {result.wandb_dir}`)")
    else:
        lines.append("  W&B run    : off (logger=[...] does not choose wandb)")
    metrics = result.metrics
    if "data/skipped" in metrics or "train/nonfinite_steps" in metrics:
        lines.append(
            f"  skipped    : {metrics.get('data/skipped', 0):.0f} corrupt samples (named in the warnings), "
            f"{metrics.get('train/nonfinite_steps', 0):.0f} steps with NaN/inf gradients"
        )
    shown = {
        k: v
        for k, v in metrics.items()
        if k.startswith(("train/loss", "val/", "val_train_ratio/", "tokenizer/", "knn/top5"))
    }
    if shown:
        lines.append("  results    : " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())))
    if "knn/top1" in metrics:
        lines.extend(knn_reading(metrics, result.global_step))
    return "\n".join(lines)


def knn_reading(metrics: dict[str, float], step: int) -> list[str]:
    """kNN top-1 now, beside the untrained encoder and the raw pixels, and what the difference says."""
    now = 100 * metrics["knn/top1"]
    line = f"  kNN top-1  : {now:.1f} at step {step}"
    if "knn/start_top1" not in metrics:
        return [line]
    start, pixels = 100 * metrics["knn/start_top1"], 100 * metrics["knn/pixels_top1"]
    lines = [f"{line}; {start:.1f} at step 0 (the untrained encoder); {pixels:.1f} on the raw pixels"]
    gain = now - start
    if gain > 0:
        verdict = f"the encoder learned: {gain:.1f} points above its untrained self"
    else:
        verdict = f"no gain over the untrained encoder yet ({gain:+.1f} points): this run was too short to show one"
    if now < pixels:
        verdict += "; raw pixels are still ahead: on small grey images they are a kNN baseline short runs miss"
    lines.append(f"               {verdict}")
    return lines
