"""Loading a run config: a YAML file (or a bundled config's name) with its ``base:`` configs underneath, then
dotted ``key=value`` overrides, then the typed tree (``schema.Config``) that validates itself.

Values are read as YAML 1.2 reads numbers (``5e-4`` is a float; PyYAML alone follows YAML 1.1, where it is a
string), and each field takes the YAML values its type names in ``ACCEPTS``: nothing else is converted.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from dwmtrain.config.schema import PACKAGE_DIR, Config
from dwmtrain.errors import ConfigError

CONFIG_DIR = PACKAGE_DIR / "configs"

#: the YAML values a field of each type takes; a bool is never a number here (though Python says it is an int)
ACCEPTS: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: an exponent without a dot (``5e-4``, ``1E5``) is a number."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


#: fields that moved: their old spelling is refused naming the new place
MOVED = {
    "meta.dwm_path": "meta.fixed.dwm_path",
    "meta.dwm_run": "meta.transfer.dwm_run",
    "meta.oracle_drop": "meta.oracle.drop",
    "meta.oracle_from_stage": "meta.oracle.from_stage",
    "meta.loss_rule": "meta.loss_reweight.rule",
    "meta.loss_temperature": "meta.loss_reweight.temperature",
    "meta.loss_from_step": "meta.loss_reweight.from_step",
}


def bundled_configs() -> list[str]:
    """Names of the configs shipped in the package (``--config NAME``), experiments included."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in names:
            if name in MOVED:
                raise ConfigError(f"{name}: moved to {MOVED[name]} (each meta.mode has its own section)")
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{name}: unknown field{hint}")
        typ = hints[key]
        kwargs[key] = _from_dict(typ, value, name) if dataclasses.is_dataclass(typ) else field_value(typ, value, name)
    return cls(**kwargs)


def field_value(typ, value, name: str):
    """``value`` as a field of type ``typ`` (``list[T]``, a section, or one of ``ACCEPTS``), or a ConfigError naming
    it."""
    if dataclasses.is_dataclass(typ):
        return _from_dict(typ, value, name)
    if typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a mapping (e.g. {{code: 4.0}})")
        _, inner = typing.get_args(typ)
        return {str(k): field_value(inner, v, f"{name}.{k}") for k, v in value.items()}
    if typing.get_origin(typ) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r}: expected a list")
        (inner,) = typing.get_args(typ)
        return [field_value(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, ACCEPTS[typ]) or (isinstance(value, bool) and typ is not bool):
        raise ConfigError(f"{name}={value!r}: expected {typ.__name__}, got {type(value).__name__}")
    return float(value) if typ is float else value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. stages.num_stages=5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=YAMLLoader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {yaml_problem(e)}") from None
    return key.strip(), value


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as one line: where (line, column) and what."""
    mark, what = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(e, "context", None)
    return where + (f"{context}: " if context else "") + " ".join(str(what).split())


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file, or a bundled config's name (``tiny``, ``experiments/tiny/random_dwm``); neither is a
    ConfigError with the closest bundled names."""
    if Path(path).exists():
        return Path(path)
    if (CONFIG_DIR / f"{path}.yaml").is_file():
        return CONFIG_DIR / f"{path}.yaml"
    close = difflib.get_close_matches(str(path), bundled_configs(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; `dwmtrain configs` lists the bundled ones"
    raise ConfigError(f"config {path}: no such file, nor a bundled config{hint}")


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section (lists and scalars replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_config_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """The YAML mapping of a config file, with its ``base:`` config (a bundled name or a path relative to the
    file) merged underneath: experiment configs state only what differs from the preset they start from."""
    path = resolve_config_path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: base configs form a cycle ({' -> '.join(map(str, _seen))})")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.load(f, Loader=YAMLLoader) or {}
    except (IsADirectoryError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"config file {path}: cannot be read ({type(e).__name__}: {e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: base={base!r}: must name a config")
    rel = path.parent / base
    try:
        base_path = rel if rel.is_file() else resolve_config_path(base)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: base={base!r}: {str(e).split(': ', 1)[1]}") from None
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: base={base!r}: no such config (a bundled name or a relative path)")
    return _merge(read_config_tree(base_path, (*_seen, path.resolve())), tree)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML run config (a file, or a bundled config's name), apply dotted overrides, validate."""
    tree = read_config_tree(path) if path is not None else {}
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(tree, key, value)
    return _from_dict(Config, tree, "")
