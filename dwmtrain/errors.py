"""The project's own error types and exit codes.

An expected failure is a ``DWMTrainError``: entry points turn it into one line and exit code 2; anything else
is a bug and keeps its traceback. A planned stop is a ``PlannedStop``, which carries the exit code the job
ends with (the SLURM scripts turn 3 and 4 into success, so ``afterok`` chains go on).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 2  #: a clear error: the message names the field, file or host
EXIT_META_EXTERNAL = 3  #: stopped at a stage boundary (meta.launch=external): run the meta-update job, rerun
EXIT_STOPPED = 4  #: stopped on SIGUSR1 with a complete checkpoint: rerun (or requeue) the same command


class DWMTrainError(Exception):
    """An expected failure whose message names the file, line or config field to fix."""

    hint = ""  #: a second line for the user: what to do next


class ConfigError(DWMTrainError, ValueError):
    """A config value is wrong; the message names the field (``section.field``) and the value."""


class DataError(DWMTrainError, ValueError):
    """Bad input data; the message names the file and line (or shard and sequence)."""


class OutputExistsError(DWMTrainError, FileExistsError):
    """An output a command would write is there already; nothing of it was touched (``--overwrite`` replaces it,
    and only once the new output is complete)."""


class InputNotFoundError(DWMTrainError, FileNotFoundError):
    """A file or directory the user named is not there; the message names it and the field or flag."""


class CheckpointError(DWMTrainError, RuntimeError):
    """A checkpoint could not be written completely (a rank's part is missing); nothing was marked complete."""


class ResumeError(CheckpointError):
    """The checkpoint cannot continue this run; the message says what changed."""


class DWMInputError(DWMTrainError, ValueError):
    """An argument of the public API (``dwmtrain.DWM``, ``dwmtrain.meta_update``, ``dwmtrain.DWMTrainer``) cannot be
    used: a micro-batch, a token id, a model, a reward set, an optimizer; the message names it."""


class AnalysisError(DWMTrainError, ValueError):
    """A run directory, output path or request an analysis cannot use."""


class PlannedStop(Exception):
    """The run stopped on purpose with a complete checkpoint; rerunning the same command continues it. The
    message is what rank 0 says; ``exit_code`` is what the job ends with."""

    exit_code = EXIT_STOPPED
