"""What the images install: the package sources they copy, with only the serve extra, in a clean virtual
environment; torch stays out and `nmtserve serve --help` runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 600


def _copied_sources() -> list[str]:
    """What the CPU image's build stage copies from the repository (its COPY sources)."""
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile.cpu").read_text()
    return [source for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M) for source in line.split()[:-1]]


def test_the_serve_extra_installs_without_torch_and_serve_runs(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in _copied_sources():
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if copy is shutil.copytree else {}))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{source}[serve]"],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    probe = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is not None)"
    assert subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60).stdout.split() == ["True", "True"]
    result = subprocess.run([str(venv / "bin" / "nmtserve"), "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "NMTSERVE_BUNDLE" in result.stdout and "--health-port" in result.stdout
