"""What a run prints: each log record once, in one stream, without the lines the toolkit knows to be harmless.

Lightning gives its loggers their own console handler when it is imported before Hydra has configured
logging (our front doors import it early), so its lines bypass Hydra's handlers and the run's log file.
``single_log_stream`` sends them, and Python warnings, through the root handlers instead, and filters the
known-harmless ones there by message; nothing else is silenced.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

# Python warnings that every run would raise and that say nothing about the user's run.
HARMLESS_WARNINGS = (
    # The datamodule's val loader feeds the kNN monitor; methods without a validation step are meant to skip it.
    r"You passed in a `val_dataloader` but have no `validation_step`",
    # Frozen parts (a teacher, a tokenizer, a probed encoder) are kept in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning's own use of a torch API that torch has deprecated; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # A moved or copied run folder: our checkpoint names are fixed (last.ckpt), so nothing of what it lists is lost.
    r"The dirpath has changed from .* won't be reloaded",
)
# Log lines from libraries that carry no information about the run.
HARMLESS_LOG_LINES = (
    r"💡 Tip: ",  # Lightning's advertisement for its cloud services
    r"Loading `train_dataloader` to estimate number of stepping batches",  # the lr schedule asks for the length
)
THIRD_PARTY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class KnownHarmless(logging.Filter):
    """Drops a record whose message matches one of ``HARMLESS_LOG_LINES`` or ``HARMLESS_WARNINGS``."""

    pattern = re.compile("|".join(HARMLESS_LOG_LINES + HARMLESS_WARNINGS))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def single_log_stream() -> None:
    """Route Lightning's loggers and Python warnings through the root handlers, each record once."""
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")
    root = logging.getLogger()
    if root.handlers:  # under a front door: Hydra's console and run-folder log file
        logging.captureWarnings(True)
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    handlers = root.handlers or [h for name in THIRD_PARTY_LOGGERS for h in logging.getLogger(name).handlers]
    for handler in handlers:
        if not any(isinstance(f, KnownHarmless) for f in handler.filters):
            handler.addFilter(KnownHarmless())


def log_to_file(run_dir: Path) -> None:
    """Add the run's own log file, ``run_dir/<front door>.log``, once the folder is known to be this run's.

    Hydra writes nothing (``conf/hydra/output``): a refused command must leave the folder as it was. Outside a
    front door (a test calling ``run``) there is no log file.
    """
    if not HydraConfig.initialized():
        return
    path = run_dir / f"{HydraConfig.get().job.name}.log"
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    handler.addFilter(KnownHarmless())
    root.addHandler(handler)
