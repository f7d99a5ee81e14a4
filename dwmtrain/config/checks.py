"""The three checks every config field uses; each failure is a ConfigError naming ``section.field=value``."""

from __future__ import annotations

from typing import Any

from dwmtrain.errors import ConfigError


def check(cond: bool, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {why}")


def one_of(name: str, value: Any, choices: tuple) -> None:
    check(value in choices, name, value, f"must be one of {', '.join(map(str, choices))}")


def positive(name: str, value: Any) -> None:
    check(isinstance(value, (int, float)) and value > 0, name, value, "must be > 0")
