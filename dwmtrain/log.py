"""What a process says, through the standard ``logging`` module: every module logs to ``logging.getLogger(__name__)``
(names under ``dwmtrain``), and the entry point decides who says what with ``setup_logging``.

Rank 0 says ``run.log_level`` (info) and up; the other ranks only warnings and errors, unless ``run.log_all_ranks``
(then each line names its rank). On those other ranks the libraries' own warnings are quieted too (DeepSpeed's,
transformers', datasets', Python's ``warnings``): eight ranks repeating one warning say nothing rank 0 has not.
Lines below WARNING go to stdout, the rest to stderr, through ``tqdm.write`` so a progress bar is not cut.
"""

from __future__ import annotations

import logging
import sys
import warnings

ROOT = "dwmtrain"
#: the libraries whose loggers are quieted on ranks that do not speak
THIRD_PARTY = ("deepspeed", "DeepSpeed", "transformers", "datasets", "torch", "huggingface_hub", "accelerate")


class _BarSafeHandler(logging.Handler):
    """Writes each record with ``tqdm.write``: stdout below WARNING, stderr from it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)
        except Exception:  # noqa: BLE001 - logging's own contract: a failed write is reported, never raised
            self.handleError(record)


def setup_logging(prefix: str, rank: int = 0, level: str = "info", all_ranks: bool = False) -> None:
    """Configure the ``dwmtrain`` loggers of this process: its lines start with ``prefix`` (``[dwmtrain]``,
    ``[meta]``); rank 0 (or every rank, with ``all_ranks``) at ``level``, the others at WARNING."""
    speaks = rank == 0 or all_ranks
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter(f"{prefix} " + (f"rank {rank}: " if all_ranks else "") + "%(message)s"))
    log = logging.getLogger(ROOT)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(level.upper() if speaks else logging.WARNING)
    if not speaks:
        warnings.filterwarnings("ignore")
        for name in THIRD_PARTY:
            logging.getLogger(name).setLevel(logging.ERROR)
