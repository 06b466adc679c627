"""The client extra alone: a fresh virtual environment with grpcio and protobuf only can install the SDK and use it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nmtserve_client import Client

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

USE_THE_SDK = """
import sys
from nmtserve_client import Client, InvalidInputError

with Client(sys.argv[1]) as client:
    print(client.translate(["Friday"])[0].text)
    try:
        client.translate(["Friday", ""])
    except InvalidInputError as error:
        print(error.field)  # from the status message: google.rpc is not installed here
for name in ("torch", "onnxruntime", "numpy", "google.rpc"):
    try:
        __import__(name)
    except ImportError:
        continue
    sys.exit(f"{name} is importable with only the client extra installed")
loaded = sorted(name for name in sys.modules if name.startswith(("nmtserve_server", "nmtserve_export")))
assert not loaded, f"the SDK loaded {loaded}"
"""


def test_the_client_extra_alone_installs_and_translates(server, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    python, nmtserve = venv / "bin" / "python", venv / "bin" / "nmtserve"
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-warn-script-location", f"{ROOT}[client]"]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", python, "list", "--format=freeze"], capture_output=True, text=True, check=True)
    assert {line.split("==")[0].lower() for line in installed.stdout.split()} <= {"nmtserve", "grpcio", "protobuf", "typing_extensions", "typing-extensions"}
    with Client(server.address) as client:
        expected = client.translate(["Friday"])[0].text
    used = subprocess.run([python, "-c", USE_THE_SDK, server.address], capture_output=True, text=True, timeout=60)
    assert used.returncode == 0, used.stderr
    assert used.stdout.splitlines() == [expected, "texts[1]"]
    cli = subprocess.run([nmtserve, "translate", "--server", server.address, "Friday"], capture_output=True, text=True, timeout=60)
    assert (cli.returncode, cli.stdout) == (0, expected + "\n"), cli.stderr
    serve = subprocess.run([nmtserve, "serve"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2 and "install the 'serve' extra" in serve.stderr
