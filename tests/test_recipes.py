"""The README's recipes for running relay_lite for real (issue 11), tried as far as this machine
allows."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str, language: str) -> str:
    """The first ```language block after `heading` in the README."""
    text = README.read_text()
    after = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", after, re.S).group(1)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path):
    unit = readme_block("### As a systemd service", "ini")
    assert "ExecStart=/opt/relay_lite/.venv/bin/relay-lite --config /etc/relay_lite/relay.toml" in unit
    # the one path that differs here: verify checks that ExecStart's program exists
    console_script = Path(sys.executable).parent / "relay-lite"
    path = tmp_path / "relay-lite.service"
    path.write_text(unit.replace("/opt/relay_lite/.venv/bin/relay-lite", str(console_script)))
    verified = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
