"""The supported versions of the libraries relay_lite drives: pinned in pyproject, checked at import."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import relay_lite

ROOT = Path(__file__).resolve().parent.parent


def pinned() -> dict[str, SpecifierSet]:
    """pyproject's dependencies that apply to this Python, by name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {requirement.name: requirement.specifier for requirement in requirements
            if requirement.marker is None or requirement.marker.evaluate()}


def test_pyproject_pins_the_ranges_the_import_check_enforces():
    pins = pinned()
    for name, (low, high) in relay_lite._DEPENDENCIES.items():
        assert pins[name] == SpecifierSet(f">={low},<{high}"), name


def test_every_library_relay_lite_drives_has_an_upper_bound():
    """A new minor release may change the internals: it must not install before a test run."""
    pins = pinned()
    for name in ("trio-websocket", "wsproto", "hypercorn", "quart", "quart-trio"):
        assert any(spec.operator == "<" for spec in pins[name]), name


def test_this_python_is_one_pyproject_admits():
    python = Version("{}.{}.{}".format(*sys.version_info))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert python in SpecifierSet(project["requires-python"])


def run_with_versions(versions: dict[str, str | None], code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where importlib.metadata reports `versions` (None: not installed)."""
    prelude = f"""
import importlib.metadata as metadata
real, fake = metadata.version, {versions!r}
def version(name):
    if name in fake:
        if fake[name] is None:
            raise metadata.PackageNotFoundError(name)
        return fake[name]
    return real(name)
metadata.version = version
"""
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def outside(name: str) -> str:
    """A version of `name` just past the supported range."""
    return relay_lite._DEPENDENCIES[name][1] + ".0"


@pytest.mark.parametrize("name", list(relay_lite._DEPENDENCIES))
def test_an_unsupported_version_fails_the_import_naming_it(name):
    result = run_with_versions({name: outside(name)}, "import relay_lite")
    assert result.returncode != 0
    low, high = relay_lite._DEPENDENCIES[name]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: relay_lite supports"), result.stderr
    assert f"{name}>={low},<{high}" in last_line and f"{name} {outside(name)}" in last_line
    files = re.findall(r'File "([^"]+)"', result.stderr)  # it failed before importing the library
    assert files and all(file in ("<string>", str(ROOT / "relay_lite.py")) or file.startswith("<frozen")
                         for file in files), files


def test_the_command_line_says_it_in_one_line():
    """Regression: on Python 3.13, quart-trio 0.12 beside Quart 0.23 died in quart_trio/app.py."""
    result = run_with_versions({"quart-trio": outside("quart-trio")},
                               "import runpy; runpy.run_path('relay_lite.py', run_name='__main__')")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("relay_lite: error: relay_lite supports quart-trio>=")
    assert f"not quart-trio {outside('quart-trio')}: pip install 'quart-trio>=" in result.stderr


def test_a_missing_library_is_named():
    result = run_with_versions({"hypercorn": None}, "import relay_lite")
    assert "ImportError: relay_lite needs hypercorn>=" in result.stderr
    assert "hypercorn is not installed" in result.stderr


def test_supported_versions_import():
    low_versions = {name: low + ".0" for name, (low, _) in relay_lite._DEPENDENCIES.items()}
    result = run_with_versions(low_versions, "import relay_lite; print('ok')")
    assert result.stdout == "ok\n", result.stderr


@pytest.mark.parametrize("version, release", [("0.13.0rc1", (0, 13, 0)), ("0.18.0.post1", (0, 18, 0)),
                                              ("1", (1,)), ("dev", ())])
def test_release_numbers(version, release):
    assert relay_lite._release(version) == release


def test_the_internals_driven_are_all_there_in_the_versions_installed():
    assert relay_lite._missing_internals() is None


def test_an_internal_gone_fails_with_one_line_naming_the_supported_versions(monkeypatch):
    trio_websocket, methods, attributes = relay_lite._INTERNALS["trio-websocket"]
    monkeypatch.setitem(relay_lite._INTERNALS, "trio-websocket",
                        (trio_websocket, (*methods, "_renamed_in_a_later_release"), (*attributes, "_gone_too")))
    problem = relay_lite._missing_internals()
    low, high = relay_lite._DEPENDENCIES["trio-websocket"]
    assert problem is not None and "\n" not in problem
    assert "(_renamed_in_a_later_release, _gone_too)" in problem and f"trio-websocket>={low},<{high}" in problem
