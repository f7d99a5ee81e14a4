"""The package's structure holds: rooms (subpackages and top-level modules of ``dwmtrain``) import each other in
one direction only, no module imports itself back through others, and every function is short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

from .helpers import REPO

PKG = REPO / "dwmtrain"
MAX_LINES = 60


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: the dwmtrain modules it imports}, function-level imports included."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name and t.startswith("dwmtrain.")}
        out[name] = deps
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_module_imports_itself_back():
    imports = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _imports().items()}
    assert _cycle(imports) is None, " -> ".join(_cycle(imports))


def test_rooms_import_each_other_in_one_direction():
    rooms: dict[str, set[str]] = {}
    for m, deps in _imports().items():
        if m == "dwmtrain":
            continue
        rooms.setdefault(_room(m), set()).update(_room(d) for d in deps if _room(d) != _room(m) and d != "dwmtrain")
    assert _cycle(rooms) is None, "rooms import each other both ways: " + " -> ".join(_cycle(rooms))


def test_no_function_is_longer_than_a_reader_holds():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_the_cycle_check_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_pyproject_lists_every_package_of_the_tree():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for p in PKG.rglob("__init__.py")}
    data = {  # folders that ship data files and no code
        ".".join(d.relative_to(REPO).parts)
        for d in PKG.rglob("*")
        if d.is_dir() and d.name != "__pycache__" and not (d / "__init__.py").exists()
        and any(f.is_file() for f in d.iterdir())
    }  # fmt: skip
    found |= data | {"dwmtrain.ds_configs"}
    assert listed == found, f"pyproject's packages differ: {sorted(listed ^ found)}"
    assert (REPO / "ds_configs" / "zero3.json").is_file() and not (PKG / "ds_configs").exists()  # one copy


def _map_modules() -> set[str]:
    """The modules the map in docs/design.md names: in its package section, each line's first column (a room's
    line starts with ``room/``, and the lines under it carry on that room)."""
    import re

    text = (REPO / "docs" / "design.md").read_text()
    block = text[text.index("```\ndwmtrain/") + 4 :]
    lines = block[: block.index("```")].splitlines()[1:]
    named, room = set(), ""
    for line in lines:
        if not line.startswith("  "):  # ds_configs/, launchers/, tools/: the package's section is over
            break
        top, text = not line.startswith("   "), line.strip()
        if top and (m := re.match(r"([a-z_]+/)\s+(.*)", text)):
            room, text = m.group(1), m.group(2)
        elif top:
            room = ""
        first = re.split(r"\s{2,}", text)[0]
        named |= {room + f for f in re.findall(r"[a-z_]+\.py", first)}
    return named


def test_the_map_in_design_md_names_every_module_and_nothing_else():
    tree = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    named = _map_modules()
    assert not tree - named, f"modules docs/design.md's map does not name: {sorted(tree - named)}"
    assert not named - tree, f"the map names modules that do not exist: {sorted(named - tree)}"
