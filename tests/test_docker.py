"""The Dockerfile: built and run only where docker is usable (a daemon that answers); CI does not need it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _docker_problem() -> str | None:
    """Why docker cannot build here (None: it can)."""
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not installed"
    try:
        done = subprocess.run([docker, "info"], capture_output=True, text=True, encoding="utf-8", timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    return None if done.returncode == 0 else f"docker has no usable daemon ({done.stderr.strip()[-200:]})"


DOCKER_PROBLEM = _docker_problem()
#: Extra ``docker build`` arguments, for machines that reach neither Docker Hub nor PyTorch's index,
#: e.g. ``--network host --build-arg BASE_IMAGE=local/debian --build-arg TORCH_INDEX=http://...``.
BUILD_ARGS = shlex.split(os.environ.get("PANCSEG_DOCKER_BUILD_ARGS", ""))


def test_the_image_gets_only_the_package_and_runs_the_demo() -> None:
    """What goes into the build context, and what the image runs by default."""
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[1:4] == ["*", "!pyproject.toml", "!README.md"] and "!pancreas_cli" in ignore
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "RUN pip install . && pancseg doctor" in dockerfile and 'CMD ["demo"]' in dockerfile and 'ENTRYPOINT ["pancseg"]' in dockerfile
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile


def _docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, encoding="utf-8", timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(DOCKER_PROBLEM is not None, reason=str(DOCKER_PROBLEM))
def test_the_cpu_image_builds_and_runs_pancseg() -> None:
    build = _docker("build", *BUILD_ARGS, "-t", "pancseg-test", str(ROOT), timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = _docker("run", "--rm", "pancseg-test", "demo", "--help")
    assert run.returncode == 0 and "synthetic data" in run.stdout, run.stdout + run.stderr
    doctor = _docker("run", "--rm", "pancseg-test", "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["nnunetv2"]["status"] == "ok" and checks["torchvision"]["status"] == "ok", checks
