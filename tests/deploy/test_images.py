"""The container images: hadolint-clean Dockerfiles, a CUDA base that matches onnxruntime-gpu, the serve extra only,
an unprivileged user the Deployment agrees with; built and run where a container engine answers."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import onnxruntime
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnxruntime.capi import build_and_package_info

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
SERVER_IMAGES = ("Dockerfile.cpu", "Dockerfile.gpu")
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml"
BUILD_TIMEOUT = 900


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in dockerfile.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _default_arg(dockerfile: Path, name: str) -> str:
    (value,) = [args.split("=", 1)[1] for op, args in _instructions(dockerfile) if op == "ARG" and args.startswith(f"{name}=")]
    return value


def test_every_dockerfile_is_clean_under_hadolint(run_tool):
    dockerfiles = sorted(DOCKER.glob("Dockerfile.*"))
    assert {p.name for p in dockerfiles} >= {*SERVER_IMAGES, "Dockerfile.bundle"}
    result = run_tool("hadolint", *map(str, dockerfiles))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_gpu_base_has_the_cuda_major_version_of_onnxruntime_gpu():
    # The image pins the release installed here (the dev extra's pin), whose build information tells its CUDA version.
    pinned = _default_arg(DOCKER / "Dockerfile.gpu", "ONNXRUNTIME_GPU_VERSION")
    assert pinned == onnxruntime.__version__, "change the dev extra's onnxruntime-gpu pin (pyproject.toml) with the image's"
    image = _default_arg(DOCKER / "Dockerfile.gpu", "CUDA_IMAGE")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu[\d.]+", image)
    assert match, f"{image}: expected an nvidia/cuda cudnn-runtime image"
    assert match.group(1) == build_and_package_info.cuda_version.split(".")[0], build_and_package_info.cuda_version


@pytest.mark.parametrize("name", SERVER_IMAGES)
def test_server_images_install_the_serve_extra_and_run_serve_unprivileged(name):
    instructions = _instructions(DOCKER / name)
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")  # build stage, then a clean runtime stage
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    pin = ' "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' if name == "Dockerfile.gpu" else ""  # its CUDA major, fixed
    assert len(installs) == 1 and installs[0].endswith(f'pip install --no-cache-dir ".[serve]"{pin}'), installs
    assert ("ENTRYPOINT", '["nmtserve", "serve"]') in instructions  # exec form: the server gets the signals
    (user,) = [args for op, args in instructions if op == "USER"]
    uid, gid = map(int, user.split(":"))
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["securityContext"]
    assert uid == pod["runAsUser"] > 0 and gid == pod["runAsGroup"]
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "NMTSERVE_BUNDLE=/models/bundle" in env


def test_the_bundle_image_gives_its_files_to_the_user_the_init_container_copies_them_as():
    """COPY keeps the files' modes from the build context: a bundle exported under umask 077 (0600 files, root's in
    the image) would be unreadable to the init container's unprivileged user, and the pod would never start."""
    instructions = _instructions(DOCKER / "Dockerfile.bundle")
    (user,) = [args for op, args in instructions if op == "USER"]
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    (copy,) = [args.split() for op, args in instructions if op == "COPY"]
    assert f"--chown={user}" in copy, copy


@pytest.fixture(scope="session")
def container_engine() -> str:
    """docker or podman, where its daemon answers; skips the test otherwise (before any model is trained)."""
    for name in ("docker", "podman"):
        path = shutil.which(name)
        if path and subprocess.run([path, "info"], capture_output=True, timeout=30).returncode == 0:
            return path
    pytest.skip("no container engine answers here (docker info / podman info failed)")


@pytest.mark.e2e
def test_the_cpu_image_serves_a_bundle(container_engine, tiny_bundle, test_texts, tmp_path):
    """Build the CPU image and serve the tiny bundle from it (needs a container engine and its registry)."""
    engine = container_engine
    # pytest's temporary directories are private to their owner; the container's user is uid 10001.
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    bundle.chmod(0o755)
    for file in bundle.iterdir():
        file.chmod(0o644)
    tag = "nmtserve:cpu-test"
    build = subprocess.run([engine, "build", "-f", str(DOCKER / "Dockerfile.cpu"), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    name = f"nmtserve-test-{time.monotonic_ns()}"
    run = subprocess.run(
        [engine, "run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL", "--tmpfs", "/tmp",
         "-v", f"{bundle}:/models/bundle:ro", "-p", "127.0.0.1::50051", tag],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    try:
        port = subprocess.run([engine, "port", name, "50051/tcp"], capture_output=True, text=True, timeout=30).stdout
        address = "127.0.0.1:" + port.strip().splitlines()[0].rsplit(":", 1)[1]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                assert time.monotonic() < deadline, "the container never reported SERVING"
                time.sleep(1)
            reply = translator_pb2_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=test_texts[:2]), timeout=60)
            assert len(reply.translations) == 2
        # SIGTERM: the server drains and exits 0 (an exit by SIGKILL after the timeout would be 137).
        subprocess.run([engine, "stop", "--time", "40", name], capture_output=True, timeout=60, check=True)
        code = subprocess.run([engine, "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True, text=True, timeout=30)
        assert code.stdout.strip() == "0", code.stdout + code.stderr
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True, timeout=60)
