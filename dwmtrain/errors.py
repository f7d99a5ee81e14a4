"""The project's own error types: an expected failure, reported as one line and exit code 2.

Entry points catch ``DWMTrainError`` only; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DWMTrainError(Exception):
    """An expected failure whose message names the file, line or config field to fix."""

    hint = ""  #: a second line for the user: what to do next


class ConfigError(DWMTrainError, ValueError):
    """A config value is wrong; the message names the field (``section.field``) and the value."""


class DataError(DWMTrainError, ValueError):
    """Bad input data; the message names the file and line (or shard and sequence)."""
