"""The module's shape, as its docstring's map says (issue 22): layers in dependency order, a map
that names them, and no object reading another's private attributes."""

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

import relay_lite

SOURCE = Path(relay_lite.__file__).read_text()
TREE = ast.parse(SOURCE)
LINES = SOURCE.splitlines()


@functools.cache
def layers() -> list[tuple[int, str, int]]:
    """Each layer's banner: its line, its title, its number (the appendix: 99)."""
    found = []
    for number, line in enumerate(LINES, 1):
        if match := re.match(r"# ==== (\d+)\. (.+?) =+$", line):
            found.append((number, match.group(2), int(match.group(1))))
        elif match := re.match(r"# ==== (Appendix.*?) =+$", line):
            found.append((number, match.group(1), 99))
    return found


def layer_of(line: int) -> int:
    return max((layer for start, _, layer in layers() if start <= line), default=0)


def defined() -> dict[str, int]:
    """Each top-level name, and the layer it is defined in."""
    names: dict[str, int] = {}
    for node in TREE.body:
        targets: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                targets += [name.id for name in ast.walk(target) if isinstance(name, ast.Name)]
        for name in targets:
            names.setdefault(name, layer_of(node.lineno))
    return names


def test_the_layers_are_numbered_in_order_and_the_map_names_each():
    found = layers()
    assert [layer for _, _, layer in found] == [*range(1, len(found)), 99]
    docstring = ast.get_docstring(TREE)
    at = []
    for _, title, layer in found:
        short = title.partition(":")[0].partition(" (")[0]
        entry = f"{layer}. {short}" if layer != 99 else "Appendix"
        match = re.search(rf"^    {re.escape(entry)}", docstring, re.M)
        assert match, entry
        at.append(match.start())
    assert at == sorted(at)  # in the banners' order
    assert len(re.findall(r"^    (?:\d+\.|Appendix) ", docstring, re.M)) == len(found)  # and no layer that is not one


def test_each_layer_calls_only_those_above_it():
    """The appendix (the inspector's page, script and style) is data the routes serve."""
    names = defined()
    upward = set()
    for node in TREE.body:
        layer = layer_of(node.lineno)
        if layer in (0, 99):
            continue
        for name in ast.walk(node):
            if isinstance(name, ast.Name) and names.get(name.id, 0) > layer and names[name.id] != 99:
                upward.add(f"{getattr(node, 'name', ast.unparse(node)[:40])} (layer {layer}) -> {name.id} "
                           f"(layer {names[name.id]})")
    assert sorted(upward) == []


def test_no_object_reads_another_objects_private_attributes():
    """40 reads of another object's private attributes made Relay a second centre. Allowed: the
    library glue's reads of trio-websocket's connection (checked at import), a named tuple's
    _replace, and _Credentials carrying the failures of the _Credentials it replaces."""
    glue = next(layer for _, title, layer in layers() if title.startswith("Library glue"))
    reads = set()
    for node in TREE.body:
        for attribute in ast.walk(node):
            if not (isinstance(attribute, ast.Attribute) and attribute.attr.startswith("_")
                    and not attribute.attr.startswith("__")):
                continue
            base = attribute.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls") or attribute.attr == "_replace":
                continue
            owner = getattr(node, "name", "")
            if layer_of(node.lineno) == glue or (owner, ast.unparse(base)) == ("_Credentials", "before"):
                continue
            if isinstance(base, ast.Name) and base.id in {"sys", "os", "typing", "trio"}:
                continue
            reads.add(f"{owner}: {ast.unparse(attribute)}")
    assert sorted(reads) == []


@pytest.mark.timeout(300)
def test_mypy_strict_finds_nothing(tmp_path):
    """The seams are types (_Services, _Backend, _Owner, _Subscriber): mypy checks every call
    across them, strict, as pyproject's [tool.mypy] says."""
    root = Path(relay_lite.__file__).parent
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(root / "pyproject.toml"), "--cache-dir",
                             str(tmp_path), "relay_lite.py"], cwd=root, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
